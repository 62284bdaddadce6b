"""Error feedback: carry what compression dropped into the next message.

`ErrorFeedback` is classic error feedback with optional decay (Seide et al.
2014; Karimireddy et al. 2019; SparseLoCo's beta < 1)::

    p = x + e ;  c = C(p) ;  e = beta * (p - D(c))

With beta = 1 nothing is ever lost: sum_t D(c_t) + e_T = sum_t x_t.

`EF21` (Richtarik et al. 2021) instead compresses the change of a running
estimate g, which both sender and receiver can keep::

    c = C(x - g) ;  g = g + D(c)

Both keep one state tensor per key (a parameter name, a fragment id), kept in
fp32 and saved by `state_dict`.
"""

from __future__ import annotations

import torch

from lowcomm.compressors.base import Compressor
from lowcomm.compressors.payload import Payload


class _Stateful:
    def __init__(self, compressor: Compressor):
        self.compressor = compressor
        self._state: dict[str, torch.Tensor] = {}

    def _get(self, key: str, like: torch.Tensor) -> torch.Tensor:
        s = self._state.get(key)
        if s is None or s.shape != like.shape:
            s = self._state[key] = torch.zeros(like.shape, dtype=torch.float32)
        return s

    def decompress(self, payload: Payload) -> torch.Tensor:
        return self.compressor.decompress(payload)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Per-key fp32 state (residuals or estimates), copied."""
        return {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        loaded = {}
        for k, v in state.items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point() or not torch.isfinite(v).all():
                raise ValueError(f"error-feedback state for {k!r} must be a finite float tensor")
            loaded[k] = v.detach().to(torch.float32).clone()
        self._state = loaded

    def reset(self, key: str | None = None) -> None:
        """Forget the state of one key, or of all keys."""
        if key is None:
            self._state.clear()
        else:
            self._state.pop(key, None)


class ErrorFeedback(_Stateful):
    """Wrap a compressor with classic error feedback (see the module docstring).

    ``beta`` in [0, 1] decays the residual; 1 keeps it all, 0 turns feedback off.
    """

    def __init__(self, compressor: Compressor, beta: float = 1.0):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        super().__init__(compressor)
        self.beta = beta

    def compress(self, key: str, x: torch.Tensor) -> Payload:
        """Compress ``x`` plus the residual kept under ``key``; update the residual."""
        p = self.compensate(key, x)
        payload = self.compressor.compress(p.to(x.dtype))
        self.absorb(key, p, self.compressor.decompress(payload))
        return payload

    def compensate(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``p = x + e``: what to compress, in fp32 (for callers that compress ``p``
        in pieces; follow with `absorb`)."""
        return x.detach().to(torch.float32) + self._get(key, x)

    def absorb(self, key: str, p: torch.Tensor, sent: torch.Tensor) -> None:
        """``e = beta * (p - sent)``, where ``sent`` is what ``p`` decompressed to."""
        self._get(key, p).copy_(p - sent.to(torch.float32)).mul_(self.beta)

    def residual(self, key: str) -> torch.Tensor | None:
        return self._state.get(key)


class EF21(_Stateful):
    """Wrap a compressor with EF21 (see the module docstring).

    The receiver reconstructs the sender's estimate by keeping its own EF21
    state and calling `apply` on every payload it gets under the same key.
    """

    def compress(self, key: str, x: torch.Tensor) -> Payload:
        """Compress ``x - g`` and move the estimate ``g`` kept under ``key``."""
        g = self._get(key, x)
        payload = self.compressor.compress((x.detach().to(torch.float32) - g).to(x.dtype))
        g.add_(self.compressor.decompress(payload).to(torch.float32))
        return payload

    def apply(self, key: str, payload: Payload) -> torch.Tensor:
        """Receiver side: add a payload to the estimate under ``key``; return it."""
        update = self.compressor.decompress(payload).to(torch.float32)
        g = self._get(key, update)
        return g.add_(update)

    def estimate(self, key: str) -> torch.Tensor | None:
        return self._state.get(key)
