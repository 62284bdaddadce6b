"""What every outer optimizer shares: wrapping the inner optimizer, stats, state."""

from __future__ import annotations

import re
import time
from abc import ABCMeta, abstractmethod
from dataclasses import asdict, dataclass
from typing import Iterable, Union

import torch
import torch.distributed as dist

from lowcomm.averaging import AverageHandle, AverageResult, Averager, Compression
from lowcomm.compressors import Compressor, ErrorFeedback, get_compressor
from lowcomm.optimizers.worker_group import WorkerGroupAverager

#: Parameters as ``model.parameters()`` or ``model.named_parameters()``.
Params = Iterable[Union[torch.Tensor, tuple[str, torch.Tensor]]]


@dataclass
class Stats:
    """Counters an outer optimizer keeps (bytes are wire bytes, both directions;
    ``wait_s``: seconds the caller was blocked waiting for averaging results).

    ``rounds_not_averaged`` counts the rounds that did not leave this worker
    with its group's values: no mean came back (``AverageResult.averaged``
    False), or some of its values may differ from what the others hold
    (``AverageResult.diverged``); ``rounds_diverged`` counts the latter alone.
    Either way the worker is out of step and should take a peer's state
    (`lowcomm.join.catchup`)."""

    inner_steps: int = 0
    outer_rounds: int = 0
    rounds_not_averaged: int = 0
    rounds_diverged: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    last_group_size: int = 0
    momentum_restarts: int = 0
    wait_s: float = 0.0

    def record(self, result: AverageResult) -> None:
        self.outer_rounds += 1
        self.rounds_not_averaged += not result.averaged or bool(result.diverged)
        self.rounds_diverged += bool(result.diverged)
        self.bytes_sent += result.bytes_sent
        self.bytes_received += result.bytes_received
        self.last_group_size = result.group_size


def named_params(params: Params) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs; unnamed tensors are called by their position."""
    out = []
    for i, p in enumerate(params):
        name, tensor = p if isinstance(p, tuple) else (str(i), p)
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"params must be tensors or (name, tensor) pairs, got {type(tensor).__name__}")
        out.append((name, tensor))
    if not out:
        raise ValueError("params is empty: pass model.parameters() or model.named_parameters()")
    return out


def make_compression(compressor: str | Compressor | None, error_feedback: bool) -> Compression:
    """A compressor by name or instance, wrapped in error feedback if asked."""
    codec = get_compressor(compressor) if isinstance(compressor, str) else compressor
    if error_feedback:
        if codec is None:
            raise ValueError("error_feedback=True needs a compressor")
        return ErrorFeedback(codec)
    return codec


class OuterOptimizer(torch.optim.Optimizer, metaclass=ABCMeta):
    """Base of the outer optimizers: an `Optimizer` whose ``param_groups`` are
    the inner optimizer's (so torch LR schedulers on either keep working).

    Subclasses set ``compression`` (what `Averager.average` gets as
    ``compressor``) and ``step_count``, and say what their global weights
    (`global_params`) and round (`swarm_round`) are.

    A worker may be a `torch.distributed` process group (several GPUs, DDP or
    FSDP2 inside): pass ``worker_group`` (its group; building the optimizer
    is then a collective of it) and ``worker_group_mode`` (``"split"``: each
    rank syncs a slice, ``"rank0"``: rank 0 syncs everything); the averager
    becomes a `WorkerGroupAverager` (`lowcomm.optimizers.worker_group`)."""

    #: The codec of outer payloads on the wire, possibly in `ErrorFeedback`; None: fp32.
    compression: Compression
    #: Parameter-sized runs one exchange sends back to back (NoLoCo: phi, theta - phi).
    exchange_copies: int = 1

    def __init__(self, params: Params, inner: torch.optim.Optimizer, averager: Averager | None,
                 worker_group: dist.ProcessGroup | None = None, worker_group_mode: str = "split"):
        self.named = named_params(params)
        ours = {id(t) for _, t in self.named}
        theirs = {id(p) for g in inner.param_groups for p in g["params"]}
        if ours != theirs:
            raise ValueError("params must be exactly the parameters the inner optimizer was built on")
        super().__init__([t for _, t in self.named], {})
        self.param_groups = inner.param_groups
        self.defaults = inner.defaults
        if worker_group is not None:
            averager = WorkerGroupAverager(averager, worker_group, worker_group_mode, copies=self.exchange_copies)
            averager.check_params(self.params)
        elif worker_group_mode != "split":
            raise ValueError(f"worker_group_mode={worker_group_mode!r} needs a worker_group (a process group)")
        self.inner, self.averager = inner, averager
        self.stats = Stats()

    @property
    def params(self) -> list[torch.Tensor]:
        return [t for _, t in self.named]

    @property
    @abstractmethod
    def global_params(self) -> list[torch.Tensor]:
        """The global (outer) weights as one flat list of tensors (read-only: a view
        of the optimizer's own state, not a copy)."""

    @property
    @abstractmethod
    def swarm_round(self) -> int:
        """Rounds this optimizer has started, counted so that every node of a swarm
        that is in step has the same number (after a catch-up too)."""

    @property
    def codec(self) -> Compressor | None:
        """The codec outer payloads travel in (without its error feedback), or None for fp32."""
        c = self.compression
        return c.compressor if isinstance(c, ErrorFeedback) else c

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def _wait(self, handle: AverageHandle, timeout: float | None) -> AverageResult:
        """``handle.result(timeout)``, the seconds it blocked added to ``stats.wait_s``."""
        t0 = time.monotonic()
        try:
            return handle.result(timeout)
        finally:
            self.stats.wait_s += time.monotonic() - t0

    def _inner_step(self, closure=None):
        """Step the inner optimizer (with gradients enabled for ``closure``) and count it."""
        with torch.enable_grad():
            loss = self.inner.step(closure)
        self.step_count += 1
        self.stats.inner_steps += 1
        return loss

    @staticmethod
    def _evaluate(closure):
        """Run ``closure`` (forward and backward) with gradients enabled, if given."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _base_state(self) -> dict:
        """Inner optimizer, stats, error-feedback residuals and the codec's own state
        (``self.compression``)."""
        ef = self.compression.state_dict() if isinstance(self.compression, ErrorFeedback) else None
        codec = self.codec.state_dict() if self.codec is not None else {}
        return {"inner": self.inner.state_dict(), "stats": asdict(self.stats), "error_feedback": ef,
                "codec": codec}

    def _load_base_state(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.param_groups = self.inner.param_groups  # torch's load made new groups: share them again (LR schedulers)
        self.stats = Stats(**state["stats"])
        if isinstance(self.compression, ErrorFeedback):
            self.compression.load_state_dict(state["error_feedback"] or {})
        if self.codec is not None:
            self.codec.load_state_dict(state.get("codec") or {})  # states saved before codecs had one: none


def _block_of(name: str) -> str | None:
    """``"blocks.3"`` for ``"blocks.3.attn.weight"``: the prefix up to the first
    numeric path component (a transformer block), or None."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else None


def units(named: list[tuple[str, torch.Tensor]]) -> list[list[int]]:
    """Indices of parameters grouped into units: one per transformer block
    (names sharing a ``prefix.N`` component), every other parameter alone.
    Units are ordered by first appearance."""
    out: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(named):
        out.setdefault(_block_of(name) or f"\x00{i}", []).append(i)
    return list(out.values())


def fragment_indices(named: list[tuple[str, torch.Tensor]], fragments: int, strategy: str) -> list[list[int]]:
    """Parameter indices of each of ``fragments`` fragments.

    ``"strided"``: unit u goes to fragment u mod P (fragments interleave over
    depth, as Streaming DiLoCo); ``"sequential"``: P contiguous runs of units.
    """
    us = units(named)
    if fragments > len(us):
        raise ValueError(f"fragments={fragments} is more than the {len(us)} parameter units (transformer "
                         f"blocks or tensors) to split; use fragments <= {len(us)}")
    if strategy == "strided":
        groups = [us[p::fragments] for p in range(fragments)]
    elif strategy == "sequential":
        base, extra = divmod(len(us), fragments)
        groups, start = [], 0
        for p in range(fragments):
            stop = start + base + (p < extra)
            groups.append(us[start:stop])
            start = stop
    else:
        raise ValueError(f"fragment_strategy must be 'strided' or 'sequential', got {strategy!r}")
    return [sorted(i for u in g for i in u) for g in groups]
