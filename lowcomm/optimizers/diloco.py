"""DiLoCo and Streaming DiLoCo.

DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication Training
of Language Models"): every H inner steps each worker sends its outer gradient
``delta_i = phi - theta_i``, the group averages it, and the global weights take
a Nesterov SGD step ``phi = NesterovSGD(phi, grad=mean delta)``; then
``theta_i = phi``. Inner optimizer state stays local.

Streaming DiLoCo (Douillard et al. 2025, "Streaming DiLoCo with overlapping
communication"): parameters are split into P fragments; fragment p syncs at
steps ``t_p + k H`` with ``t_p = p H / P``, its mean is applied ``delay`` (tau)
inner steps later, and merged as ``theta_p = alpha theta_p + (1 - alpha) phi_p``.
With P = 1, tau = 0, alpha = 0 it is DiLoCo.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowcomm.averaging import AverageHandle, AverageResult, Averager, DoneHandle, check_group_size
from lowcomm.compressors import Compressor, ErrorFeedback
from lowcomm.optimizers.base import (
    OuterOptimizer, Params, fragment_indices, make_compression, named_params, units,
)
from lowcomm.optimizers.worker_group import is_sharded


@dataclass
class _InFlight:
    fragment: int
    apply_at: int      # inner step after which the mean is applied
    handle: AverageHandle


class DiLoCo(OuterOptimizer):
    """DiLoCo around any torch optimizer; Streaming DiLoCo with ``fragments > 1``.

    Args:
        params: ``model.parameters()`` or ``model.named_parameters()`` (names let
            fragments follow transformer blocks), the same the inner optimizer has.
        inner: the local optimizer (e.g. AdamW); its state is never averaged.
        averager: the network (`lowcomm.sim.LocalSwarm`, `lowcomm.p2p.Swarm`).
        sync_every: H, inner steps between syncs of a fragment [500].
        outer_lr: outer SGD learning rate [0.7].
        outer_momentum: outer SGD momentum [0.5]. The papers' 0.9 (tuned on LLM
            pre-training with H = 500 over tens of thousands of steps) overshoots
            on short runs with a learning rate tuned for DDP; 0.5 was the best
            setting of the task suite's sweep (docs/results.md) on every task.
        nesterov: Nesterov momentum for the outer step [True].
        momentum_restart: clear a fragment's outer momentum when a new mean points
            against it (adaptive restart, O'Donoghue and Candes 2015) [True];
            ``stats.momentum_restarts`` counts them.
        fragments: P, parameter fragments synced at staggered steps [1].
        fragment_strategy: ``"strided"`` (unit u in fragment u mod P) or ``"sequential"``.
        delay: tau, inner steps between sending a fragment and applying its mean,
            during which training continues [0]; must be < H / P.
        alpha: merge weight of the local weights when a mean arrives, in [0, 1] [0.0].
        compressor: codec name or instance for outer gradients on the wire, or an
            `ErrorFeedback` wrapping one (to pick its decay beta) ["none"].
        error_feedback: keep compression residuals per fragment [False]; with
            an `ErrorFeedback` as ``compressor`` it is already on: leave False.
        group_size: None averages with everyone ready; k with random groups of k.
        weight: this worker's weight in group means (e.g. its batch size) [1.0].
        timeout: seconds to wait for a mean before using the local delta (None:
            the averager's deadline).
        worker_group: the process group of this worker's ranks when it runs on
            several (DDP or FSDP2 inside), None for one process; building the
            optimizer is then a collective (`lowcomm.optimizers.worker_group`).
        worker_group_mode: ``"split"`` (each rank syncs a slice) or ``"rank0"``
            (rank 0 alone talks to the swarm) for replicated parameters ["split"].
    """

    key_prefix = "diloco"

    def __init__(self, params: Params, inner: torch.optim.Optimizer, averager: Averager, *,
                 sync_every: int = 500, outer_lr: float = 0.7, outer_momentum: float = 0.5,
                 nesterov: bool = True, momentum_restart: bool = True, fragments: int = 1,
                 fragment_strategy: str = "strided",
                 delay: int = 0, alpha: float = 0.0, compressor: str | Compressor | ErrorFeedback | None = "none",
                 error_feedback: bool = False, group_size: int | None = None, weight: float = 1.0,
                 timeout: float | None = None, worker_group=None, worker_group_mode: str = "split"):
        super().__init__(params, inner, averager, worker_group, worker_group_mode)
        _check_positive_int("sync_every", sync_every)
        _check_positive_int("fragments", fragments)
        if sync_every % fragments:
            raise ValueError(f"sync_every={sync_every} must be divisible by fragments={fragments}; "
                             f"change one of them (e.g. sync_every={sync_every - sync_every % fragments or fragments})")
        if type(delay) is not int or not 0 <= delay < sync_every // fragments:
            raise ValueError(f"delay must be an integer in [0, sync_every/fragments) = [0, {sync_every // fragments}), "
                             f"got {delay!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not outer_lr > 0:
            raise ValueError(f"outer_lr must be positive, got {outer_lr}")
        if not 0.0 <= outer_momentum < 1.0:
            raise ValueError(f"outer_momentum must be in [0, 1), got {outer_momentum}")
        check_group_size(group_size)
        if error_feedback and isinstance(compressor, ErrorFeedback):
            raise ValueError("compressor is already an ErrorFeedback; pass error_feedback=False, "
                             "or pass its codec with error_feedback=True")
        self.sync_every, self.fragments, self.delay, self.alpha = sync_every, fragments, delay, alpha
        self.momentum_restart = momentum_restart
        self.group_size, self.weight, self.timeout = group_size, weight, timeout
        self.compression = make_compression(compressor, error_feedback)
        self.fragment_params = fragment_indices(self.named, fragments, fragment_strategy)
        self.offsets = [p * sync_every // fragments for p in range(fragments)]
        with torch.no_grad():
            self.phi = [[self.params[i].detach().to(torch.float32).clone() for i in idx]
                        for idx in self.fragment_params]
        self.outer = [torch.optim.SGD(phi, lr=outer_lr, momentum=outer_momentum,
                                      nesterov=nesterov and outer_momentum > 0) for phi in self.phi]
        self.rounds = [0] * fragments
        self.step_count = 0
        self.inflight: list[_InFlight] = []

    @property
    def global_params(self) -> list[torch.Tensor]:
        """phi of every fragment, fragment after fragment (fp32)."""
        return [t for phi in self.phi for t in phi]

    @property
    def swarm_round(self) -> int:
        """Fragment rounds started, summed over fragments."""
        return sum(self.rounds)

    @torch.no_grad()
    def step(self, closure=None):
        """One inner step; then send fragments that are due and apply means that arrived."""
        loss = self._inner_step(closure)
        for p, offset in enumerate(self.offsets):
            if self.step_count % self.sync_every == offset:
                self._send(p)
        while self.inflight and self.inflight[0].apply_at <= self.step_count:
            self._apply(self.inflight.pop(0))
        return loss

    def _theta(self, p: int) -> list[torch.Tensor]:
        return [self.params[i] for i in self.fragment_params[p]]

    def _send(self, p: int) -> None:
        delta = [ph - th.to(torch.float32) for ph, th in zip(self.phi[p], self._theta(p))]
        handle = self.averager.average(f"{self.key_prefix}/frag{p}", delta, round=self.rounds[p],
                                       group_size=self.group_size, weight=self.weight, compressor=self.compression)
        self.rounds[p] += 1
        self.inflight.append(_InFlight(p, self.step_count + self.delay, handle))

    def _apply(self, entry: _InFlight) -> None:
        result = self._wait(entry.handle, self.timeout)
        self.stats.record(result)
        p = entry.fragment
        for ph, mean in zip(self.phi[p], result.tensors):
            ph.grad = mean.to(torch.float32)
        if self.momentum_restart:
            self._restart_if_reversed(p)
        self.outer[p].step()
        self.outer[p].zero_grad(set_to_none=True)
        for th, ph in zip(self._theta(p), self.phi[p]):
            if self.alpha == 0.0:
                th.copy_(ph)
            else:
                th.copy_(th.to(torch.float32).mul_(self.alpha).add_(ph, alpha=1.0 - self.alpha))

    def _restart_if_reversed(self, p: int) -> None:
        """Adaptive restart (O'Donoghue and Candes 2015): when the new outer
        gradient points against fragment ``p``'s momentum (negative inner
        product over the fragment), the momentum overshot; clear it, so the
        momentum starts again from this mean. With sharded parameters (DTensor)
        the product sums over every rank's shards (a collective of the worker)."""
        state = self.outer[p].state
        bufs = [state[ph].get("momentum_buffer") for ph in self.phi[p]]
        if any(b is None for b in bufs):
            return
        dot = sum(_dot(b, ph.grad) for b, ph in zip(bufs, self.phi[p]))
        if dot < 0:
            for b in bufs:
                b.zero_()
            self.stats.momentum_restarts += 1

    # --- state ---
    def state_dict(self) -> dict:
        """Everything needed to resume bitwise: inner and outer optimizer state,
        global weights, counters, residuals, and the means of fragments still in
        flight (waited for here)."""
        inflight = []
        for e in self.inflight:
            r = self._wait(e.handle, self.timeout)
            inflight.append({"fragment": e.fragment, "apply_at": e.apply_at, "tensors": r.tensors,
                             "averaged": r.averaged, "participants": r.participants,
                             "bytes_sent": r.bytes_sent, "bytes_received": r.bytes_received,
                             "diverged": r.diverged})
        return {**self._base_state(), "step": self.step_count, "rounds": list(self.rounds),
                "phi": [[t.clone() for t in phi] for phi in self.phi],
                "outer": [o.state_dict() for o in self.outer], "inflight": inflight}

    def load_state_dict(self, state: dict) -> None:
        if len(state["phi"]) != self.fragments or any(
                [t.shape for t in a] != [t.shape for t in b] for a, b in zip(state["phi"], self.phi)):
            raise ValueError("state was saved with other fragments or parameter shapes; "
                             "build the optimizer with the settings of the saved run")
        self._load_base_state(state)
        self.step_count, self.rounds = state["step"], list(state["rounds"])
        with torch.no_grad():
            for mine, saved in zip(self.phi, state["phi"]):
                for a, b in zip(mine, saved):
                    a.copy_(b)
        for o, s in zip(self.outer, state["outer"]):
            o.load_state_dict(s)
        self.inflight = [_InFlight(e["fragment"], e["apply_at"], DoneHandle(AverageResult(
            e["tensors"], e["averaged"], e["participants"], e["bytes_sent"], e["bytes_received"],
            diverged=list(e.get("diverged", [])))))  # states saved before results had one: none
            for e in state["inflight"]]


    def shared_state_dict(self) -> dict:
        """What a joining worker copies from a peer: global weights, outer
        optimizer state and counters (not the inner optimizer, residuals or
        fragments in flight, which are each worker's own)."""
        return {"step": self.step_count, "rounds": list(self.rounds),
                "phi": [[t.clone() for t in phi] for phi in self.phi],
                "outer": [o.state_dict() for o in self.outer]}

    @torch.no_grad()
    def load_shared_state_dict(self, state: dict) -> None:
        """Adopt a peer's `shared_state_dict`; local weights become the global ones."""
        if len(state["phi"]) != self.fragments or any(
                [t.shape for t in a] != [t.shape for t in b] for a, b in zip(state["phi"], self.phi)):
            raise ValueError("the peer's state has other fragments or parameter shapes")
        self.step_count, self.rounds = state["step"], list(state["rounds"])
        for mine, theirs in zip(self.phi, state["phi"]):
            for a, b in zip(mine, theirs):
                a.copy_(b)
        for o, s in zip(self.outer, state["outer"]):
            o.load_state_dict(s)
        self.inflight = []
        for p in range(self.fragments):
            for th, ph in zip(self._theta(p), self.phi[p]):
                th.copy_(ph)


class StreamingDiLoCo(DiLoCo):
    """`DiLoCo` with Streaming DiLoCo's settings: fragments over transformer
    blocks (strided), overlap of one inner step and fp4 (E3M0) outer gradients
    (the paper's), and alpha 0 (the paper uses 0.5). ``fragments=None`` picks
    `auto_fragments`: the largest P <= 4 that divides ``sync_every``, leaves
    H / P > ``delay`` and does not exceed the parameter units.

    alpha: a worker's weights when a fragment's mean arrives have moved from
    the global weights by all of its local steps since the last merge, not
    only the ``delay`` steps of overlap, so alpha 0.5 keeps half of every
    worker's own drift from the consensus. On lowcomm's task suite alpha 0 was
    better on every task (docs/results.md: tinylm 2.134 against 2.158,
    codeclass 1.238 against 1.273, terrain 0.0163 against 0.0193; 4 workers,
    H 20, 400 steps)."""

    key_prefix = "streaming"

    def __init__(self, params: Params, inner: torch.optim.Optimizer, averager: Averager, *,
                 sync_every: int = 500, fragments: int | None = None, delay: int = 1, alpha: float = 0.0,
                 compressor: str | Compressor | None = "fp4", **kwargs):
        params = list(params)
        if fragments is None:
            fragments = auto_fragments(sync_every, len(units(named_params(params))), delay)
        super().__init__(params, inner, averager, sync_every=sync_every, fragments=fragments, delay=delay,
                         alpha=alpha, compressor=compressor, **kwargs)


def auto_fragments(sync_every: int, n_units: int | None = None, delay: int = 0) -> int:
    """StreamingDiLoCo's P when none is given: the largest P <= 4 that divides
    H, leaves H / P > delay and does not exceed the model's parameter units
    (when known); 1 if none does."""
    cap = 4 if n_units is None else max(1, min(4, n_units))
    fits = [p for p in range(1, cap + 1) if sync_every % p == 0 and sync_every // p > delay]
    return max(fits, default=1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The inner product of two tensors of one shape. DTensors take ``(a * b).sum()``:
    flattening an unevenly sharded DTensor is not supported, and the sum reduces over
    the shards."""
    if is_sharded(a):
        return (a * b).sum()
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _check_positive_int(name: str, value) -> None:
    if type(value) is not int or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
