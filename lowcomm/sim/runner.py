"""Train one algorithm with N simulated workers and record what happened.

Every worker has its own model (same initial weights), inner optimizer and
data shard, and runs in its own thread with the real outer optimizer over a
`LocalSwarm`; a `NetworkModel` turns each worker's compute and exchanges into
virtual time. Torch runs one intra-op thread per worker so that runs are
deterministic and the step time means "one core". A worker of G ranks
(``--ranks-per-worker``) trains on G micro-batches per step and splits its
exchanges into G slices (`lowcomm.sim.ranks`).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from statistics import median
from typing import Callable, Iterator

import numpy as np
import torch

from lowcomm.config import ConfigError, SimulateConfig
from lowcomm.optimizers import DiLoCo
from lowcomm.optimizers.registry import Settings, build_optimizer, get_algorithm
from lowcomm.sim.network import Network, NetworkModel, WorkerClock
from lowcomm.sim.overlap import DEFAULT_BACKWARD_SHARE, BucketedAllReduce, bucket_numels
from lowcomm.sim.ranks import SplitAverager
from lowcomm.sim.swarm import LocalSwarm
from lowcomm.tasks import Task


def lr_lambda(schedule: str, steps: int) -> Callable[[int], float]:
    """Multiplier of the inner learning rate at a step: "constant", or "cosine"
    (linear warm-up over 5% of the steps, then cosine decay to 10%)."""
    if schedule == "constant":
        return lambda step: 1.0
    warmup = max(1, steps // 20)

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return cosine


def measure_step_time(task: Task, seed: int, lr: float, steps: int = 8, clock=time.thread_time,
                      data: Iterator | None = None) -> tuple[float, float]:
    """(seconds, backward share) of one inner step on one core: the median
    thread CPU seconds of a whole step (batch, forward and loss, backward,
    AdamW step), and the median share of it the backward pass took (timed
    separately on the same steps; the first two steps are warm-up). ``clock``
    (e.g. `time.perf_counter`, wall time as a busy machine gives it) and
    ``data`` (batches; default the task's first shard) may be given."""
    model = task.make_model(seed)
    opt = task.make_inner(model, lr)
    data = data if data is not None else task.batches(0, 1, seed)
    totals, shares = [], []
    for _ in range(steps):
        t0 = clock()
        loss = task.loss(model, next(data))
        t1 = clock()
        loss.backward()
        t2 = clock()
        opt.step()
        opt.zero_grad()
        total = clock() - t0
        totals.append(total)
        shares.append((t2 - t1) / total if total > 0 else 0.0)
    return median(totals[2:]), median(shares[2:])


@dataclass
class Record:
    """One evaluation point of one algorithm (means over workers)."""

    algorithm: str
    step: int
    tokens: int
    eval_loss: float
    train_loss: float
    bytes_sent_per_worker: float
    bytes_received_per_worker: float
    outer_rounds: int
    virtual_time_s: float
    compute_utilization: float


@dataclass
class AlgorithmRun:
    settings: Settings
    records: list[Record] = field(default_factory=list)
    clocks: list = field(default_factory=list)
    fragment_numels: list[int] = field(default_factory=list)
    param_numels: list[int] = field(default_factory=list)  # values per parameter, model order
    params: int = 0
    bytes_sent_per_rank: list[float] = field(default_factory=list)  # at the end, mean over workers, rank order


def round_record(algorithm: str, step: int, train_loss: float, stats, clock: WorkerClock) -> dict:
    """A worker's ``--log-to`` record after an outer round (`lowcomm.metrics`; the
    keys of `lowcomm join`'s where they mean the same): ``t`` (virtual seconds),
    ``round`` (its outer rounds so far), ``participants`` (its last group), ``loss``
    (of its last batch), wire bytes, ``compute_s`` and ``wait_s`` (virtual seconds
    of compute and of stalls on exchanges), all since the start."""
    return {"algorithm": algorithm, "t": clock.now, "step": step, "round": stats.outer_rounds,
            "participants": stats.last_group_size, "loss": train_loss, "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received, "compute_s": clock.compute, "wait_s": clock.stall}


def step_factors(cv: float, seed: int, rank: int) -> Iterator[float]:
    """Factors of worker ``rank``'s step times, one per step: lognormal with mean 1
    and coefficient of variation ``cv`` (sigma^2 = ln(1 + cv^2), mu = -sigma^2 / 2),
    drawn from a generator seeded by (seed, rank), so a run's clocks repeat; all
    1.0 when ``cv`` is 0."""
    if cv == 0:
        return itertools.repeat(1.0)
    sigma = math.sqrt(math.log1p(cv * cv))
    rng = np.random.default_rng([seed, rank, 0x57E9])
    return (float(f) for f in iter(lambda: rng.lognormal(-sigma * sigma / 2, sigma), None))


def run_algorithm(cfg: SimulateConfig, task: Task, settings: Settings, steps: int, step_time: float,
                  network: Network, on_step: Callable[[int], None] | None = None,
                  on_round: Callable[[str], None] | None = None,
                  backward_share: float = DEFAULT_BACKWARD_SHARE,
                  on_record: Callable[[dict], None] | None = None) -> AlgorithmRun:
    """Train ``settings.algorithm`` for ``steps`` inner steps on every worker.
    ``backward_share``: the share of each ``step_time`` that is the backward
    pass, during which ddp already all-reduces its gradient buckets
    (`lowcomm.sim.overlap`). ``on_round`` gets worker 0's status line after each
    of its outer rounds (outer algorithms only), ``on_record`` its `round_record`
    after each of its rounds (ddp and dgc: every step)."""
    n, g = cfg.workers, cfg.ranks_per_worker
    swarm = LocalSwarm(n, seed=cfg.seed, run_id=settings.algorithm, aggregator=cfg.aggregator)
    net = NetworkModel(network, [swarm.peer_id(r) for r in range(n)])
    lr = cfg.lr or task.default_lr
    points = sorted({0, steps, *range(cfg.eval_every, steps, cfg.eval_every)})
    out = AlgorithmRun(settings)
    spec = get_algorithm(settings.algorithm)

    def worker(rank: int, averager) -> list[tuple]:
        model = task.make_model(cfg.seed)
        inner = task.make_inner(model, lr)
        split = SplitAverager(averager, g, spec.copies) if g > 1 else None
        timed = net.wrap(split or averager)
        try:
            opt = build_optimizer(settings, model, inner, timed)
        except ValueError as e:
            raise ConfigError(f"--{settings.algorithm}", str(e)) from None
        if rank == 0:
            out.param_numels = [p.numel() for p in model.parameters()]
            out.params = sum(out.param_numels)
            if spec.overlaps_backward:
                # before rank 0's first exchange, so before any exchange completes. A worker hands its gradients
                # over once the step's compute is counted: there its backward pass ends (lowcomm.sim.overlap).
                allreduce = BucketedAllReduce(bucket_numels(out.param_numels), backward_share * step_time)
                net.pipeline(spec.cls.key, allreduce.transfers)
            if isinstance(opt, DiLoCo):
                out.fragment_numels = [sum(t.numel() for t in phi) for phi in opt.phi]
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, steps))
        data = task.batches(rank, n, cfg.seed) if g == 1 else None
        micro = [task.batches(rank * g + r, n * g, cfg.seed) for r in range(g)] if g > 1 else []
        jitter = step_factors(cfg.step_time_jitter, cfg.seed, rank)
        clock = net.clocks[timed.peer_id]
        rows, train_loss, rounds_seen = [], float("nan"), 0
        for step in range(steps + 1):
            if step:
                if data is not None:
                    loss = task.loss(model, next(data))
                else:  # the ranks' gradient mean: the gradient of their losses' mean
                    loss = sum(task.loss(model, next(d)) for d in micro) / g
                loss.backward()
                train_loss = loss.item()
                net.compute(timed.peer_id, step_time * next(jitter))
                opt.step()
                opt.zero_grad()
                schedule.step()
                if on_step:
                    on_step(1)
            if step in points:
                rows.append((step, task.evaluate(model), train_loss, opt.stats.bytes_sent, opt.stats.bytes_received,
                             opt.stats.outer_rounds, clock.now, clock.utilization))
            if rank == 0 and opt.stats.outer_rounds > rounds_seen:
                rounds_seen = opt.stats.outer_rounds
                if on_record:
                    on_record(round_record(settings.algorithm, step, train_loss, opt.stats, clock))
                if on_round and spec.periodic:
                    on_round(f"{settings.algorithm:>9} round {rounds_seen:3d}  step {step:5d}  "
                             f"train loss {train_loss:.4f}  sent {opt.stats.bytes_sent / 1e6:8.3f} MB  "
                             f"group {opt.stats.last_group_size}  virtual {clock.now:8.2f} s")
        per_rank[rank] = split.bytes_sent_by_rank if split else [opt.stats.bytes_sent]
        return rows

    per_rank: dict[int, list[int]] = {}
    per_worker = swarm.run(worker)
    out.bytes_sent_per_rank = [sum(col) / n for col in zip(*(per_rank[w] for w in range(n)))]
    for i, step in enumerate(points):
        rows = [w[i] for w in per_worker]
        mean = [sum(col) / n for col in zip(*rows)]
        out.records.append(Record(settings.algorithm, step, step * n * g * task.tokens_per_batch, mean[1], mean[2],
                                  mean[3], mean[4], int(rows[0][5]), max(r[6] for r in rows), mean[7]))
    out.clocks = list(net.clocks.values())
    return out
