"""The network model of the simulator: links, transfer times, virtual clocks.

Every worker has one full-duplex link of ``bandwidth`` (bits/s) each way and
``latency`` (s) per message hop. An exchange is a list of sequential phases
(see `lowcomm.sim.exchange`); a phase in which a worker sends ``s`` bytes and
receives ``r`` bytes takes ``max(s, r) * 8 / (bandwidth * efficiency) + latency``.
``efficiency`` is the share of the link's rate that carries payload:
`simulate` and `plan` use `TCP_EFFICIENCY`, the payload bytes of a full TCP
segment over the bytes the link carries for it (1448 of 1514 with a 1500-byte
MTU: IP and TCP headers with timestamps, and the Ethernet header that a
token bucket counts). The network lab measured torch DDP's ring all-reduce
at 0.94 to 0.96 of the link rate, where this gives 0.956.

A swarm round first spends `MATCHMAKING_HOPS` hops of latency on
matchmaking (the roster must reach every member before the exchange).

Each worker has a virtual clock. Computing a step advances it by the step
time. An exchange starts once every member of the group has sent its part
(the latest of their clocks at `average`) and the worker's link is free of its
own previous exchange; its result arrives after the transfer time. A worker
that needs a result before it arrives waits: the clock jumps to the arrival,
and the wait is counted as stall. Exchanges of different workers do not slow
each other (no shared bottleneck). Given the same sends, the same clocks
follow, whatever the thread timing.

An exchange may instead run as a sequence of transfers, one after another on
the worker's link, each with a ready time of its own (`NetworkModel.pipeline`):
DDP's gradient buckets, all-reduced while the backward pass still runs
(`lowcomm.sim.overlap`).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Callable

from lowcomm.averaging import AverageResult
from lowcomm.averaging.patterns import Phase, allgather_phases, butterfly_phases, shard_bounds
from lowcomm.compressors import Compressor, wire_size

_BANDWIDTH_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9,
                    "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9,
                    "b/s": 8, "kb/s": 8e3, "mb/s": 8e6, "gb/s": 8e9}
_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "": 1.0}


#: One transfer of an exchange that runs as a sequence: (ready at, in seconds; its phases).
Transfer = tuple[float, list[Phase]]


class NetworkSpecError(ValueError):
    """A bandwidth or duration that cannot be parsed."""


def parse_bandwidth(text: str) -> float:
    """``"100Mbit"``, ``"1Gbit"``, ``"12.5MB/s"``, ``"100mbps"`` -> bits per second."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-zA-Z/]+)\s*", str(text))
    unit = m and m.group(2).lower()
    if not m or unit not in _BANDWIDTH_UNITS or float(m.group(1)) <= 0:
        raise NetworkSpecError(f"could not read bandwidth {text!r}; write a positive number and a unit, "
                               "e.g. 100Mbit, 1Gbit, 12.5MB/s")
    return float(m.group(1)) * _BANDWIDTH_UNITS[unit]


def parse_duration(text: str) -> float:
    """``"50ms"``, ``"0.05s"``, ``"200us"``, ``"0.1"`` (seconds) -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([a-z]*)\s*", str(text))
    if not m or m.group(2) not in _TIME_UNITS:
        raise NetworkSpecError(f"could not read duration {text!r}; write a number and a unit, e.g. 50ms, 0.2s")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


def format_bandwidth(bits_per_s: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:.3g} {unit}"
    return f"{bits_per_s:.3g} bit/s"


#: Payload share of a link's rate for bulk TCP: a 1448-byte segment (MSS of a
#: 1500-byte MTU less 52 bytes of IP and TCP headers with timestamps) rides in
#: a 1514-byte Ethernet frame.
TCP_EFFICIENCY = 1448 / 1514


@dataclass(frozen=True)
class Network:
    """Per-worker link: ``bandwidth`` in bits/s each way, ``latency`` in seconds per hop."""

    bandwidth: float
    latency: float
    efficiency: float = 1.0

    def transfer_time(self, phases: list[Phase]) -> float:
        """Seconds for an exchange given (bytes sent, bytes received) per phase."""
        rate = self.bandwidth * self.efficiency
        return sum(max(sent, received) * 8 / rate + self.latency for sent, received in phases)


@dataclass
class WorkerClock:
    """A worker's virtual time and where it went (seconds)."""

    now: float = 0.0
    compute: float = 0.0
    stall: float = 0.0
    link_free: float = 0.0
    peak_exchange_bytes: int = 0

    @property
    def utilization(self) -> float:
        return self.compute / self.now if self.now > 0 else 1.0


def exchange_phases(codec: Compressor, numel: int, n: int, member: int = 0) -> list[Phase]:
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


#: Message hops of a swarm round before its exchange (`lowcomm.p2p.matchmaking`):
#: the last member's JOIN reaches the leader, the closed roster comes back.
MATCHMAKING_HOPS = 2


def swarm_round(phases: list[Phase]) -> list[Phase]:
    """A swarm round's phases: matchmaking's hops (latency, no payload), then the exchange's."""
    return [(0, 0)] * MATCHMAKING_HOPS + phases if phases else []


def settle(clock: WorkerClock, network: Network, transfers: list[Transfer], bytes_sent: int) -> float:
    """An exchange is needed now. Its transfers run one after another on the
    worker's link, each once its parts were all sent (its ready time) and the
    link is free; the clock waits for the last arrival. A plain exchange is one
    transfer, ready when every member has sent. Returns the stall in seconds."""
    arrival = clock.link_free
    for ready, phases in transfers:
        arrival = max(ready, arrival) + network.transfer_time(phases)
    clock.link_free = arrival
    clock.peak_exchange_bytes = max(clock.peak_exchange_bytes, bytes_sent)
    wait = max(0.0, arrival - clock.now)
    clock.now += wait
    clock.stall += wait
    return wait


class NetworkModel:
    """Virtual clocks of the workers of one simulated run over one `Network`."""

    def __init__(self, network: Network, peer_ids: list[str]):
        self.network = network
        self.clocks = {p: WorkerClock() for p in peer_ids}
        self._sends: dict[tuple[str, int, str], float] = {}
        self._pipelines: dict[str, Callable[[float, int], list[Transfer]]] = {}
        self._lock = threading.Lock()

    def pipeline(self, key: str, transfers: Callable[[float, int], list[Transfer]]) -> None:
        """Exchanges under ``key`` run as the sequence ``transfers(ready, n)``
        gives for a group of ``n`` whose members had all sent by ``ready``
        (DDP's buckets: `lowcomm.sim.overlap.BucketedAllReduce.transfers`),
        instead of as one transfer of the result's phases. Bytes counted are
        the result's either way."""
        self._pipelines[key] = transfers

    def compute(self, peer: str, seconds: float) -> None:
        """``peer`` spent ``seconds`` computing."""
        c = self.clocks[peer]
        c.now += seconds
        c.compute += seconds

    def sent(self, peer: str, key: str, round: int) -> None:
        """``peer`` handed its part of ``(key, round)`` to the network now."""
        with self._lock:
            self._sends[(key, round, peer)] = self.clocks[peer].now

    def received(self, peer: str, key: str, round: int, result: AverageResult) -> float:
        """``peer`` needs the result now: wait for its arrival. Returns the stall (s)."""
        if not result.averaged or len(result.participants) < 2:
            return 0.0
        with self._lock:
            ready = max(self._sends[(key, round, p)] for p in result.participants)
        pipeline = self._pipelines.get(key)
        transfers = pipeline(ready, len(result.participants)) if pipeline else [(ready, swarm_round(result.phases))]
        return settle(self.clocks[peer], self.network, transfers, result.bytes_sent)

    def wrap(self, averager, peer: str | None = None) -> TimedAverager:
        return TimedAverager(averager, self, peer or averager.peer_id)


class _TimedHandle:
    def __init__(self, handle, model: NetworkModel, peer: str, key: str, round: int):
        self._handle, self._model, self._peer, self._key, self._round = handle, model, peer, key, round
        self._result: AverageResult | None = None

    def done(self) -> bool:
        return self._handle.done()

    def result(self, timeout: float | None = None) -> AverageResult:
        if self._result is None:
            self._result = self._handle.result(timeout)
            self._model.received(self._peer, self._key, self._round, self._result)
        return self._result


@dataclass
class TimedAverager:
    """An `Averager` that also moves its worker's virtual clock (see the module doc)."""

    inner: object
    model: NetworkModel
    peer_id: str

    def average(self, key, tensors, *, round, **kwargs):
        self.model.sent(self.peer_id, key, round)
        return _TimedHandle(self.inner.average(key, tensors, round=round, **kwargs), self.model, self.peer_id,
                            key, round)
