"""The Transport protocol: what the swarm needs from a peer-to-peer network.

A transport gives a node an identity, addresses others can dial, named
request/response protocols over byte messages, and an expiring key-value store
(membership records). Everything is asyncio and runs on the swarm's event
loop. Backends: `MemoryTransport` (in-process, with fault injection),
`HivemindTransport` (go-libp2p daemon + DHT), and py-libp2p.

Faults are values where the caller can act on them: `request` raises
`PeerUnreachable` (or `asyncio.TimeoutError`) and the swarm leaves that peer
out of the round.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Protocol, Sequence, Union

from lowcomm.compressors import Buffer
from lowcomm.compressors.wire import byte_view

#: A protocol handler: (sender peer id, request bytes) -> response bytes.
Handler = Callable[[str, bytes], Awaitable[bytes]]

#: What `Transport.request` sends: bytes-like, or segments sent back to back
#: (the receiver's handler gets them as one bytes object). Segments let the
#: swarm send views of tensors without joining them into one copy first.
Message = Union[Buffer, Sequence[Buffer]]

#: Bytes a transport writes at a time: large writes go out in pieces of this size.
CHUNK_BYTES = 1 << 20


def segments(data: Message) -> list[memoryview]:
    """``data`` as a list of byte views (no copy)."""
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    return [byte_view(p) for p in parts]


def message_size(data: Message) -> int:
    """Bytes in ``data`` (all its segments)."""
    return sum(len(s) for s in segments(data))


def chunks(data: Message, size: int = CHUNK_BYTES):
    """The bytes of ``data`` as views of at most ``size`` bytes each, in order."""
    for part in segments(data):
        for start in range(0, len(part), size):
            yield part[start:start + size]


class TransportError(RuntimeError):
    """The transport cannot do what was asked (not started, bad address ...)."""


class BootstrapFailed(TransportError):
    """None of the initial peers could be reached."""


class PeerUnreachable(TransportError):
    """A request to a peer failed: the peer is gone, refused, or the stream broke."""


class Transport(Protocol):
    peer_id: str

    async def start(self) -> None:
        """Join the network (listen, dial the initial peers)."""

    async def stop(self) -> None:
        """Leave the network and release every process, socket and task."""

    def addrs(self) -> list[str]:
        """Multiaddrs other nodes can use to reach this one."""

    async def serve(self, protocol: str, handler: Handler) -> None:
        """Answer requests of ``protocol`` with ``handler``."""

    async def request(self, peer: str, protocol: str, data: Message, timeout: float) -> bytes:
        """Send ``data`` (bytes, or segments sent back to back) to ``peer``
        under ``protocol`` and return its response."""

    async def put(self, key: str, subkey: str, value: bytes, ttl: float) -> None:
        """Store ``value`` under ``(key, subkey)`` for ``ttl`` seconds."""

    async def get(self, key: str) -> dict[str, bytes]:
        """Unexpired values under ``key``, by subkey (possibly slightly stale)."""
