"""Hostile workers for the simulator: valid payloads with hostile values.

Validation on the wire catches malformed payloads; these attacks send
well-formed ones. A `HostileAverager` wraps a worker's averager and changes
what it contributes (never what it receives), so the honest workers' loss
shows what an aggregator protects:

    swarm = LocalSwarm(4, aggregator="trimmed_mean")
    def worker(rank, averager):
        if rank == 3:
            averager = HostileAverager(averager, ATTACKS["scale100"])
        ...

Attacks (``ATTACKS``): ``scale100`` (the honest update times 100),
``flip10`` (times -10), ``noise10`` (Gaussian noise of 10 times the honest
update's norm), ``weight1e6`` (the negated update with a claimed weight of
1e6), ``alternate`` (``scale100`` in even rounds, honest in odd ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from lowcomm.averaging import AverageHandle, Averager


@dataclass(frozen=True)
class Attack:
    """``values(tensors, round, generator)`` -> what the attacker sends; ``weight``
    its claimed weight (None: the caller's); ``active(round)`` whether it attacks."""

    name: str
    values: Callable[[list[torch.Tensor], int, torch.Generator], list[torch.Tensor]]
    weight: float | None = None
    active: Callable[[int], bool] = lambda round: True


def _noise(tensors: list[torch.Tensor], round: int, g: torch.Generator) -> list[torch.Tensor]:
    norm = torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)).item()
    noise = [torch.randn(t.shape, generator=g) for t in tensors]
    scale = 10 * norm / max(torch.sqrt(sum((n.double() ** 2).sum() for n in noise)).item(), 1e-30)
    return [(n * scale).to(t.dtype) for n, t in zip(noise, tensors)]


ATTACKS = {a.name: a for a in (
    Attack("scale100", lambda ts, r, g: [t * 100 for t in ts]),
    Attack("flip10", lambda ts, r, g: [t * -10 for t in ts]),
    Attack("noise10", _noise),
    Attack("weight1e6", lambda ts, r, g: [-t for t in ts], weight=1e6),
    Attack("alternate", lambda ts, r, g: [t * 100 for t in ts], active=lambda r: r % 2 == 0),
)}


class HostileAverager:
    """An `Averager` that contributes ``attack``'s values instead of the caller's."""

    def __init__(self, inner: Averager, attack: Attack, seed: int = 0):
        self.inner, self.attack = inner, attack
        self.peer_id = inner.peer_id
        self._gen = torch.Generator().manual_seed(seed)

    def average(self, key: str, tensors: Sequence[torch.Tensor], *, round: int, group_size: int | None = None,
                weight: float = 1.0, compressor=None) -> AverageHandle:
        if self.attack.active(round):
            tensors = self.attack.values([t.detach().clone() for t in tensors], round, self._gen)
            weight = self.attack.weight if self.attack.weight is not None else weight
        return self.inner.average(key, tensors, round=round, group_size=group_size, weight=weight,
                                  compressor=compressor)


def train_under_attack(task, workers: int, aggregator: str, attack: Attack | None, *, steps: int = 200,
                       sync_every: int = 20, attackers: int = 1, seed: int = 0) -> float:
    """Train DiLoCo (constructor defaults) on ``task`` with ``workers`` simulated
    workers, the last ``attackers`` of them hostile, and return the honest
    workers' mean held-out loss at the end. One torch thread per worker."""
    from lowcomm.optimizers import DiLoCo
    from lowcomm.sim.runner import lr_lambda
    from lowcomm.sim.swarm import LocalSwarm

    hostile = set(range(workers - attackers, workers)) if attack is not None else set()

    def worker(rank: int, averager) -> float | None:
        model = task.make_model(seed)
        inner = task.make_inner(model, task.default_lr)
        if rank in hostile:
            averager = HostileAverager(averager, attack, seed=rank)
        opt = DiLoCo(model.named_parameters(), inner, averager, sync_every=sync_every)
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", steps))
        data = task.batches(rank, workers, seed)
        for _ in range(steps):
            task.loss(model, next(data)).backward()
            opt.step()
            opt.zero_grad()
            schedule.step()
        return None if rank in hostile else task.evaluate(model)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        losses = [x for x in LocalSwarm(workers, seed=seed, aggregator=aggregator).run(worker) if x is not None]
    finally:
        torch.set_num_threads(threads)
    return sum(losses) / len(losses)
