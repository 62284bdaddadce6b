"""`Swarm`: the Averager protocol over real peers, on any `Transport`.

    with Swarm.create(run_id="demo") as swarm:            # the first node
        print(swarm.addrs())
    with Swarm.join(["/ip4/.../p2p/..."], run_id="demo") as swarm:
        handle = swarm.average("k", tensors, round=0)

How a round ``(key, round)`` goes:

1. **Membership.** Every node publishes a record under ``<run>/members`` with
   a short TTL and refreshes it: its addresses, the highest round it has
   started and its measured upload rate. Nodes that stop refreshing drop out.
2. **Matchmaking.** The live member with the smallest peer id leads. Each
   node sends it JOIN(key, round); the leader answers every JOIN with the
   roster once every live member has joined, or ``window`` seconds after the
   first JOIN. A node that joins after that is told the roster without it and
   gets its own tensors back (it takes part from the next round). If the
   leader cannot be reached, the next smallest leads. A peer that cannot be
   reached is not waited for or asked to lead until its membership record
   could have expired, or until it is heard from again. (A leader that dies
   just as it closes a roster may take some answers with it: those members
   run the round under the next leader, apart from the others.)
3. **Groups** are drawn from the roster and the round seed
   (`lowcomm.averaging.draw_groups`), identically on every member.
4. **Exchange.** Dense codecs: butterfly. Member i sends shard j of its
   compressed contribution to member j; member j averages the shards that
   arrived by the deadline in fp32 (weights renormalised over them),
   compresses the mean and sends it to every member. A shard whose reducer
   fails is reduced instead by member (j + 1) mod n from the parts it can
   still get; if that one fails too, the shard keeps the local values
   (``shards_averaged`` says which). Sparse
   codecs: all-gather of whole payloads. Payloads are validated with
   `decode`; a peer whose payload is invalid is left out and logged.
5. **Deadlines** come from the payload size and a bandwidth: each phase gets
   ``base_timeout`` plus 4x the time the whole payload takes at the slowest of
   this node's measured upload rate and the rates the group's members publish
   in their membership records (never below ``min_bandwidth``). Until a node
   has measured anything it assumes ``bandwidth`` (100 Mbit/s), so the
   defaults hold on loopback and on 100 Mbit/s links, and a slower link
   lengthens every deadline after its first round. A node measures its rate
   on every phase that sends at least `MEASURE_BYTES` (bytes sent over the
   phase's wall time, the sends in flight together) and keeps a moving
   average (`bandwidth_estimate`).

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
from dataclasses import dataclass, field
from typing import Sequence

import msgpack
import torch

from lowcomm.averaging import (
    AverageResult, Compression, check_group_size, draw_groups, flatten, group_seed, shard_bounds, unflatten,
)
from lowcomm.averaging.exclusion import Exclusions
from lowcomm.averaging.reduce import get_reducer
from lowcomm.compressors import (
    Buffer, Compressor, ErrorFeedback, Payload, WireFormatError, decode, decompress, decompress_into,
    encode_segments, get_compressor, wire_size,
)
from lowcomm.p2p import messages
from lowcomm.p2p.private import make_private
from lowcomm.p2p.transport import PeerUnreachable, Transport, message_size

log = logging.getLogger("lowcomm.p2p")


class _ClosedLoopChildFilter(logging.Filter):
    """A daemon that exits after its swarm's loop closed (a failed start) makes
    asyncio's child watcher warn "Loop ... that handles pid N is closed": the
    process is already gone and nothing is lost, so the line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "that handles pid" not in record.getMessage()


logging.getLogger("asyncio").addFilter(_ClosedLoopChildFilter())


@dataclass
class _Lobby:
    """The leader's view of one (key, round)."""

    joined: dict[str, float] = field(default_factory=dict)
    first: float = 0.0
    roster: list[str] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class _Part:
    """A packed part message: what it is (for logs) and its segments."""

    what: str
    segments: list[Buffer]

    @property
    def size(self) -> int:
        return message_size(self.segments)


@dataclass
class _Inbox:
    """Messages received for one (key, round), by (phase, shard, sender)."""

    created: float
    items: dict[tuple[str, int, str], dict] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


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
    """An `Averager` over real peers (see the module docstring).

    Args:
        transport: a `Transport` (not started yet).
        run_id: the training run; nodes of other runs are ignored.
        membership_ttl: seconds a membership record lives without refresh [10].
        window: seconds the leader waits for missing members after the first JOIN [5].
        base_timeout: fixed part of every deadline, in seconds [10].
        bandwidth: upload rate in bits/s assumed until one is measured [100e6].
        min_bandwidth: the least rate, in bits/s, a deadline is ever sized for [1e6].
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
        self._measured: float | None = None  # bits/s, moving average of this node's phases
        self._announced = bandwidth  # the rate in this node's last membership record
        #: The highest round this node has started averaging (-1: none yet); published with its membership.
        self.round = -1
        self._published: dict[str, float] = {}  # member -> the rate its record states
        self._members: list[str] = []
        self._suspects: dict[str, float] = {}  # peer -> until when it is not waited for
        self._lobbies: dict[tuple[str, int], _Lobby] = {}
        self._active: set[tuple[str, int]] = set()  # (key, round) of the rounds in flight here
        self._inboxes: dict[tuple[str, int], _Inbox] = {}
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
    def known_members(self) -> list[str]:
        """Live members (self included) as of the last membership refresh (no network)."""
        return list(self._members)

    def members(self) -> list[str]:
        """Live members (self included), freshly read from the membership store."""
        return self.call(self._refresh_members(), timeout=30)

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

    # --- lifecycle ---
    async def _start(self) -> None:
        await self.transport.start()
        await self.transport.serve(messages.PROTOCOL_JOIN, self._on_join)
        await self.transport.serve(messages.PROTOCOL_PART, self._on_part)
        await self._publish()
        await self._refresh_members()
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

    async def _publish(self) -> None:
        self._announced = self.bandwidth_estimate()
        record = msgpack.packb({"addrs": self.transport.addrs(), "time": time.time(), "bandwidth": self._announced,
                                "round": self.round})
        await self.transport.put(f"{self.run_id}/members", self.peer_id, record, self.membership_ttl)

    async def _refresh_members(self) -> list[str]:
        records = await self.transport.get(f"{self.run_id}/members")
        self._members = sorted(set(records) | {self.peer_id})
        self._published = {peer: rate for peer, record in records.items()
                           if (rate := _published_rate(record)) is not None}
        return list(self._members)

    # --- bandwidth and deadlines ---
    def bandwidth_estimate(self) -> float:
        """This node's upload rate in bits/s: measured (a moving average over
        phases), or the assumed ``bandwidth`` before the first measurement."""
        return self._measured if self._measured is not None else self.bandwidth

    def _observe(self, sent: Sequence[int], seconds: float) -> None:
        """Fold one phase's upload (bytes of each send, wall seconds) into the
        estimate; a phase in which a send failed says nothing about the link."""
        nbytes = sum(sent)
        if nbytes < MEASURE_BYTES or seconds <= 0 or not all(sent):
            return
        rate = nbytes * 8 / seconds
        self._measured = rate if self._measured is None else 0.7 * self._measured + 0.3 * rate

    def deadline_bandwidth(self) -> float:
        """The rate deadlines are sized for: the slowest of this node's estimate and
        the rates the other members publish, at least ``min_bandwidth``."""
        rates = [self.bandwidth_estimate()] + [self._published[p] for p in self._members
                                               if p != self.peer_id and p in self._published]
        return max(self.min_bandwidth, min(rates))

    def _timeout(self, codec: Compressor, numel: int) -> float:
        """Seconds for one phase: fixed part plus 4x the whole payload's transfer time."""
        return self.base_timeout + 4 * wire_size(codec, numel) * 8 / self.deadline_bandwidth()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.membership_ttl / 3)
            try:
                await self._publish()
                await self._refresh_members()
            except Exception as e:  # keep refreshing through transient faults
                log.warning("membership refresh failed: %s", e)
            now = time.monotonic()
            for k in [k for k, box in self._inboxes.items() if now - box.created > 600]:
                del self._inboxes[k]
            for k in [k for k, lobby in self._lobbies.items() if lobby.roster is not None and now - lobby.first > 600]:
                del self._lobbies[k]

    def forget_rounds(self) -> None:
        """Forget closed rosters, and messages buffered for rounds not in flight here,
        after this node's state moved to another round (a catch-up): a round it
        goes back to is run anew. Lobbies still gathering stay: other peers' JOINs
        for a coming round wait in them (dropping those left this node to lead
        that round alone while they were answered without it, round after round)."""
        def forget():
            for k in [k for k, lobby in self._lobbies.items() if lobby.roster is not None]:
                del self._lobbies[k]
            for k in [k for k in self._inboxes if k not in self._active]:
                del self._inboxes[k]
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
        self.round = max(self.round, round)
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
        self._active.add((key, round))
        try:
            t0 = time.monotonic()
            roster = await self._matchmake(key, round, group_size or 0, weight, timeout)
            log.debug("%s/%s matchmaking %.3f s: %d in the roster", key, round, time.monotonic() - t0, len(roster))
            if self.peer_id not in roster:
                return AverageResult(tensors, False, [self.peer_id], reason="joined after the roster was closed")
            groups = draw_groups(roster, group_seed(self.run_id, key, round), group_size)
            group = next(g for g in groups if self.peer_id in g)
            if len(group) == 1:
                return AverageResult(tensors, True, [self.peer_id])
            exchange = self._all_gather if codec.sparse else self._butterfly
            result = await exchange(key, round, group, x, p, weight, codec, tensors, timeout)
            for peer in self.exclusions.observe(group, result.outliers, self.peer_id):
                log.warning("excluding %s from groups for %d rounds: an outlier (%s) in %d consecutive rounds",
                            peer, self.exclusions.cooldown, self.reducer.spec, self.exclusions.after)
            if abs(self.bandwidth_estimate() - self._announced) > 0.25 * self._announced:
                await self._publish()  # others size their deadlines by it: tell them now, not at the next refresh
            if isinstance(compression, ErrorFeedback) and result.sent is not None:
                compression.absorb(key, p, result.sent[0])
            log.debug("%s/%s done in %.3f s", key, round, time.monotonic() - t0)
            return result
        except Exception as e:  # a round never raises into training: the caller keeps its tensors
            log.warning("round %s/%s failed: %s: %s", key, round, type(e).__name__, e)
            return AverageResult(tensors, False, [self.peer_id], reason=f"{type(e).__name__}: {e}")
        finally:
            self._active.discard((key, round))
            self._inboxes.pop((key, round), None)

    # --- matchmaking ---
    def _suspect(self, peer: str) -> None:
        """Stop waiting for ``peer`` (or asking it to lead) until its membership record could have expired."""
        self._suspects[peer] = time.monotonic() + self.membership_ttl

    def _expected(self) -> list[str]:
        now = time.monotonic()
        return [m for m in self._members if self._suspects.get(m, 0) < now]

    async def _matchmake(self, key: str, round: int, group_size: int, weight: float, timeout: float) -> list[str]:
        request = messages.pack("join", run=self.run_id, key=key, round=round, group_size=group_size, weight=weight)
        for leader in self._expected():
            if leader == self.peer_id:
                return await self._lead(self.peer_id, key, round, weight)
            try:
                reply = await self.transport.request(leader, messages.PROTOCOL_JOIN, request,
                                                     timeout=self.window + timeout)
                return messages.unpack("roster", reply)["roster"]
            except (PeerUnreachable, asyncio.TimeoutError, WireFormatError) as e:
                log.info("leader %s unreachable for %s/%s (%s); trying the next", leader, key, round, e)
                if isinstance(e, PeerUnreachable):
                    self._suspect(leader)
        return [self.peer_id]

    async def _lead(self, peer: str, key: str, round: int, weight: float) -> list[str]:
        lobby = self._lobbies.setdefault((key, round), _Lobby())
        if lobby.roster is not None:
            return lobby.roster
        if not lobby.joined:
            lobby.first = time.monotonic()
            self._spawn(self._close_lobby_later(key, round, lobby))
        lobby.joined[peer] = weight
        if set(self._expected()) <= set(lobby.joined):
            self._close_lobby(lobby)
        await lobby.done.wait()
        return lobby.roster

    async def _close_lobby_later(self, key: str, round: int, lobby: _Lobby) -> None:
        await asyncio.sleep(self.window)
        if lobby.roster is None:
            log.info("round %s/%s closes without %s", key, round,
                     sorted(set(self._expected()) - set(lobby.joined)))
            self._close_lobby(lobby)

    def _close_lobby(self, lobby: _Lobby) -> None:
        """The roster: who joined, less the members this leader excludes as outliers."""
        lobby.roster = sorted(p for p in lobby.joined if not self.exclusions.is_excluded(p))
        lobby.done.set()

    async def _on_join(self, sender: str, data: bytes) -> bytes:
        msg = messages.unpack("join", data)
        self._suspects.pop(sender, None)  # alive after all
        if msg["run"] != self.run_id:
            return messages.pack("roster", roster=[], reason=f"this node is in run {self.run_id!r}")
        roster = await self._lead(sender, msg["key"], msg["round"], msg["weight"])
        return messages.pack("roster", roster=roster, reason="")

    # --- exchange ---
    async def _on_part(self, sender: str, data: bytes) -> bytes:
        msg = messages.unpack("part", data)
        self._suspects.pop(sender, None)
        if msg["run"] != self.run_id:
            raise PeerUnreachable("wrong run")
        box = self._inboxes.setdefault((msg["key"], msg["round"]), _Inbox(time.monotonic()))
        msg["size"] = len(data)
        box.items[(msg["phase"], msg["shard"], sender)] = msg
        box.changed.set()
        return b"ok"

    def _part(self, key: str, round: int, phase: str, shard: int, weight: float, contributors: list[str],
              blob: list[Buffer], outliers: Sequence[str] = ()) -> _Part:
        """A part message, packed once (it may go to several peers)."""
        return _Part(f"{key}/{round} {phase} shard {shard}",
                     messages.pack_part(blob, run=self.run_id, key=key, round=round, phase=phase, shard=shard,
                                        weight=weight, contributors=contributors, outliers=list(outliers)))

    async def _send(self, peer: str, part: _Part, timeout: float) -> int:
        """Send a part message; returns the bytes sent (0 if the peer could not be reached)."""
        try:
            await self.transport.request(peer, messages.PROTOCOL_PART, part.segments, timeout=timeout)
            return part.size
        except (PeerUnreachable, asyncio.TimeoutError) as e:
            log.info("could not send %s to %s: %s", part.what, peer, e)
            if isinstance(e, PeerUnreachable):
                self._suspect(peer)
            return 0

    async def _collect(self, key: str, round: int, wanted: set[tuple[str, int, str]], deadline: float) -> dict:
        """Wait until every wanted (phase, shard, sender) arrived or the deadline passed."""
        box = self._inboxes.setdefault((key, round), _Inbox(time.monotonic()))
        while not wanted <= set(box.items):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            box.changed.clear()
            try:
                await asyncio.wait_for(box.changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        return {k: box.items[k] for k in wanted if k in box.items}

    @staticmethod
    def _validate(msg: dict, numel: int, sender: str) -> Payload | None:
        """The message's payload if it is valid and has ``numel`` values; None (logged) otherwise."""
        try:
            payload = decode(msg["blob"])
            if payload.numel != numel:
                raise WireFormatError(f"payload has {payload.numel} values, expected {numel}")
            return payload
        except WireFormatError as e:
            log.warning("dropping %s's %s payload: %s", sender, msg["phase"], e)
            return None

    @classmethod
    def _decode(cls, msg: dict, numel: int, sender: str) -> torch.Tensor | None:
        payload = cls._validate(msg, numel, sender)
        return None if payload is None else decompress(payload).to(torch.float32).reshape(-1)

    async def _accept(self, got: dict, numel: int, parts: dict) -> dict:
        """Add the valid payloads of ``got`` to ``parts`` (sender -> (weight, values));
        invalid ones and non-positive weights are left out."""
        decoded = await asyncio.gather(*(self._run(self._decode, msg, numel, sender)
                                         for (_, _, sender), msg in got.items()))
        for ((_, _, sender), msg), value in zip(got.items(), decoded):
            if value is not None and msg["weight"] > 0:
                parts[sender] = (msg["weight"], value)
        return parts

    @staticmethod
    def _pack(codec: Compressor, x: torch.Tensor) -> tuple[list[Buffer], torch.Tensor]:
        """``x`` (the swarm's own, never written again) compressed for the wire:
        (blob segments, what they decompress to in fp32). ``none`` copies nothing."""
        payload = codec.compress_owned(x)
        return encode_segments(payload), x if codec.exact else codec.decompress(payload).float().reshape(-1)

    def _reduce(self, codec: Compressor, parts: dict) -> tuple[list[Buffer], torch.Tensor, list[str]]:
        """``parts`` combined by the swarm's reducer, compressed once (see `_pack`),
        and the members it flagged."""
        reduced = self.reducer.reduce(parts)
        blob, mean = self._pack(type(codec)(**codec.options()), reduced.value)
        return blob, mean, reduced.outliers

    async def _run(self, fn, *args):
        return await self.loop.run_in_executor(None, fn, *args)

    async def _butterfly(self, key, round, group, x, p, weight, codec, tensors, timeout) -> AverageResult:
        me, n = group.index(self.peer_id), len(group)
        bounds = shard_bounds(x.numel(), n)

        t0 = time.monotonic()
        packed = await self._run(lambda: [self._pack(codec, p[lo:hi]) for lo, hi in bounds])
        blobs, mine = [blob for blob, _ in packed], [decoded for _, decoded in packed]
        parts_out = [self._part(key, round, "part", j, weight, [], blob) for j, blob in enumerate(blobs)]
        start = time.monotonic()
        sent = await asyncio.gather(*(self._send(group[j], parts_out[j], timeout) for j in range(n) if j != me))
        bytes_sent = sum(sent)
        self._observe(sent, time.monotonic() - start)
        lo, hi = bounds[me]
        got = await self._collect(key, round, {("part", me, g) for g in group if g != self.peer_id},
                                  start + timeout)
        received = sum(m["size"] for m in got.values())
        parts = await self._accept(got, hi - lo, {self.peer_id: (weight, mine[me])})
        contributors = sorted(parts)
        t1 = time.monotonic()
        mean_blob, mean, flagged = await self._run(self._reduce, codec, parts)
        outliers = set(flagged)
        mean_part = self._part(key, round, "mean", me, weight, contributors, mean_blob, flagged)
        t2 = time.monotonic()
        sent2 = await asyncio.gather(*(self._send(g, mean_part, timeout) for g in group if g != self.peer_id))
        bytes_sent += sum(sent2)
        self._observe(sent2, time.monotonic() - t2)
        means = await self._collect(key, round, {("mean", j, group[j]) for j in range(n) if j != me},
                                    start + 2 * timeout)
        received += sum(m["size"] for m in means.values())
        t3 = time.monotonic()
        log.debug("%s/%s butterfly: compress %.3f s, parts %.3f s, reduce %.3f s, means %.3f s", key, round,
                  start - t0, t1 - start, t2 - t1, t3 - t2)
        out = torch.empty_like(x)
        out[lo:hi] = mean
        averaged, filled = [False] * n, [False] * n
        averaged[me], filled[me] = len(parts) > 1, True
        who = set(contributors) if len(parts) > 1 else set()

        def fill(j: int, msg: dict, sender: str) -> bool:
            """Write shard j's mean from ``msg`` into ``out`` (a worker thread; shards are disjoint)."""
            a, b = bounds[j]
            payload = self._validate(msg, b - a, sender)
            if payload is not None:
                decompress_into(payload, out[a:b])
            return payload is not None

        async def apply(items: list[tuple[int, dict, str]]) -> None:
            nonlocal who
            ok = await asyncio.gather(*(self._run(fill, j, msg, sender) for j, msg, sender in items))
            for (j, msg, _), good in zip(items, ok):
                if good:
                    filled[j], averaged[j] = True, len(msg["contributors"]) > 1
                    who |= set(msg["contributors"]) if averaged[j] else set()
                    outliers.update(msg["outliers"])

        await apply([(j, msg, sender) for (_, j, sender), msg in means.items()])
        # backup reducers: shard j whose reducer failed is reduced by member (j + 1) mod n
        missing = [j for j in range(n) if j != me and not averaged[j]]
        mine_to_back = [j for j in missing if (j + 1) % n != me]
        sends = [self._send(group[(j + 1) % n], self._part(key, round, "bpart", j, weight, [], blobs[j]), timeout)
                 for j in mine_to_back]
        for j in [j for j in missing if (j + 1) % n == me]:
            sends.append(self._back_up(key, round, j, group, bounds, parts, weight, mine[j], codec, start, timeout))
        if sends:
            results = await asyncio.gather(*sends)
            bytes_sent += sum(r if isinstance(r, int) else r[0] for r in results)
            received += sum(0 if isinstance(r, int) else r[1] for r in results)
            await apply([(*r[2], self.peer_id) for r in results if not isinstance(r, int) and r[2] is not None])
            backups = await self._collect(key, round, {("bmean", j, group[(j + 1) % n]) for j in mine_to_back},
                                          start + 3 * timeout)
            received += sum(m["size"] for m in backups.values())
            await apply([(j, msg, sender) for (_, j, sender), msg in backups.items()])
        for j in [j for j in range(n) if not filled[j]]:  # no reducer answered: the local values
            a, b = bounds[j]
            out[a:b] = x[a:b]
        return AverageResult(unflatten(out, tensors), any(averaged), sorted(who | {self.peer_id}),
                             bytes_sent=bytes_sent, bytes_received=received,
                             sent=[p if codec.exact else torch.cat(mine)],
                             shards_averaged=averaged, outliers=sorted(outliers),
                             reason="" if all(averaged) else "some shards kept local values")

    async def _back_up(self, key, round, j, group, bounds, alive, weight, own, codec, start, timeout):
        """Reduce shard j for a failed reducer: from this member's own part and the
        parts of the members whose part of this member's own shard arrived.
        Returns (bytes sent, bytes received, (j, mean message) or None)."""
        a, b = bounds[j]
        expected = {("bpart", j, g) for g in alive if g not in (self.peer_id, group[j])}
        got = await self._collect(key, round, expected, start + 3 * timeout)
        parts = await self._accept(got, b - a, {self.peer_id: (weight, own)})
        blob, _, flagged = await self._run(self._reduce, codec, parts)
        contributors = sorted(parts)
        part = self._part(key, round, "bmean", j, weight, contributors, blob, flagged)
        sent = await asyncio.gather(*(self._send(g, part, timeout) for g in parts if g != self.peer_id))
        own_msg = {"blob": b"".join(blob), "contributors": contributors, "phase": "bmean", "outliers": flagged}
        return sum(sent), sum(m["size"] for m in got.values()), (j, own_msg)

    async def _all_gather(self, key, round, group, x, p, weight, codec, tensors, timeout) -> AverageResult:
        blob, mine = await self._run(self._pack, codec, p)
        part = self._part(key, round, "full", 0, weight, [], blob)
        start = time.monotonic()
        sent = await asyncio.gather(*(self._send(g, part, timeout) for g in group if g != self.peer_id))
        self._observe(sent, time.monotonic() - start)
        got = await self._collect(key, round, {("full", 0, g) for g in group if g != self.peer_id},
                                  start + timeout)
        parts = await self._accept(got, x.numel(), {self.peer_id: (weight, mine)})
        reduced = await self._run(self.reducer.reduce, parts)
        return AverageResult(unflatten(reduced.value, tensors), len(parts) > 1, sorted(parts), bytes_sent=sum(sent),
                             bytes_received=sum(m["size"] for m in got.values()), sent=[mine],
                             outliers=reduced.outliers)


#: A phase that sends fewer bytes than this is not timed: latency would dominate.
MEASURE_BYTES = 1 << 20


def _published_rate(record: bytes) -> float | None:
    """The bandwidth a membership record states, or None when it states none that
    makes sense (records come from other peers: never trusted blindly)."""
    try:
        rate = msgpack.unpackb(record, raw=False, max_str_len=4096, max_array_len=64, max_map_len=16)["bandwidth"]
    except Exception:  # malformed or older records: no rate
        return None
    return float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 < rate < 1e15 \
        else None


_open_swarms: weakref.WeakSet[Swarm] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for swarm in list(_open_swarms):
        swarm.close()
