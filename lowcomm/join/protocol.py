"""The join node's protocols beside averaging: the handshake and state transfer.

- ``/lowcomm/hello/1``: a joining node sends `Hello` (run id, settings hash)
  to a bootstrap peer, which answers `HelloReply`: ``ok`` when both match,
  and its own run id, hash and settings, so a refusal names what differs
  (`lowcomm.join.settings.differences`).
- ``/lowcomm/state/1``: a node sends `StateRequest` (settings hash); a peer
  with the same settings answers its latest snapshot, a
  `lowcomm.checkpoint.state_to_bytes` blob whose meta is `StateMeta`
  (hash, step), or nothing (empty) when it has none or runs other settings.
- ``/lowcomm/state-offer/1``: the same request; the answer is a `StateOffer`
  (hash, the snapshot's step, and whether the node is in step with the
  swarm), or nothing, so that a node can ask every member how far its state
  is before it downloads one (`JoinProtocol.fetch_state` takes the most
  advanced of the members in step).

Messages are msgpack maps checked on receipt against their dataclass
(`lowcomm.p2p.messages.check_fields`): a malformed one raises
`WireFormatError` where it is read. The serving side answers malformed input
with a refusal (hello) or nothing (state, offer); it never raises.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from functools import cache
from typing import TYPE_CHECKING, Callable, ClassVar, TypeVar, get_type_hints

import msgpack
from rich.console import Console
from rich.markup import escape

from lowcomm.checkpoint import CheckpointError, state_from_bytes, state_to_bytes
from lowcomm.compressors import WireFormatError
from lowcomm.join.settings import differences
from lowcomm.p2p.messages import check_fields
from lowcomm.p2p.private import REFUSED, Unauthorized

if TYPE_CHECKING:
    from lowcomm.p2p import Swarm

PROTOCOL_HELLO = "/lowcomm/hello/1"
PROTOCOL_STATE = "/lowcomm/state/1"
PROTOCOL_OFFER = "/lowcomm/state-offer/1"

log = logging.getLogger("lowcomm.join")

POLL_S = 0.5  # seconds between two rounds of offers asked while `JoinProtocol.fetch_state` waits
OFFER_TIMEOUT_S = 5.0  # seconds a member has to answer a request for its offer

_LIMITS = {"max_str_len": 4096, "max_array_len": 100_000, "max_map_len": 256, "max_bin_len": 0}


class Refused(Exception):
    """A peer runs other settings, or a private swarm this node is not in; the message says which."""


@dataclass(frozen=True)
class Hello:
    """What a joining node sends each bootstrap peer."""

    kind: ClassVar[str] = "hello"
    run_id: str
    hash: str  # `lowcomm.join.settings.settings_hash` of the run settings


@dataclass(frozen=True)
class HelloReply:
    """A bootstrap peer's answer: ``ok`` if run id and hash match; its own run id,
    hash and run settings (`lowcomm.join.settings.run_settings`) either way."""

    kind: ClassVar[str] = "hello reply"
    ok: bool
    run_id: str
    hash: str
    settings: dict

    def __post_init__(self):
        if not all(isinstance(k, str) for k in self.settings):
            raise WireFormatError("hello reply field 'settings' must map names to values")


@dataclass(frozen=True)
class StateRequest:
    """A request for a peer's shared state, for the settings of ``hash``."""

    kind: ClassVar[str] = "state request"
    hash: str


@dataclass(frozen=True)
class StateMeta:
    """The meta of a state blob: the settings it is for and the step it was taken at."""

    kind: ClassVar[str] = "state meta"
    hash: str
    step: int


@dataclass(frozen=True)
class StateOffer:
    """What a member says of the state it serves: the settings it is for, its step,
    and whether the member is in step with the swarm (False: it holds weights of
    its own after a round it was left out of, and has not caught up since)."""

    kind: ClassVar[str] = "state offer"
    hash: str
    step: int
    in_step: bool


@dataclass(frozen=True)
class Fetched:
    """A peer's shared state (an optimizer's ``shared_state_dict``) at ``step``."""

    peer: str
    state: dict
    step: int


M = TypeVar("M", Hello, HelloReply, StateRequest, StateMeta, StateOffer)


@cache
def _schema(cls: type) -> dict[str, type]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def pack(msg: Hello | HelloReply | StateRequest | StateOffer) -> bytes:
    return msgpack.packb(asdict(msg), use_bin_type=True)


def from_map(cls: type[M], obj: object) -> M:
    """``cls`` from a decoded map; `WireFormatError` unless it has exactly ``cls``'s fields and types."""
    return cls(**check_fields(cls.kind, obj, _schema(cls)))


def unpack(cls: type[M], data: bytes) -> M:
    """``cls`` from msgpack bytes; `WireFormatError` for anything malformed."""
    try:
        obj = msgpack.unpackb(data, raw=False, **_LIMITS)
    except Exception as e:  # msgpack raises several types for malformed input
        raise WireFormatError(f"malformed {cls.kind} message: {type(e).__name__}") from None
    return from_map(cls, obj)


class JoinProtocol:
    """This node's side of both protocols on ``swarm``: it answers hellos and state
    requests (`serve`, `publish`), greets bootstrap peers (`greet`) and downloads
    a peer's state (`fetch_state`). ``settings`` are this node's run settings,
    ``settings_hash`` their hash; ``in_step`` (set by the catch-up policy) is what
    its state offers say."""

    def __init__(self, swarm: Swarm, run_id: str, settings: dict, settings_hash: str, console: Console):
        self.swarm, self.run_id, self.settings, self.hash = swarm, run_id, settings, settings_hash
        self.console = console
        self._state = b""
        self._step: int | None = None  # the step of ``_state``
        #: False while this node serves weights of its own after a round it was left out of.
        self.in_step = True

    # --- serving ---
    def serve(self) -> None:
        self.swarm.serve(PROTOCOL_HELLO, self._on_hello)
        self.swarm.serve(PROTOCOL_STATE, self._on_state)
        self.swarm.serve(PROTOCOL_OFFER, self._on_offer)

    def publish(self, state: dict, step: int) -> None:
        """Serve ``state`` (an optimizer's ``shared_state_dict`` at ``step``) to
        nodes that ask from now on."""
        self._state, self._step = state_to_bytes(state, asdict(StateMeta(self.hash, step))), step

    async def _on_hello(self, sender: str, data: bytes) -> bytes:
        try:
            hello = unpack(Hello, data)
            ok, why = hello.run_id == self.run_id and hello.hash == self.hash, "it runs other settings"
        except WireFormatError as e:
            ok, why = False, f"its hello is malformed ({e})"
        if not ok:
            self.console.print(f"[yellow]refused {sender[:16]}…: {escape(why)}[/]", highlight=False)
        return pack(HelloReply(ok, self.run_id, self.hash, self.settings))

    def _asks_for_ours(self, sender: str, data: bytes, what: str) -> bool:
        """Whether ``data`` is a well-formed `StateRequest` for our settings (the state
        and offer protocols take the same request; a malformed one is logged)."""
        try:
            request = unpack(StateRequest, data)
        except WireFormatError as e:
            log.info("ignored %s from %s: %s", what, sender, e)
            return False
        return request.hash == self.hash

    async def _on_state(self, sender: str, data: bytes) -> bytes:
        return self._state if self._asks_for_ours(sender, data, "a state request") else b""

    async def _on_offer(self, sender: str, data: bytes) -> bytes:
        if not self._asks_for_ours(sender, data, "an offer request") or self._step is None:
            return b""
        return pack(StateOffer(self.hash, self._step, self.in_step))

    # --- asking ---
    def greet(self, peers: list[str]) -> None:
        """Ask the bootstrap peers (multiaddrs), in order, whether they run our
        settings, until one answers: `Refused` if it says no. A peer that cannot be
        reached or answers garbage is reported and the next one asked."""
        request = pack(Hello(self.run_id, self.hash))
        for addr in peers:
            peer = addr.split("/p2p/")[-1].split("/")[0]
            try:
                raw = self.swarm.request(peer, PROTOCOL_HELLO, request, timeout=30)
                if raw == REFUSED:  # only a node outside a private swarm sees the refusal itself
                    raise Unauthorized(f"{addr} runs a private swarm; join it with its --secret-file "
                                       "(and be on its --allow list if it has one)")
                reply = unpack(HelloReply, raw)
            except Unauthorized as e:
                raise Refused(f"refused by {addr}: {e}") from None
            except Exception as e:  # an unreachable bootstrap peer is reported, the next one tried
                self.console.print(f"[yellow]could not greet {escape(addr)}: {escape(str(e))}[/]", highlight=False)
                continue
            if not reply.ok:
                what = differences(self.settings, reply.settings)
                if reply.run_id != self.run_id:
                    what.insert(0, f"run id ({self.run_id!r} here, {reply.run_id!r} there)")
                raise Refused(f"refused by {addr}: run {reply.run_id!r} settings {reply.hash} differ from "
                              f"run {self.run_id!r} settings {self.hash} here: {'; '.join(what) or 'settings'}")
            return

    def fetch_state(self, at_least: int = 0, patience: float = 0.0,
                    cancelled: Callable[[], bool] = lambda: False) -> Fetched | None:
        """The shared state at the highest step a live member in step with the swarm
        serves for our settings (`offers`; then members out of step, then those
        that state no offer); None if none serves a valid one (each failure is
        reported). With ``patience`` (seconds), first wait that long at most for a
        member in step to offer step ``at_least`` or later: the step at which a
        round this node missed ends. ``cancelled`` (e.g. a stop was requested)
        ends the wait at once, and then nothing is downloaded."""
        peers = [m for m in self.swarm.members() if m != self.swarm.peer_id]
        deadline = time.monotonic() + patience
        offers = self.offers(peers)
        while max((o.step for o in offers.values() if o.in_step), default=-1) < at_least \
                and time.monotonic() < deadline and not cancelled():
            time.sleep(POLL_S)
            offers = self.offers(peers)
        if cancelled():
            return None
        ranked = sorted(offers, key=lambda p: (not offers[p].in_step, -offers[p].step))  # stable: member order
        request = pack(StateRequest(self.hash))
        for peer in ranked + [p for p in peers if p not in offers]:
            try:
                blob = self.swarm.request(peer, PROTOCOL_STATE, request, timeout=120)
                if not blob:
                    continue
                state, meta = state_from_bytes(blob)
                meta = from_map(StateMeta, meta)
                if meta.hash != self.hash:
                    raise CheckpointError("settings hash differs")
                return Fetched(peer, state, meta.step)
            except Exception as e:  # try the next peer: this one is gone or sent something unusable
                self.console.print(f"[yellow]could not catch up from {peer[:16]}…: {escape(str(e))}[/]",
                                   highlight=False)
        return None

    def offers(self, peers: list[str]) -> dict[str, StateOffer]:
        """What each of ``peers`` says of the state it serves for our settings, asked
        of all at once; peers that serve none, answer garbage or cannot be reached
        (or run a version without offers) are left out."""
        request = pack(StateRequest(self.hash))

        def ask(peer: str) -> StateOffer | None:
            try:
                reply = self.swarm.request(peer, PROTOCOL_OFFER, request, timeout=OFFER_TIMEOUT_S)
                offer = unpack(StateOffer, reply) if reply else None
            except Exception as e:  # gone, without this protocol, or garbage: no offer
                log.info("no state offer from %s: %s", peer, e)
                return None
            return offer if offer is not None and offer.hash == self.hash else None

        if not peers:
            return {}
        with ThreadPoolExecutor(max_workers=min(len(peers), 16)) as pool:
            answers = list(pool.map(ask, peers))
        return {peer: offer for peer, offer in zip(peers, answers) if offer is not None}
