"""Who is in the swarm: membership records with a TTL, and the peers not waited for.

Every node publishes a record under ``<run>/members`` with a short TTL and
refreshes it: its addresses, the highest round it has started and its
upload rate (bits/s, which the others size their deadlines by). Nodes that
stop refreshing drop out. A transport with ``learn_addrs(peer, addrs)`` is
told every member's addresses, so it can dial members directly rather than
rely on its own routing. A peer that could not be reached is a suspect: it
is not waited for, or asked to lead, until its record could have expired,
until it is heard from again, or until it publishes a new record (a restarted
node republishes at once, and a live one every ``ttl / 3``): a node that was
down for a moment and came back is expected again from the next refresh on,
instead of leading a round of its own while the others skip it.
"""

from __future__ import annotations

import time

import msgpack

from lowcomm.p2p.transport import Transport


class Membership:
    """This node's membership record and its view of the live members.

    Args:
        transport: the node's `Transport` (its key-value store holds the records).
        run_id: the training run; records live under ``<run_id>/members``.
        ttl: seconds a record lives without a refresh.
    """

    def __init__(self, transport: Transport, run_id: str, ttl: float):
        self.transport, self.run_id, self.ttl = transport, run_id, ttl
        #: The highest round this node has started averaging (-1: none yet); published with its record.
        self.round = -1
        self._announced: float | None = None  # the rate in this node's last record, bits/s
        self._members: list[str] = []
        self._published: dict[str, float] = {}  # member -> the rate its record states
        self._suspects: dict[str, tuple[float, float | None]] = {}  # peer -> (until when, its record's time then)
        self._times: dict[str, float] = {}  # member -> the "time" its record states, as of the last refresh

    @property
    def peer_id(self) -> str:
        return self.transport.peer_id  # read late: a transport knows its id once started

    def started(self, round: int) -> None:
        """This node started averaging ``round`` (the record says the highest such round)."""
        self.round = max(self.round, round)

    async def publish(self, bandwidth: float) -> None:
        """Write this node's record, stating its upload rate ``bandwidth`` (bits/s)."""
        self._announced = bandwidth
        record = msgpack.packb({"addrs": self.transport.addrs(), "time": time.time(), "bandwidth": bandwidth,
                                "round": self.round})
        await self.transport.put(f"{self.run_id}/members", self.peer_id, record, self.ttl)

    async def publish_if_changed(self, bandwidth: float) -> None:
        """Publish at once when ``bandwidth`` is more than a quarter off the rate last
        published: others size their deadlines by it, and should not wait for the next refresh."""
        if self._announced is None or abs(bandwidth - self._announced) > 0.25 * self._announced:
            await self.publish(bandwidth)

    async def refresh(self) -> list[str]:
        """Read the records: the live members (self included), sorted."""
        stored = await self.transport.get(f"{self.run_id}/members")
        records = {peer: _fields(record) for peer, record in stored.items()}
        learn = getattr(self.transport, "learn_addrs", None)
        if learn is not None:  # a transport that can dial by address learns the members' addresses
            for peer, fields in records.items():
                if peer != self.peer_id and (addrs := _published_addrs(fields)):
                    learn(peer, addrs)
        self._members = sorted(set(records) | {self.peer_id})
        self._published = {peer: rate for peer, fields in records.items()
                           if (rate := _published_rate(fields)) is not None}
        self._times = {peer: t for peer, fields in records.items() if (t := _published_time(fields)) is not None}
        for peer, (until, seen) in list(self._suspects.items()):
            if (t := self._times.get(peer)) is None:
                continue
            if seen is None:  # suspected before any record of it was read: a newer one than this clears it
                self._suspects[peer] = (until, t)
            elif t > seen:  # it published since it was suspected: it is up (again)
                del self._suspects[peer]
        return list(self._members)

    def known(self) -> list[str]:
        """Live members (self included) as of the last `refresh` (no network)."""
        return list(self._members)

    def published_rates(self) -> list[float]:
        """The upload rates (bits/s) the other live members state in their records."""
        return [self._published[p] for p in self._members if p != self.peer_id and p in self._published]

    def suspect(self, peer: str) -> None:
        """Stop waiting for ``peer`` (or asking it to lead) until its membership record
        could have expired, or until a refresh finds a newer record of it."""
        self._suspects[peer] = (time.monotonic() + self.ttl, self._times.get(peer))

    def heard_from(self, peer: str) -> None:
        """``peer`` sent something: it is alive after all."""
        self._suspects.pop(peer, None)

    def expected(self) -> list[str]:
        """The live members not under suspicion, sorted (the order leaders are tried in)."""
        now = time.monotonic()
        return [m for m in self._members if self._suspects.get(m, (0.0, None))[0] < now]


def _fields(record: bytes) -> dict:
    """A membership record's fields; empty when it is malformed (records come from
    other peers: never trusted blindly, each field is checked where it is read)."""
    try:
        fields = msgpack.unpackb(record, raw=False, max_str_len=4096, max_array_len=64, max_map_len=16)
    except Exception:  # msgpack raises several types for malformed input
        return {}
    return fields if isinstance(fields, dict) else {}


def _published_addrs(fields: dict) -> list[str]:
    """The multiaddrs a record states (at most 16 strings, each under 512 characters)."""
    addrs = fields.get("addrs")
    if not isinstance(addrs, list) or len(addrs) > 16:
        return []
    return [a for a in addrs if isinstance(a, str) and a.startswith("/") and len(a) < 512]


def _published_time(fields: dict) -> float | None:
    """The "time" a record states (the publisher's clock: compared only with the
    publisher's earlier records), or None when it states none."""
    t = fields.get("time")
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) else None


def _published_rate(fields: dict) -> float | None:
    """The bandwidth a record states, or None when it states none that makes sense."""
    rate = fields.get("bandwidth")
    return float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) and 0 < rate < 1e15 \
        else None
