"""NoLoCo (Kolehmainen et al. 2025, "NoLoCo: No-all-reduce Low Communication
Training Method for Large Models"): no global collective. Every H inner steps
each worker averages with a small random group G::

    phi_bar = mean_G phi_j ;  d_bar = mean_G (theta_j - phi_j)
    m_i     = mu m_i + eta (d_bar + phi_bar - phi_i)
    phi_i   = phi_i + m_i ;  theta_i = phi_i

Each worker keeps its own slow weights phi_i and momentum m_i. With
group_size = M, mu = 0 and eta = 1 this is plain weight averaging.
"""

from __future__ import annotations

import torch

from lowcomm.averaging import Averager, check_group_size
from lowcomm.compressors import Compressor
from lowcomm.optimizers.base import OuterOptimizer, Params, make_compression
from lowcomm.optimizers.diloco import _check_positive_int


class NoLoCo(OuterOptimizer):
    """NoLoCo around any torch optimizer.

    Args:
        params, inner, averager: as `DiLoCo`.
        sync_every: H, inner steps between group averages [50].
        outer_lr: eta [0.7].
        outer_momentum: mu [0.5].
        group_size: n, the size of the random groups [2: gossip pairs].
        compressor: codec for phi and theta - phi on the wire ["none"].
        error_feedback: keep compression residuals [False].
        weight, timeout, worker_group, worker_group_mode: as `DiLoCo`.
    """

    key = "noloco"
    exchange_copies = 2  # phi, then theta - phi

    def __init__(self, params: Params, inner: torch.optim.Optimizer, averager: Averager, *,
                 sync_every: int = 50, outer_lr: float = 0.7, outer_momentum: float = 0.5,
                 group_size: int | None = 2, compressor: str | Compressor | None = "none",
                 error_feedback: bool = False, weight: float = 1.0, timeout: float | None = None,
                 worker_group=None, worker_group_mode: str = "split"):
        super().__init__(params, inner, averager, worker_group, worker_group_mode)
        _check_positive_int("sync_every", sync_every)
        check_group_size(group_size)
        if not outer_lr > 0:
            raise ValueError(f"outer_lr must be positive, got {outer_lr}")
        if not 0.0 <= outer_momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {outer_momentum}")
        self.sync_every, self.outer_lr, self.outer_momentum = sync_every, outer_lr, outer_momentum
        self.group_size, self.weight, self.timeout = group_size, weight, timeout
        self.compression = make_compression(compressor, error_feedback)
        with torch.no_grad():
            self.phi = [p.detach().to(torch.float32).clone() for p in self.params]
        self.momentum = [torch.zeros_like(p) for p in self.phi]
        self.round = 0
        self.step_count = 0

    @property
    def global_params(self) -> list[torch.Tensor]:
        """This worker's slow weights phi_i (fp32; NoLoCo keeps one per worker)."""
        return self.phi

    @property
    def swarm_round(self) -> int:
        return self.round

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._inner_step(closure)
        if self.step_count % self.sync_every == 0:
            self._sync()
        return loss

    def _sync(self) -> None:
        n = len(self.phi)
        deltas = [th.to(torch.float32) - ph for th, ph in zip(self.params, self.phi)]
        handle = self.averager.average(self.key, self.phi + deltas, round=self.round, group_size=self.group_size,
                                       weight=self.weight, compressor=self.compression)
        self.round += 1
        result = self._wait(handle, self.timeout)
        self.stats.record(result)
        phi_bar, d_bar = result.tensors[:n], result.tensors[n:]
        for th, ph, m, pb, db in zip(self.params, self.phi, self.momentum, phi_bar, d_bar):
            m.mul_(self.outer_momentum).add_((db + pb - ph).mul_(self.outer_lr))
            ph.add_(m)
            th.copy_(ph)

    def shared_state_dict(self) -> dict:
        """What a joining worker copies from a peer: its slow weights, momentum and counters."""
        return {"step": self.step_count, "round": self.round, "phi": [t.clone() for t in self.phi],
                "momentum": [t.clone() for t in self.momentum]}

    @torch.no_grad()
    def load_shared_state_dict(self, state: dict) -> None:
        if [t.shape for t in state["phi"]] != [t.shape for t in self.phi]:
            raise ValueError("the peer's state has other parameter shapes")
        self.step_count, self.round = state["step"], state["round"]
        for mine, theirs in zip(self.phi + self.momentum, state["phi"] + state["momentum"]):
            mine.copy_(theirs)
        for th, ph in zip(self.params, self.phi):
            th.copy_(ph)

    def state_dict(self) -> dict:
        return {**self._base_state(), "step": self.step_count, "round": self.round,
                "phi": [t.clone() for t in self.phi], "momentum": [t.clone() for t in self.momentum]}

    def load_state_dict(self, state: dict) -> None:
        if [t.shape for t in state["phi"]] != [t.shape for t in self.phi]:
            raise ValueError("state was saved for other parameter shapes")
        self._load_base_state(state)
        self.step_count, self.round = state["step"], state["round"]
        for mine, saved in zip(self.phi + self.momentum, state["phi"] + state["momentum"]):
            mine.copy_(saved)
