"""Matchmaking: who averages ``(key, round)`` together.

The live member with the smallest peer id leads. Each node sends it
JOIN(key, round); the leader answers every JOIN with the roster once every
live member has joined, or ``window`` seconds after the first JOIN. A node
that joins after that is told the roster without it (it takes part from the
next round). If the leader cannot be reached, the next smallest leads;
unreachable peers are suspects (`lowcomm.p2p.membership`). The roster leaves
out the members this leader excludes as outliers
(`lowcomm.averaging.exclusion`). (A leader that dies just as it closes a
roster may take some answers with it: those members run the round under the
next leader, apart from the others.)

A lobby that holds one member when its window ends, while others are
expected, forms no group: it closes with an empty roster, and the member in
it (the leader itself, or the one node that joined) tries the next leader in
the same order, as does every node that asks this one later. Views of who
leads differ for a while after churn (a node that came back is still a
suspect to some, and leads a round of its own, which the others skip):
rather than average alone, such a leader hands the round to the next one
and joins the others there (which tells them it is up again), and a node
that no group took asks its suspects last, one of which may be back and
leading. A node stops trying further leaders ``window + timeout`` seconds
after it started.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Coroutine

from lowcomm.averaging.exclusion import Exclusions
from lowcomm.compressors import WireFormatError
from lowcomm.p2p import messages
from lowcomm.p2p.membership import Membership
from lowcomm.p2p.transport import PeerUnreachable, Transport

log = logging.getLogger("lowcomm.p2p")


@dataclass
class _Lobby:
    """The leader's view of one (key, round)."""

    joined: dict[str, float] = field(default_factory=dict)
    first: float = 0.0
    roster: list[str] | None = None
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Matchmaker:
    """Joins rounds as a member and gathers them as a leader (runs on the swarm's loop).

    Args:
        transport: the node's `Transport` (JOIN requests go over it).
        run_id: the training run; JOINs of other runs get an empty roster.
        window: seconds a leader waits for missing members after the first JOIN.
        membership: whom to expect and try as leader; told of unreachable peers.
        exclusions: members this node leaves out of the rosters it closes.
        spawn: starts a background task that is cancelled when the swarm closes.
    """

    def __init__(self, transport: Transport, run_id: str, window: float, membership: Membership,
                 exclusions: Exclusions, spawn: Callable[[Coroutine], asyncio.Task]):
        self.transport, self.run_id, self.window = transport, run_id, window
        self.membership, self.exclusions, self._spawn = membership, exclusions, spawn
        self._lobbies: dict[tuple[str, int], _Lobby] = {}

    @property
    def peer_id(self) -> str:
        return self.transport.peer_id  # read late: a transport knows its id once started

    async def serve(self) -> None:
        """Answer other members' JOINs."""
        await self.transport.serve(messages.PROTOCOL_JOIN, self._on_join)

    async def matchmake(self, key: str, round: int, group_size: int, weight: float, timeout: float) -> list[str]:
        """The roster of ``(key, round)``, sorted; ``[self]`` when no leader answers.
        ``timeout``: seconds a leader may take beyond the ``window``."""
        request = messages.pack("join", run=self.run_id, key=key, round=round, group_size=group_size, weight=weight)
        give_up = time.monotonic() + self.window + timeout  # no further leader is tried after this
        expected = self.membership.expected()
        suspects = [m for m in self.membership.known() if m not in expected]
        for leader in expected + suspects:  # suspects last: only a node no group took gets there
            if time.monotonic() > give_up:
                break
            if leader == self.peer_id:
                roster = await self._lead(self.peer_id, key, round, weight)
            else:
                try:
                    reply = await self.transport.request(leader, messages.PROTOCOL_JOIN, request,
                                                         timeout=self.window + timeout)
                    roster = messages.unpack("roster", reply)["roster"]
                except (PeerUnreachable, asyncio.TimeoutError, WireFormatError) as e:
                    log.info("leader %s unreachable for %s/%s (%s); trying the next", leader, key, round, e)
                    if isinstance(e, PeerUnreachable):
                        self.membership.suspect(leader)
                    continue
                self.membership.heard_from(leader)
            if roster:
                return roster
            log.info("no group for %s/%s at %s; trying the next leader", key, round, leader)
        return [self.peer_id]

    def joined(self, key: str, round: int) -> dict[str, float]:
        """The members whose JOIN for ``(key, round)`` this node holds as leader, with their weights."""
        lobby = self._lobbies.get((key, round))
        return dict(lobby.joined) if lobby else {}

    def forget_closed(self) -> None:
        """Forget every closed roster (lobbies still gathering stay)."""
        for k in [k for k, lobby in self._lobbies.items() if lobby.roster is not None]:
            del self._lobbies[k]

    def prune(self, cutoff: float) -> None:
        """Forget the closed rosters of lobbies opened before ``cutoff`` (`time.monotonic` seconds)."""
        for k in [k for k, lobby in self._lobbies.items() if lobby.roster is not None and lobby.first < cutoff]:
            del self._lobbies[k]

    async def _lead(self, peer: str, key: str, round: int, weight: float) -> list[str]:
        lobby = self._lobbies.setdefault((key, round), _Lobby())
        if lobby.roster is not None:
            return lobby.roster
        if not lobby.joined:
            lobby.first = time.monotonic()
            self._spawn(self._close_lobby_later(key, round, lobby))
        lobby.joined[peer] = weight
        if set(self.membership.expected()) <= set(lobby.joined):
            self._close_lobby(lobby)
        await lobby.done.wait()
        return lobby.roster

    async def _close_lobby_later(self, key: str, round: int, lobby: _Lobby) -> None:
        await asyncio.sleep(self.window)
        if lobby.roster is None:
            missing = sorted(set(self.membership.expected()) - set(lobby.joined))
            if len(lobby.joined) == 1 and missing:
                log.info("round %s/%s: only %s joined here while %s are expected; handing it to the next leader",
                         key, round, next(iter(lobby.joined)), missing)
                lobby.roster = []  # no group: whoever asks here tries the next leader
                lobby.done.set()
            else:
                log.info("round %s/%s closes without %s", key, round, missing)
                self._close_lobby(lobby)

    def _close_lobby(self, lobby: _Lobby) -> None:
        """The roster: who joined, less the members this leader excludes as outliers."""
        lobby.roster = sorted(p for p in lobby.joined if not self.exclusions.is_excluded(p))
        lobby.done.set()

    async def _on_join(self, sender: str, data: bytes) -> bytes:
        msg = messages.unpack("join", data)
        self.membership.heard_from(sender)
        if msg["run"] != self.run_id:
            return messages.pack("roster", roster=[], reason=f"this node is in run {self.run_id!r}")
        roster = await self._lead(sender, msg["key"], msg["round"], msg["weight"])
        return messages.pack("roster", roster=roster, reason="" if roster else "no group here: try the next leader")
