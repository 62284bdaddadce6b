"""`Swarm`: the Averager protocol over real peers, on any `Transport`.

    with Swarm.create(run_id="demo") as swarm:            # the first node
        print(swarm.addrs())
    with Swarm.join(["/ip4/.../p2p/..."], run_id="demo") as swarm:
        handle = swarm.average("k", tensors, round=0)

How a round ``(key, round)`` goes:

1. **Membership** (`lowcomm.p2p.membership`). Every node publishes a record
   with a short TTL and refreshes it: its addresses, the highest round it has
   started and its measured upload rate. Nodes that stop refreshing drop out.
2. **Matchmaking** (`lowcomm.p2p.matchmaking`). The live member with the
   smallest peer id leads and closes the roster once every live member has
   joined, or ``window`` seconds after the first JOIN; a late node keeps its
   tensors and takes part from the next round.
3. **Groups** are drawn from the roster and the round seed
   (`lowcomm.averaging.draw_groups`), identically on every member.
4. **Exchange** (`lowcomm.p2p.exchange`). Dense codecs: butterfly with backup
   reducers; sparse codecs: all-gather. Invalid payloads leave their sender out.
   Then error feedback absorbs what was sent, and the members the reducer
   flagged count towards their exclusion (`lowcomm.averaging.exclusion`).
5. **Deadlines** come from the payload size and a bandwidth: each phase gets
   ``base_timeout`` plus 4x the time the whole payload takes at the slowest of
   this node's measured upload rate and the rates the group's members publish
   in their membership records (never below ``min_bandwidth``). Until a node
   has measured anything it assumes ``bandwidth`` (100 Mbit/s), so the
   defaults hold on loopback and on 100 Mbit/s links, and a slower link
   lengthens every deadline after its first round. A phase whose send misses
   its deadline measures nothing; it halves the node's estimate instead, so
   on a link far slower than assumed the deadlines double until rounds fit.

The swarm runs its own asyncio loop in a daemon thread; `average` returns at
once. `close` (also on context exit and at interpreter exit) stops the
transport, its daemon and the thread.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import time
import weakref
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Sequence

import torch

from lowcomm.averaging import (
    AverageResult, Compression, check_group_size, draw_groups, flatten, group_seed, unflatten,
)
from lowcomm.averaging.exclusion import Exclusions
from lowcomm.averaging.reduce import get_reducer
from lowcomm.compressors import Compressor, ErrorFeedback, get_compressor, wire_size
from lowcomm.p2p.exchange import GroupExchange, UploadRate
from lowcomm.p2p.matchmaking import Matchmaker
from lowcomm.p2p.membership import Membership
from lowcomm.p2p.private import make_private
from lowcomm.p2p.transport import Handler, Message, Transport

log = logging.getLogger("lowcomm.p2p")


class _ClosedLoopChildFilter(logging.Filter):
    """A daemon that exits after its swarm's loop closed (a failed start) makes
    asyncio's child watcher warn "Loop ... that handles pid N is closed": the
    process is already gone and nothing is lost, so the line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "that handles pid" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_ClosedLoopChildFilter())


class SwarmHandle:
    """What `Swarm.average` returns (see `lowcomm.averaging.AverageHandle`)."""

    def __init__(self, future: Future, own: list[torch.Tensor], default_timeout: float):
        self._future, self._own, self._default = future, own, default_timeout

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> AverageResult:
        try:
            return self._future.result(self._default if timeout is None else timeout)
        except FutureTimeout:
            return AverageResult([t.detach().clone() for t in self._own], False, reason="deadline passed")
        except CancelledError:
            return AverageResult([t.detach().clone() for t in self._own], False, reason="round aborted")


class Swarm:
    """An `Averager` over real peers (see the module docstring): a `Membership`,
    a `Matchmaker` and a `GroupExchange` on one transport and one event loop.

    Args:
        transport: a `Transport` (not started yet).
        run_id: the training run; nodes of other runs are ignored.
        membership_ttl: seconds a membership record lives without refresh [10].
        window: seconds the leader waits for missing members after the first JOIN [5].
        base_timeout: fixed part of every deadline, in seconds [10].
        bandwidth: upload rate in bits/s assumed until one is measured [100e6].
        min_bandwidth: the least rate, in bits/s, a deadline is ever sized for [1e6].
        aggregator: the reducer of every shard (`lowcomm.averaging.reduce`) ["mean"].
        exclude_after: consecutive rounds a member is flagged as an outlier before it is left out [3].
        exclude_rounds: rounds such a member is left out for [20].
    """

    def __init__(self, transport: Transport, run_id: str = "lowcomm", *, membership_ttl: float = 10.0,
                 window: float = 5.0, base_timeout: float = 10.0, bandwidth: float = 100e6,
                 min_bandwidth: float = 1e6, aggregator: str = "mean", exclude_after: int = 3,
                 exclude_rounds: int = 20):
        if not bandwidth >= min_bandwidth > 0:
            raise ValueError(f"need bandwidth >= min_bandwidth > 0 (bits/s), got {bandwidth} and {min_bandwidth}")
        self.reducer = get_reducer(aggregator)
        self.exclusions = Exclusions(exclude_after, exclude_rounds)
        self.transport, self.run_id = transport, run_id
        self.membership_ttl, self.window = membership_ttl, window
        self.base_timeout, self.bandwidth, self.min_bandwidth = base_timeout, bandwidth, min_bandwidth
        self.upload = UploadRate(bandwidth)
        self.membership = Membership(transport, run_id, membership_ttl)
        self.matchmaker = Matchmaker(transport, run_id, window, self.membership, self.exclusions, self._spawn)
        self.exchange = GroupExchange(transport, run_id, self.reducer, self.membership, self.upload)
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"lowcomm-swarm-{run_id}", daemon=True)
        self._thread.start()
        try:
            self.call(self._start(), timeout=120)
        except BaseException:
            self.close()
            raise
        _open_swarms.add(self)

    # --- construction helpers ---
    @classmethod
    def create(cls, run_id: str = "lowcomm", *, backend: str = "hivemind", **kwargs) -> Swarm:
        """Start a new swarm (the first node). See `join` for the options."""
        return cls.join([], run_id=run_id, backend=backend, **kwargs)

    @classmethod
    def join(cls, initial_peers: Sequence[str], run_id: str = "lowcomm", *, backend: str = "hivemind",
             listen: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",), announce: Sequence[str] = (),
             identity_path: str | None = None, secret: bytes | None = None, allow: Sequence[str] | None = None,
             **swarm_options) -> Swarm:
        """Join the swarm reachable at ``initial_peers`` (multiaddrs) over ``backend``.
        ``secret`` and/or ``allow`` (peer ids) make it private (`lowcomm.p2p.private`)."""
        from lowcomm.p2p.backends import make_transport

        transport = make_transport(backend, initial_peers=list(initial_peers), listen=list(listen),
                                   announce=list(announce), identity_path=identity_path)
        return cls(make_private(transport, secret, allow), run_id, **swarm_options)

    @property
    def peer_id(self) -> str:
        return self.transport.peer_id

    def addrs(self) -> list[str]:
        return self.transport.addrs()

    @property
    def round(self) -> int:
        """The highest round this node has started averaging (-1: none yet); published with its membership."""
        return self.membership.round

    @property
    def known_members(self) -> list[str]:
        """Live members (self included) as of the last membership refresh (no network)."""
        return self.membership.known()

    def members(self) -> list[str]:
        """Live members (self included), freshly read from the membership store."""
        return self.call(self.membership.refresh(), timeout=30)

    def wait_for_members(self, count: int, timeout: float = 60.0) -> list[str]:
        """Block until at least ``count`` members are live; raise TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            members = self.members()
            if len(members) >= count:
                return members
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(members)} of {count} peers joined within {timeout:.0f} s")
            time.sleep(0.2)

    def call(self, coro, timeout: float):
        """Run ``coro`` on the swarm's event loop and return its result (raises
        what it raises, or `TimeoutError` after ``timeout`` seconds). For work on
        the transport beside averaging: serving another protocol, a request."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(self, protocol: str, handler: Handler) -> None:
        """Answer requests of ``protocol``, a protocol beside averaging (e.g. `lowcomm
        join`'s handshake), with ``handler``, run on the swarm's event loop."""
        self.call(self.transport.serve(protocol, handler), timeout=30)

    def request(self, peer: str, protocol: str, data: Message, timeout: float) -> bytes:
        """Send ``data`` to ``peer`` under ``protocol`` and return its answer; blocks
        for at most ``timeout`` seconds (plus 10 s to reach the loop). Raises what
        the transport raises (`PeerUnreachable`, `TimeoutError`, `Unauthorized`)."""
        return self.call(self.transport.request(peer, protocol, data, timeout=timeout), timeout + 10)

    # --- lifecycle ---
    async def _start(self) -> None:
        await self.transport.start()
        await self.matchmaker.serve()
        await self.exchange.serve()
        await self.membership.publish(self.bandwidth_estimate())
        await self.membership.refresh()
        self._spawn(self._refresh_loop())

    def _spawn(self, coro) -> asyncio.Task:
        """A task of this swarm's, cancelled on close."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _tracked(self, coro):
        asyncio.current_task()._lowcomm_round = True
        self._tasks.add(asyncio.current_task())
        try:
            return await coro
        finally:
            self._tasks.discard(asyncio.current_task())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.membership_ttl / 3)
            try:
                await self.membership.publish(self.bandwidth_estimate())
                await self.membership.refresh()
            except Exception as e:  # keep refreshing through transient faults
                log.warning("membership refresh failed: %s", e)
            cutoff = time.monotonic() - 600  # what rounds older than 10 minutes left behind
            self.exchange.prune(cutoff)
            self.matchmaker.prune(cutoff)

    # --- bandwidth and deadlines ---
    def bandwidth_estimate(self) -> float:
        """This node's upload rate in bits/s: measured (a moving average over
        phases), or the assumed ``bandwidth`` before the first measurement."""
        return self.upload.estimate()

    def deadline_bandwidth(self) -> float:
        """The rate deadlines are sized for: the slowest of this node's estimate and
        the rates the other members publish, at least ``min_bandwidth``."""
        rates = [self.bandwidth_estimate()] + self.membership.published_rates()
        return max(self.min_bandwidth, min(rates))

    def _timeout(self, codec: Compressor, numel: int) -> float:
        """Seconds for one phase: fixed part plus 4x the whole payload's transfer time."""
        return self.base_timeout + 4 * wire_size(codec, numel) * 8 / self.deadline_bandwidth()

    def forget_rounds(self) -> None:
        """Forget closed rosters, and messages buffered for rounds not in flight here,
        after this node's state moved to another round (a catch-up): a round it
        goes back to is run anew. Lobbies still gathering stay: other peers' JOINs
        for a coming round wait in them (dropping those left this node to lead
        that round alone while they were answered without it, round after round)."""
        def forget():
            self.matchmaker.forget_closed()
            self.exchange.forget_idle()
        self.loop.call_soon_threadsafe(forget)

    def abort_rounds(self) -> None:
        """Give up every round in flight: their handles return the callers' own
        tensors flagged ``averaged=False`` (reason "round aborted"). Thread-safe."""
        def cancel():
            for task in list(self._tasks):
                if getattr(task, "_lowcomm_round", False):
                    task.cancel()
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(cancel)

    def kill(self) -> None:
        """Stop the transport's daemon at once, without a clean leave (for a second Ctrl+C)."""
        kill = getattr(self.transport, "kill", None)
        if kill:
            kill()

    def close(self) -> None:
        """Leave the swarm: stop the transport (and its daemon) and the loop thread."""
        if self._closed:
            return
        self._closed = True
        _open_swarms.discard(self)
        if self.loop.is_running():
            try:
                self.call(self._stop(), timeout=30)
            except Exception as e:  # closing must not raise; report and go on
                log.warning("error while stopping the transport: %s", e)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self.loop.close()

    async def _stop(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.transport.stop()
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:  # what the transport's libraries left running
            t.cancel()
        await asyncio.wait_for(asyncio.gather(*rest, return_exceptions=True), 5)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the Averager protocol ---
    def average(self, key: str, tensors: Sequence[torch.Tensor], *, round: int, group_size: int | None = None,
                weight: float = 1.0, compressor: Compression = None) -> SwarmHandle:
        """Start averaging ``tensors`` with the peers ready for ``(key, round)``."""
        check_group_size(group_size)
        if not weight > 0:
            raise ValueError(f"weight must be positive, got {weight}")
        if self._closed:
            raise RuntimeError("this swarm is closed")
        self.membership.started(round)
        x = flatten(tensors)  # a copy: the caller may go on training while the round runs
        tensors = unflatten(x, tensors)  # the caller's values as they were, returned on failure
        p = compressor.compensate(key, x) if isinstance(compressor, ErrorFeedback) else x
        codec = compressor.compressor if isinstance(compressor, ErrorFeedback) else (
            compressor or get_compressor("none"))
        timeout = self._timeout(codec, x.numel())
        coro = self._average(key, round, tensors, x, p, float(weight), group_size, codec, compressor, timeout)
        future = asyncio.run_coroutine_threadsafe(self._tracked(coro), self.loop)
        return SwarmHandle(future, tensors, default_timeout=4 * timeout + self.window + 5)

    async def _average(self, key, round, tensors, x, p, weight, group_size, codec, compression,
                       timeout) -> AverageResult:
        self.exchange.begin(key, round)
        try:
            t0 = time.monotonic()
            roster = await self.matchmaker.matchmake(key, round, group_size or 0, weight, timeout)
            log.debug("%s/%s matchmaking %.3f s: %d in the roster", key, round, time.monotonic() - t0, len(roster))
            if self.peer_id not in roster:
                return AverageResult(tensors, False, [self.peer_id], reason="joined after the roster was closed")
            groups = draw_groups(roster, group_seed(self.run_id, key, round), group_size)
            group = next(g for g in groups if self.peer_id in g)
            if len(group) == 1:
                return AverageResult(tensors, True, [self.peer_id])
            exchange = self.exchange.all_gather if codec.sparse else self.exchange.butterfly
            result = await exchange(key, round, group, x, p, weight, codec, tensors, timeout)
            for peer in self.exclusions.observe(group, result.outliers, self.peer_id):
                log.warning("excluding %s from groups for %d rounds: an outlier (%s) in %d consecutive rounds",
                            peer, self.exclusions.cooldown, self.reducer.spec, self.exclusions.after)
            await self.membership.publish_if_changed(self.bandwidth_estimate())
            if isinstance(compression, ErrorFeedback) and result.sent is not None:
                compression.absorb(key, p, result.sent[0])
            log.debug("%s/%s done in %.3f s", key, round, time.monotonic() - t0)
            return result
        except Exception as e:  # a round never raises into training: the caller keeps its tensors
            log.warning("round %s/%s failed: %s: %s", key, round, type(e).__name__, e)
            return AverageResult(tensors, False, [self.peer_id], reason=f"{type(e).__name__}: {e}")
        finally:
            self.exchange.end(key, round)


_open_swarms: weakref.WeakSet[Swarm] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for swarm in list(_open_swarms):
        swarm.close()
