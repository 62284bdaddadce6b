"""`PrivateTransport`: a swarm only its members can use.

    swarm = Swarm.join(peers, run_id="lab", secret=Path("swarm.secret").read_bytes(),
                       allow=["12D3KooW...", "12D3KooW..."])      # either, or both

Wraps any `Transport`; the layers above do not change.

- **Allowlist** (``allow``): requests from or to a peer id not on the list are
  refused, and membership records under other peer ids are ignored. The peer
  id a transport reports is proven by its handshake (Noise or TLS over the
  peer's key), so a stranger cannot pass for a listed peer in a request.
  Membership records live in an open store, so on their own they can be
  written under any id: add a secret to authenticate them too.
- **Shared secret** (``secret``): every request, response and membership
  record carries an HMAC-SHA256 tag over (protocol, sender, receiver, bytes)
  keyed by the secret. Anything whose tag does not verify is refused: a node
  without the secret can neither take part in a round nor download the model.

A refused request is answered with `REFUSED` (and logged), so the other side
learns why (`Unauthorized`) instead of seeing a broken stream.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Iterable

from lowcomm.p2p.transport import Handler, Message, PeerUnreachable, Transport, segments

log = logging.getLogger("lowcomm.p2p.private")

TAG_BYTES = 32
MIN_SECRET_BYTES = 16
#: The reply to a request that failed authentication (it carries no tag).
REFUSED = b"\x00lowcomm: refused: not authenticated\x00"


class Unauthorized(PeerUnreachable):
    """A peer refused us, or we refused it: wrong or missing swarm secret, or a
    peer id not on the allowlist."""


class PrivateTransport:
    """A `Transport` restricted to a swarm's members (see the module docstring)."""

    def __init__(self, inner: Transport, *, secret: bytes | None = None, allow: Iterable[str] | None = None):
        if secret is not None and not isinstance(secret, bytes):
            raise TypeError(f"the swarm secret must be bytes, got {type(secret).__name__}")
        if secret is not None and len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"a swarm secret needs at least {MIN_SECRET_BYTES} bytes, got {len(secret)}; "
                             "make one with `head -c 32 /dev/urandom > swarm.secret`")
        if secret is None and allow is None:
            raise ValueError("a private swarm needs a secret, an allowlist, or both")
        self.inner = inner
        self._key = hashlib.sha256(b"lowcomm swarm secret\x00" + secret).digest() if secret is not None else None
        self.allow = frozenset(allow) if allow is not None else None

    # --- passthrough ---
    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    async def start(self) -> None:
        await self.inner.start()
        if self.allow is not None and self.peer_id not in self.allow:
            log.warning("this node (%s) is not on its own allowlist: the others will refuse it unless "
                        "their lists name it", self.peer_id)

    async def stop(self) -> None:
        await self.inner.stop()

    def kill(self) -> None:
        kill = getattr(self.inner, "kill", None)
        if kill:
            kill()

    def addrs(self) -> list[str]:
        return self.inner.addrs()

    # --- authentication ---
    def _allowed(self, peer: str) -> bool:
        return self.allow is None or peer in self.allow

    def _tag(self, what: str, sender: str, receiver: str, data: Message) -> bytes:
        mac = hmac.new(self._key, digestmod=hashlib.sha256)
        for field in (what, sender, receiver):
            raw = field.encode()
            mac.update(len(raw).to_bytes(4, "big") + raw)
        for part in segments(data):
            mac.update(part)
        return mac.digest()

    def _seal(self, what: str, sender: str, receiver: str, data: Message) -> list:
        if self._key is None:
            return segments(data)
        return [*segments(data), self._tag(what, sender, receiver, data)]

    def _open(self, what: str, sender: str, receiver: str, data: bytes) -> memoryview | None:
        """The bytes without their tag, or None when the tag does not verify."""
        view = memoryview(data)
        if self._key is None:
            return view
        if len(view) < TAG_BYTES:
            return None
        body, tag = view[:-TAG_BYTES], view[-TAG_BYTES:]
        return body if hmac.compare_digest(self._tag(what, sender, receiver, body), tag) else None

    # --- requests ---
    async def serve(self, protocol: str, handler: Handler) -> None:
        async def checked(sender: str, data: bytes) -> bytes:
            body = self._open(protocol, sender, self.peer_id, data) if self._allowed(sender) else None
            if body is None:
                log.warning("refused a %s request from %s: %s", protocol, sender,
                            "not on the allowlist" if not self._allowed(sender) else "wrong or missing swarm secret")
                return REFUSED
            response = await handler(sender, body)
            return b"".join(self._seal(protocol, self.peer_id, sender, response))

        await self.inner.serve(protocol, checked)

    async def request(self, peer: str, protocol: str, data: Message, timeout: float) -> bytes:
        if not self._allowed(peer):
            raise Unauthorized(f"{peer} is not on this node's allowlist")
        reply = await self.inner.request(peer, protocol, self._seal(protocol, self.peer_id, peer, data), timeout)
        if reply == REFUSED:
            raise Unauthorized(f"{peer} refused us: this node is not a member of its private swarm (wrong or "
                               "missing --secret-file, or not on its --allow list)")
        body = self._open(protocol, peer, self.peer_id, reply)
        if body is None:
            raise Unauthorized(f"{peer}'s reply failed authentication: it is not a member of this private swarm")
        return bytes(body)

    # --- membership records ---
    async def put(self, key: str, subkey: str, value: bytes, ttl: float) -> None:
        await self.inner.put(key, subkey, b"".join(self._seal(f"record:{key}", subkey, "", value)), ttl)

    async def get(self, key: str) -> dict[str, bytes]:
        records = {}
        for subkey, value in (await self.inner.get(key)).items():
            body = self._open(f"record:{key}", subkey, "", value) if self._allowed(subkey) else None
            if body is not None:
                records[subkey] = bytes(body)
        return records


def make_private(transport: Transport, secret: bytes | None, allow: Iterable[str] | None) -> Transport:
    """``transport`` restricted by ``secret`` and/or ``allow``; unchanged when both are None."""
    if secret is None and allow is None:
        return transport
    return PrivateTransport(transport, secret=secret, allow=allow)
