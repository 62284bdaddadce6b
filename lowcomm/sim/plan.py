"""`lowcomm plan`: predicted compute utilisation without training.

The same network model and the same schedules as the simulator (see
`lowcomm.sim.network`), run for one worker whose group peers are identical to
it: byte counts come from the codecs' exact wire sizes (`wire_size`), the
exchange patterns from `lowcomm.averaging.patterns` (`exchange_phases`), the
schedules from each algorithm's spec (`lowcomm.optimizers.registry`), DDP's
buckets overlapping the backward pass from `lowcomm.sim.overlap`.
"""

from __future__ import annotations

from typing import Sequence

from lowcomm.optimizers.registry import SyncSchedule
from lowcomm.sim.network import TCP_EFFICIENCY, Network, WorkerClock, exchange_phases, settle, swarm_round
from lowcomm.sim.overlap import DEFAULT_BACKWARD_SHARE, BucketedAllReduce, bucket_numels, filled_buckets

__all__ = ["bandwidth_for", "exchange_phases", "predict"]


def predict(schedule: SyncSchedule, step_time: float, network: Network, steps: int,
            backward_share: float = DEFAULT_BACKWARD_SHARE,
            param_numels: Sequence[int] | None = None) -> WorkerClock:
    """Run ``steps`` inner steps of ``schedule`` on one worker's virtual clock.

    A schedule that overlaps the backward pass (DDP) all-reduces its gradients
    in buckets during the last ``backward_share`` of each step: the buckets of
    parameters of ``param_numels`` values (model order), or, without them,
    buckets filled to torch's caps (`lowcomm.sim.overlap.filled_buckets`)."""
    codec = schedule.compressor
    clock = WorkerClock()
    buckets = None
    if schedule.overlap_backward:
        sizes = bucket_numels(param_numels) if param_numels else filled_buckets(sum(schedule.numels))
        buckets = BucketedAllReduce(sizes, backward_share * step_time, codec)
    phases = {numel: swarm_round(exchange_phases(codec, numel, schedule.group)) for numel in set(schedule.numels)}
    pending: list[tuple[int, float, int]] = []  # (needed at step, sent at, numel)
    for t in range(1, steps + 1):
        clock.now += step_time
        clock.compute += step_time
        for numel, offset in zip(schedule.numels, schedule.offsets):
            if t % schedule.every == offset:
                pending.append((t + schedule.delay, clock.now, numel))
        while pending and pending[0][0] <= t:
            _, sent_at, numel = pending.pop(0)
            if phases[numel]:
                transfers = buckets.transfers(sent_at, schedule.group) if buckets else [(sent_at, phases[numel])]
                settle(clock, network, transfers, sum(sent for sent, _ in phases[numel]))
    return clock


def bandwidth_for(schedule: SyncSchedule, step_time: float, latency: float, steps: int, target: float = 0.95,
                  backward_share: float = DEFAULT_BACKWARD_SHARE,
                  param_numels: Sequence[int] | None = None) -> float | None:
    """The least bandwidth (bits/s) at which utilisation reaches ``target``, or
    None if latency alone keeps it below (bisection on a log scale; the other
    arguments as `predict`'s)."""
    def util(bw: float) -> float:
        return predict(schedule, step_time, Network(bw, latency, TCP_EFFICIENCY), steps, backward_share,
                       param_numels).utilization

    lo, hi = 1.0, 1e15
    if util(hi) < target:
        return None
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if util(mid) < target else (lo, mid)
        if hi / lo < 1.001:
            break
    return hi
