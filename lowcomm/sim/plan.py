"""`lowcomm plan`: predicted compute utilisation without training.

The same network model and the same schedules as the simulator (see
`lowcomm.sim.network`), run for one worker whose group peers are identical to
it: byte counts come from the codecs' exact wire sizes (`wire_size`), the
exchange patterns from `lowcomm.sim.exchange`, the schedules from each
algorithm's spec (`lowcomm.optimizers.registry`).
"""

from __future__ import annotations

from lowcomm.averaging.patterns import allgather_phases, butterfly_phases, shard_bounds
from lowcomm.compressors import Compressor, wire_size
from lowcomm.optimizers.registry import SyncSchedule
from lowcomm.sim.network import Network, WorkerClock, settle


def exchange_phases(codec: Compressor, numel: int, n: int, member: int = 0) -> list[tuple[int, int]]:
    """(bytes sent, bytes received) per phase for ``member`` of a group of ``n``
    averaging ``numel`` values with ``codec``: the patterns of
    `lowcomm.averaging.patterns` (butterfly for dense codecs, all-gather for
    sparse) with every member's payloads at the codec's exact wire sizes."""
    if n < 2:
        return []
    if codec.sparse:
        return allgather_phases([wire_size(codec, numel)] * n, member)
    sizes = [wire_size(codec, hi - lo) for lo, hi in shard_bounds(numel, n)]
    return butterfly_phases([sizes] * n, sizes, member)


def predict(schedule: SyncSchedule, step_time: float, network: Network, steps: int) -> WorkerClock:
    """Run ``steps`` inner steps of ``schedule`` on one worker's virtual clock."""
    codec = schedule.compressor
    clock = WorkerClock()
    pending: list[tuple[int, float, list[tuple[int, int]]]] = []  # (needed at step, sent at, phases)
    for t in range(1, steps + 1):
        clock.now += step_time
        clock.compute += step_time
        for numel, offset in zip(schedule.numels, schedule.offsets):
            if t % schedule.every == offset:
                pending.append((t + schedule.delay, clock.now, exchange_phases(codec, numel, schedule.group)))
        while pending and pending[0][0] <= t:
            _, sent_at, phases = pending.pop(0)
            if phases:
                settle(clock, network, sent_at, phases, sum(sent for sent, _ in phases))
    return clock


def bandwidth_for(schedule: SyncSchedule, step_time: float, latency: float, steps: int, target: float = 0.95) -> float | None:
    """The least bandwidth (bits/s) at which utilisation reaches ``target``, or
    None if latency alone keeps it below (bisection on a log scale)."""
    def util(bw: float) -> float:
        return predict(schedule, step_time, Network(bw, latency), steps).utilization

    lo, hi = 1.0, 1e15
    if util(hi) < target:
        return None
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if util(mid) < target else (lo, mid)
        if hi / lo < 1.001:
            break
    return hi
