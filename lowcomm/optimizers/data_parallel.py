"""Data-parallel baselines, for honest comparison: the gradient mean every step.

`DataParallel` sends fp32 gradients (DDP's traffic). `CompressedDataParallel`
sends them through a codec with error feedback; with ``topk`` and momentum
correction it is Deep Gradient Compression (Lin et al. 2018: momentum is
accumulated locally, u = m u + g, v = v + u, the top values of v are sent and
both u and v are cleared where they were sent); with ``sign`` it is the
communication of 1-bit SGD / 1-bit Adam's compression stage.
"""

from __future__ import annotations

import torch

from lowcomm.averaging import Averager, unflatten
from lowcomm.compressors import Compressor
from lowcomm.optimizers.base import OuterOptimizer, Params, make_compression
from lowcomm.optimizers.worker_group import is_sharded


class DataParallel(OuterOptimizer):
    """Average gradients over everyone every step (fp32 on the wire), then step
    the inner optimizer. Parameters without a gradient count as zero.
    ``worker_group``, ``worker_group_mode``: a worker of several processes, as
    `DiLoCo`."""

    key = "ddp"

    def __init__(self, params: Params, inner: torch.optim.Optimizer, averager: Averager, *,
                 weight: float = 1.0, timeout: float | None = None, compressor: Compressor | None = None,
                 error_feedback: bool = False, worker_group=None, worker_group_mode: str = "split"):
        super().__init__(params, inner, averager, worker_group, worker_group_mode)
        self.weight, self.timeout = weight, timeout
        self.compression = make_compression(compressor, error_feedback)
        self.step_count = 0

    @property
    def global_params(self) -> list[torch.Tensor]:
        """The parameters themselves: every step leaves them equal on every worker."""
        return self.params

    @property
    def swarm_round(self) -> int:
        """One gradient round per step."""
        return self.step_count

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def _exchange(self, grads: list[torch.Tensor], compression):
        handle = self.averager.average(self.key, grads, round=self.step_count, weight=self.weight,
                                       compressor=compression)
        result = self._wait(handle, self.timeout)
        self.stats.record(result)
        return result

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._evaluate(closure)
        result = self._exchange(self._grads(), self.compression)
        for p, g in zip(self.params, result.tensors):
            p.grad = g.to(p.dtype)
        self._inner_step()
        return loss

    def state_dict(self) -> dict:
        return {**self._base_state(), "step": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self._load_base_state(state)
        self.step_count = state["step"]


class CompressedDataParallel(DataParallel):
    """Gradients through ``compressor`` with error feedback every step.

    With ``momentum_correction`` the momentum ``momentum`` is applied before
    compression (DGC) and the inner optimizer should have none of its own.
    """

    key = "cddp"

    def __init__(self, params: Params, inner: torch.optim.Optimizer, averager: Averager,
                 compressor: str | Compressor, *, error_feedback: bool = True, momentum_correction: bool = False,
                 momentum: float = 0.9, weight: float = 1.0, timeout: float | None = None, worker_group=None,
                 worker_group_mode: str = "split"):
        if compressor is None:
            raise ValueError("CompressedDataParallel needs a compressor; use DataParallel for fp32 gradients")
        if momentum_correction and not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, inner, averager, weight=weight, timeout=timeout, compressor=compressor,
                         error_feedback=error_feedback and not momentum_correction, worker_group=worker_group,
                         worker_group_mode=worker_group_mode)
        if momentum_correction and any(is_sharded(p) for p in self.params):
            raise ValueError("momentum_correction needs replicated parameters (what was sent is known per shard "
                             "only); use it with DDP inside the worker, or use momentum_correction=False")
        self.momentum_correction, self.momentum = momentum_correction, momentum
        self.u = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        self.v = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]

    @torch.no_grad()
    def step(self, closure=None):
        if not self.momentum_correction:
            return super().step(closure)
        loss = self._evaluate(closure)
        for u, v, g in zip(self.u, self.v, self._grads()):
            u.mul_(self.momentum).add_(g)
            v.add_(u)
        result = self._exchange(self.v, self.compression)
        sent = result.sent if result.averaged else None
        sent = unflatten(sent[0], self.v) if sent else [v.clone() for v in self.v]
        for p, g, u, v, s in zip(self.params, result.tensors, self.u, self.v, sent):
            v.sub_(s)
            u.masked_fill_(s != 0, 0.0)  # factor masking
            p.grad = g.to(p.dtype)
        self._inner_step()
        return loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "u": [t.clone() for t in self.u], "v": [t.clone() for t in self.v]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        for mine, saved in zip(self.u + self.v, state["u"] + state["v"]):
            mine.copy_(saved)

