"""`LocalSwarm`: N workers in one process, averaging through the real codecs.

    swarm = LocalSwarm(4, seed=0)
    results = swarm.run(lambda rank, averager: train(rank, averager))

Each rank gets an `Averager`. A round ``(key, round)`` completes when every
live rank has called `average` for it; it is then computed by the thread that
arrived last, in sorted-peer order, under one lock, so results do not depend
on thread timing. Ranks that return from ``fn`` (or call `leave`) stop being
waited for. Group draws come from ``(seed, key, round)`` (see
`lowcomm.averaging.draw_groups`); exchange patterns and their byte counts are
described in `lowcomm.sim.exchange`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from lowcomm.averaging import (
    AverageResult, Compression, check_group_size, draw_groups, flatten, group_seed,
)
from lowcomm.averaging.exclusion import Exclusions
from lowcomm.averaging.reduce import get_reducer
from lowcomm.compressors import ErrorFeedback
from lowcomm.sim.exchange import Contribution, exchange


class _Handle:
    def __init__(self, own: list[torch.Tensor], deadline: float):
        self._own = own
        self._deadline = deadline
        self._event = threading.Event()
        self._result: AverageResult | None = None

    def _set(self, result: AverageResult) -> None:
        self._result = result
        self._event.set()

    def done(self) -> bool:
        return self._event.is_set()

    def result(self, timeout: float | None = None) -> AverageResult:
        if not self._event.wait(self._deadline if timeout is None else timeout):
            return AverageResult([t.detach().clone() for t in self._own], False, reason="deadline passed")
        return self._result


@dataclass
class _Round:
    group_size: int | None
    contributions: dict[int, tuple[Contribution, _Handle]] = field(default_factory=dict)


class LocalAverager:
    """The `Averager` of one rank of a `LocalSwarm`."""

    def __init__(self, swarm: LocalSwarm, rank: int):
        self.swarm, self.rank = swarm, rank
        self.peer_id = swarm.peer_id(rank)

    def average(self, key: str, tensors: Sequence[torch.Tensor], *, round: int, group_size: int | None = None,
                weight: float = 1.0, compressor: Compression = None) -> _Handle:
        check_group_size(group_size)
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        tensors = list(tensors)
        vector = flatten(tensors)
        if isinstance(compressor, ErrorFeedback):
            vector = compressor.compensate(key, vector)
        contribution = Contribution(self.peer_id, tensors, vector, float(weight), compressor, key)
        handle = _Handle(tensors, self.swarm.deadline)
        self.swarm._contribute(self.rank, key, round, group_size, contribution, handle)
        return handle


class LocalSwarm:
    """An in-process swarm of ``num_workers`` ranks (see the module docstring).

    ``deadline`` (seconds) bounds how long `result()` waits by default.
    ``aggregator`` is the group's reducer, the same for every rank: ``mean``,
    ``trimmed_mean``, ``median``, ``centered_clip`` or ``norm_clip+<rule>``
    (`lowcomm.averaging.reduce`); results name the members it flagged. As in
    the real swarm, a member flagged in ``exclude_after`` consecutive rounds
    is left out for ``exclude_rounds`` rounds (`Exclusions`; every group
    exchange counts as a round).
    """

    def __init__(self, num_workers: int, seed: int = 0, deadline: float = 120.0, run_id: str = "local",
                 aggregator: str = "mean", exclude_after: int = 3, exclude_rounds: int = 20):
        if type(num_workers) is not int or num_workers < 1:
            raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
        self.reducer = get_reducer(aggregator)
        self.exclusions = Exclusions(exclude_after, exclude_rounds)
        self.num_workers, self.seed, self.deadline = num_workers, seed, deadline
        self.run_id = f"{run_id}/{seed}"
        self._lock = threading.Lock()
        self._live = set(range(num_workers))
        self._rounds: dict[tuple[str, int], _Round] = {}
        self._averagers = [LocalAverager(self, r) for r in range(num_workers)]

    @staticmethod
    def peer_id(rank: int) -> str:
        return f"worker{rank:05d}"

    def averager(self, rank: int) -> LocalAverager:
        return self._averagers[rank]

    def run(self, fn: Callable[[int, LocalAverager], Any], ranks: Sequence[int] | None = None) -> list[Any]:
        """Run ``fn(rank, averager)`` for each rank in its own thread; return the
        results in rank order. A rank leaves the swarm when its ``fn`` returns;
        the first exception raised by any rank is re-raised here."""
        ranks = list(range(self.num_workers)) if ranks is None else list(ranks)
        results: dict[int, Any] = {}
        errors: list[BaseException] = []

        def worker(rank: int) -> None:
            try:
                results[rank] = fn(rank, self._averagers[rank])
            except BaseException as e:  # re-raised in the caller's thread below
                errors.append(e)
            finally:
                self.leave(rank)

        with self._lock:
            self._live.update(ranks)
        threads = [threading.Thread(target=worker, args=(r,), name=f"lowcomm-rank{r}") for r in ranks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return [results[r] for r in ranks]

    def leave(self, rank: int) -> None:
        """Stop waiting for ``rank``; rounds that only lacked it complete now."""
        with self._lock:
            self._live.discard(rank)
            for rkey in list(self._rounds):
                self._maybe_finish(rkey)

    def join(self, rank: int) -> None:
        """Wait for ``rank`` again in rounds that start from now on."""
        with self._lock:
            self._live.add(rank)

    def _contribute(self, rank: int, key: str, round: int, group_size: int | None,
                    contribution: Contribution, handle: _Handle) -> None:
        with self._lock:
            r = self._rounds.setdefault((key, round), _Round(group_size))
            if r.group_size != group_size:
                raise ValueError(f"round {(key, round)} was started with group_size={r.group_size}, "
                                 f"rank {rank} asked for {group_size}")
            if rank in r.contributions:
                raise ValueError(f"rank {rank} already contributed to round {(key, round)}")
            r.contributions[rank] = (contribution, handle)
            self._maybe_finish((key, round))

    def _maybe_finish(self, rkey: tuple[str, int]) -> None:
        r = self._rounds[rkey]
        if not r.contributions or not self._live <= set(r.contributions):
            return
        del self._rounds[rkey]
        by_id = {c.peer_id: (c, h) for c, h in r.contributions.values()}
        for peer in [p for p in by_id if self.exclusions.is_excluded(p)]:  # left out, as a swarm's leader does
            c, handle = by_id.pop(peer)
            handle._set(AverageResult([t.detach().clone() for t in c.tensors], False, [peer],
                                      reason="excluded as an outlier"))
        for group in draw_groups(list(by_id), group_seed(self.run_id, *rkey), r.group_size):
            members = [by_id[p] for p in group]
            results = exchange([c for c, _ in members], self.reducer)
            for (_, handle), result in zip(members, results):
                handle._set(result)
            self.exclusions.observe(group, results[0].outliers, me="")
