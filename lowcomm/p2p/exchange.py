"""The exchange within one group, over a transport, and the upload rate it measures.

Dense codecs: butterfly. Member i sends shard j of its compressed
contribution to member j; member j reduces the shards that arrived by the
deadline in fp32 (with the swarm's reducer, weights renormalised over them),
compresses the result and sends it to every member. A member that gets no
mean of shard j from its reducer asks member (j + 1) mod n, the backup, to
reduce it from the parts the members without it still send; if no mean comes
from either, the shard keeps the local values (``shards_averaged`` says which
shards hold a mean of several members). A reducer's mean of its own part
alone (no other part arrived) is final all the same: every member that got
it holds the same values. Sparse codecs: all-gather of whole payloads.
Payloads are validated with `decode`; a peer whose payload is invalid is left
out and logged.

A member this node could not reach in a round (a send failed with
`PeerUnreachable`: refused, reset, gone; a timeout says nothing, the link may
just be slow) is not waited for in the rest of that round: its part, its
mean (its shard goes to the backup at once) and its backup mean. A member
killed mid-round then costs the others no deadline.

Members can end a round with different values: a reducer killed between its
sends of the mean leaves some members with its mean and others without.
`AverageResult.diverged` lists the shards whose values here may differ from
what the group's other live members hold (`_diverged` gives the rules), so
the node knows to catch up.

A node measures its upload rate on every phase that sends at least
`MEASURE_BYTES` (bytes sent over the phase's wall time, the sends in flight
together) and keeps a moving average (`UploadRate`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from lowcomm.averaging import AverageResult, shard_bounds, unflatten
from lowcomm.averaging.patterns import backup_reducer
from lowcomm.averaging.reduce import Reducer
from lowcomm.compressors import (
    Buffer, Compressor, Payload, WireFormatError, decode, decompress, decompress_into, encode_segments,
)
from lowcomm.p2p import messages
from lowcomm.p2p.membership import Membership
from lowcomm.p2p.transport import PeerUnreachable, Transport, message_size

log = logging.getLogger("lowcomm.p2p")

#: A phase that sends fewer bytes than this is not timed: latency would dominate.
MEASURE_BYTES = 1 << 20


class UploadRate:
    """This node's upload rate in bits/s: a moving average over measured phases,
    or ``assumed`` before the first measurement. A send that ran out of time
    halves it: the link is slower than the deadline was sized for, and a phase
    that timed out measures nothing, so without this a link slower than a
    quarter of the assumed rate would miss every deadline, round after round."""

    def __init__(self, assumed: float):
        self.assumed = assumed
        self._measured: float | None = None
        self._timed_out_phase: object = None

    def estimate(self) -> float:
        return self._measured if self._measured is not None else self.assumed

    def observe(self, sent: Sequence[int], seconds: float) -> None:
        """Fold one phase's upload (bytes of each send, wall seconds) into the
        estimate; a phase in which a send failed says nothing about the link."""
        nbytes = sum(sent)
        if nbytes < MEASURE_BYTES or seconds <= 0 or not all(sent):
            return
        rate = nbytes * 8 / seconds
        self._measured = rate if self._measured is None else 0.7 * self._measured + 0.3 * rate

    def timed_out(self, phase: object = None) -> None:
        """A send of ``phase`` (any token naming it) missed its deadline: halve the
        estimate, once per phase however many of its sends timed out."""
        if phase is not None and phase == self._timed_out_phase:
            return
        self._timed_out_phase = phase
        self._measured = self.estimate() / 2


@dataclass
class _Part:
    """A packed part message: its round, what it is (for logs) and its segments."""

    key: str
    round: int
    what: str
    segments: list[Buffer]

    @property
    def size(self) -> int:
        return message_size(self.segments)


@dataclass
class _Inbox:
    """Messages received for one (key, round), by (phase, shard, sender), and the
    members this node could not reach in that round (not waited for)."""

    created: float
    items: dict[tuple[str, int, str], dict] = field(default_factory=dict)
    gone: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class GroupExchange:
    """Part messages in and out, and the two group patterns (runs on the swarm's loop).

    Args:
        transport: the node's `Transport` (part messages go over it).
        run_id: the training run; parts of other runs are refused.
        reducer: combines the members' parts of a shard (`lowcomm.averaging.reduce`).
        membership: told of peers that could not be reached and of peers heard from.
        upload: fed the bytes and seconds of every sending phase.
    """

    def __init__(self, transport: Transport, run_id: str, reducer: Reducer, membership: Membership,
                 upload: UploadRate):
        self.transport, self.run_id, self.reducer = transport, run_id, reducer
        self.membership, self.upload = membership, upload
        self._active: set[tuple[str, int]] = set()  # (key, round) of the rounds in flight here
        self._inboxes: dict[tuple[str, int], _Inbox] = {}

    @property
    def peer_id(self) -> str:
        return self.transport.peer_id  # read late: a transport knows its id once started

    async def serve(self) -> None:
        """Accept other members' part messages."""
        await self.transport.serve(messages.PROTOCOL_PART, self._on_part)

    # --- rounds in flight and their inboxes ---
    def begin(self, key: str, round: int) -> None:
        """``(key, round)`` is in flight here: what arrives for it is kept until `end`."""
        self._active.add((key, round))

    def end(self, key: str, round: int) -> None:
        """``(key, round)`` is over here: drop what arrived for it."""
        self._active.discard((key, round))
        self._inboxes.pop((key, round), None)

    def _inbox(self, key: str, round: int) -> _Inbox:
        return self._inboxes.setdefault((key, round), _Inbox(time.monotonic()))

    def forget_idle(self) -> None:
        """Drop the messages buffered for rounds not in flight here."""
        for k in [k for k in self._inboxes if k not in self._active]:
            del self._inboxes[k]

    def prune(self, cutoff: float) -> None:
        """Drop the inboxes opened before ``cutoff`` (`time.monotonic` seconds)."""
        for k in [k for k, box in self._inboxes.items() if box.created < cutoff]:
            del self._inboxes[k]

    # --- messages ---
    async def _on_part(self, sender: str, data: bytes) -> bytes:
        msg = messages.unpack("part", data)
        self.membership.heard_from(sender)
        if msg["run"] != self.run_id:
            raise PeerUnreachable("wrong run")
        box = self._inbox(msg["key"], msg["round"])
        msg["size"] = len(data)
        box.items[(msg["phase"], msg["shard"], sender)] = msg
        box.changed.set()
        return b"ok"

    def _part(self, key: str, round: int, phase: str, shard: int, weight: float, contributors: list[str],
              blob: list[Buffer], outliers: Sequence[str] = ()) -> _Part:
        """A part message, packed once (it may go to several peers)."""
        return _Part(key, round, f"{key}/{round} {phase} shard {shard}",
                     messages.pack_part(blob, run=self.run_id, key=key, round=round, phase=phase, shard=shard,
                                        weight=weight, contributors=contributors, outliers=list(outliers)))

    async def _send(self, peer: str, part: _Part, timeout: float, phase: object = None) -> int:
        """Send a part message; returns the bytes sent (0 if the peer could not be
        reached). A peer that could not be reached (not one that timed out) is
        not waited for in the rest of the round. ``phase`` names the phase for
        `UploadRate.timed_out`."""
        try:
            await self.transport.request(peer, messages.PROTOCOL_PART, part.segments, timeout=timeout)
            return part.size
        except (PeerUnreachable, asyncio.TimeoutError) as e:
            log.info("could not send %s to %s: %s", part.what, peer, e)
            if isinstance(e, PeerUnreachable):
                self.membership.suspect(peer)
                box = self._inbox(part.key, part.round)
                box.gone.add(peer)
                box.changed.set()  # wake `_collect`: one less sender to wait for
            else:
                self.upload.timed_out(phase)
            return 0

    async def _collect(self, key: str, round: int, wanted: set[tuple[str, int, str]], deadline: float) -> dict:
        """Wait until every wanted (phase, shard, sender) arrived, but for those of
        senders found unreachable in this round, or the deadline passed; returns
        those that arrived."""
        box = self._inbox(key, round)
        while not {w for w in wanted if w[2] not in box.gone} <= box.items.keys():
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

    @staticmethod
    async def _run(fn, *args):
        """``fn(*args)`` in a worker thread (decoding and reducing: the loop keeps serving)."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    # --- the group patterns ---
    async def butterfly(self, key: str, round: int, group: list[str], x: torch.Tensor, p: torch.Tensor,
                        weight: float, codec: Compressor, tensors: list[torch.Tensor],
                        timeout: float) -> AverageResult:
        """Reduce-scatter then all-gather of ``p`` (``x`` compensated) over ``group``
        (sorted, self included); each phase gets ``timeout`` seconds. Shards no
        reducer answered for keep ``x``'s values; ``tensors`` give the shapes."""
        me, n = group.index(self.peer_id), len(group)
        bounds = shard_bounds(x.numel(), n)

        t0 = time.monotonic()
        packed = await self._run(lambda: [self._pack(codec, p[lo:hi]) for lo, hi in bounds])
        blobs, mine = [blob for blob, _ in packed], [decoded for _, decoded in packed]
        parts_out = [self._part(key, round, "part", j, weight, [], blob) for j, blob in enumerate(blobs)]
        start = time.monotonic()
        sent = await asyncio.gather(*(self._send(group[j], parts_out[j], timeout, (key, round, "part"))
                                      for j in range(n) if j != me))
        bytes_sent = sum(sent)
        self.upload.observe(sent, time.monotonic() - start)
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
        sent2 = await asyncio.gather(*(self._send(g, mean_part, timeout, (key, round, "mean"))
                                       for g in group if g != self.peer_id))
        bytes_sent += sum(sent2)
        self.upload.observe(sent2, time.monotonic() - t2)
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
        backups: dict[int, list[str]] = {}  # shard -> contributors of the backup's mean held here
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
                    if msg["phase"] == "bmean":
                        backups[j] = list(msg["contributors"])
                    who |= set(msg["contributors"]) if averaged[j] else set()
                    outliers.update(msg["outliers"])

        await apply([(j, msg, sender) for (_, j, sender), msg in means.items()])
        # backup reducers: shard j whose reducer's mean did not come is reduced by member (j + 1) mod n
        missing = [j for j in range(n) if not filled[j]]
        mine_to_back = [j for j in missing if backup_reducer(j, n) != me]
        sends = [self._send(group[backup_reducer(j, n)], self._part(key, round, "bpart", j, weight, [], blobs[j]),
                            timeout)
                 for j in mine_to_back]
        for j in [j for j in missing if backup_reducer(j, n) == me]:
            sends.append(self._back_up(key, round, j, group, bounds, parts, weight, mine[j], codec, start, timeout))
        if sends:
            results = await asyncio.gather(*sends)
            bytes_sent += sum(r if isinstance(r, int) else r[0] for r in results)
            received += sum(0 if isinstance(r, int) else r[1] for r in results)
            await apply([(*r[2], self.peer_id) for r in results if not isinstance(r, int) and r[2] is not None])
            backed = await self._collect(key, round, {("bmean", j, group[backup_reducer(j, n)]) for j in mine_to_back},
                                         start + 3 * timeout)
            received += sum(m["size"] for m in backed.values())
            await apply([(j, msg, sender) for (_, j, sender), msg in backed.items()])
        for j in [j for j in range(n) if not filled[j]]:  # no reducer answered: the local values
            a, b = bounds[j]
            out[a:b] = x[a:b]
        diverged = _diverged(group, me, self._inbox(key, round).gone, filled, backups, any(sent2))
        if diverged:
            log.info("%s/%s: shards %s here may differ from the group's", key, round, diverged)
        reason = "" if all(averaged) and not diverged else (
            f"shards {diverged} may differ from the group's" if diverged else "some shards were not averaged")
        return AverageResult(unflatten(out, tensors), any(averaged), sorted(who | {self.peer_id}),
                             bytes_sent=bytes_sent, bytes_received=received,
                             sent=[p if codec.exact else torch.cat(mine)],
                             shards_averaged=averaged, outliers=sorted(outliers), diverged=diverged, reason=reason)

    async def _back_up(self, key, round, j, group, bounds, alive, weight, own, codec, start, timeout):
        """Reduce shard j for a failed reducer: from this member's own part and the
        parts of the members whose part of this member's own shard arrived (a
        member that holds the reducer's mean sends none: it is waited for until
        2.5 deadlines, so that the mean reaches the others before their 3).
        Returns (bytes sent, bytes received, (j, mean message) or None: no other
        member's part came, so there is nothing to average)."""
        a, b = bounds[j]
        expected = {("bpart", j, g) for g in alive if g not in (self.peer_id, group[j])}
        got = await self._collect(key, round, expected, start + 2.5 * timeout)
        received = sum(m["size"] for m in got.values())
        parts = await self._accept(got, b - a, {self.peer_id: (weight, own)})
        if len(parts) == 1:
            return 0, received, None
        blob, _, flagged = await self._run(self._reduce, codec, parts)
        contributors = sorted(parts)
        part = self._part(key, round, "bmean", j, weight, contributors, blob, flagged)
        sent = await asyncio.gather(*(self._send(g, part, timeout) for g in parts if g != self.peer_id))
        own_msg = {"blob": b"".join(blob), "contributors": contributors, "phase": "bmean", "outliers": flagged}
        return sum(sent), received, (j, own_msg)

    async def all_gather(self, key: str, round: int, group: list[str], x: torch.Tensor, p: torch.Tensor,
                         weight: float, codec: Compressor, tensors: list[torch.Tensor],
                         timeout: float) -> AverageResult:
        """Every member's whole payload to every other member, each reducing them all
        (sparse codecs); the arguments are `butterfly`'s. The result has diverged
        (``diverged == [0]``: the whole vector) when the payload of a member this
        node could reach did not come: the others may have reduced it."""
        blob, mine = await self._run(self._pack, codec, p)
        part = self._part(key, round, "full", 0, weight, [], blob)
        start = time.monotonic()
        sent = await asyncio.gather(*(self._send(g, part, timeout, (key, round, "full"))
                                      for g in group if g != self.peer_id))
        self.upload.observe(sent, time.monotonic() - start)
        got = await self._collect(key, round, {("full", 0, g) for g in group if g != self.peer_id},
                                  start + timeout)
        parts = await self._accept(got, x.numel(), {self.peer_id: (weight, mine)})
        reduced = await self._run(self.reducer.reduce, parts)
        gone = self._inbox(key, round).gone
        silent = [g for g in group if g != self.peer_id and g not in gone and ("full", 0, g) not in got]
        return AverageResult(unflatten(reduced.value, tensors), len(parts) > 1, sorted(parts), bytes_sent=sum(sent),
                             bytes_received=sum(m["size"] for m in got.values()), sent=[mine],
                             outliers=reduced.outliers, diverged=[0] if silent else [],
                             reason=f"no payload from {silent}" if silent else "")


def _diverged(group: list[str], me: int, gone: set[str], filled: list[bool], backups: dict[int, list[str]],
              mean_delivered: bool) -> list[int]:
    """The shards whose values at member ``me`` of ``group`` may differ from what the
    group's other live members (those not in ``gone``) hold; none when no other
    member is live. Such a shard is

    - ``me``'s own, when its mean reached no other member (``mean_delivered``
      False): they back it up or keep their own values;
    - one no mean of came (``filled`` False): it kept its own values;
    - one it holds the backup's mean of (``backups``: shard -> contributors of
      that mean), when a live member other than the shard's reducer is not among
      the contributors: only members without the reducer's mean send parts to the
      backup, so that member may hold the reducer's mean.

    A shard it holds its reducer's mean of is the group's (a mean of the reducer's
    own part alone too: every member that got it holds the same values); a member
    that missed it finds that out for itself.
    """
    others = {g for g in group if g != group[me] and g not in gone}
    if not others:
        return []
    out = []
    for j in range(len(group)):
        if j == me:
            apart = not mean_delivered
        elif not filled[j]:
            apart = True
        else:
            apart = j in backups and bool(others - set(backups[j]) - {group[j]})
        if apart:
            out.append(j)
    return out
