"""`MemoryTransport`: peers in one process, for protocol tests, with faults.

All transports of one `MemoryNetwork` can reach each other. A request runs
the target's handler on the target's event loop. Faults are set on the
network and apply to messages sent from then on:

- ``delay``: seconds added to every request (on the sender's side);
- ``bandwidth``: bits/s of every node's uplink, shared by its requests in
  flight: a request of n bytes ends n * 8 / bandwidth seconds after the
  uplink is free (None: instant); a request's timeout covers its upload;
- ``drop(peer)``: requests from ``peer`` fail with `PeerUnreachable`;
- ``crash(peer, after=n)``: the peer sends ``n`` more requests, then is gone
  (its requests and requests to it fail); ``after=0``: gone now;
- ``corrupt(peer, fn)``: every request ``peer`` sends is passed through ``fn``.

The key-value store is shared, with expiry on the network's clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Callable

from lowcomm.p2p.transport import Handler, Message, PeerUnreachable, TransportError, segments


class MemoryNetwork:
    """The shared medium of a set of `MemoryTransport`s."""

    def __init__(self, delay: float = 0.0, clock: Callable[[], float] = time.monotonic,
                 bandwidth: float | None = None):
        self.delay, self.bandwidth = delay, bandwidth
        self.clock = clock
        self.nodes: dict[str, MemoryTransport] = {}
        self.store: dict[str, dict[str, tuple[bytes, float]]] = {}
        self._crash_budget: dict[str, int] = {}
        self._corrupt: dict[str, Callable[[bytes], bytes]] = {}
        self._dropped: set[str] = set()
        self.crashed: set[str] = set()
        self._count = 0

    def transport(self, name: str | None = None) -> MemoryTransport:
        self._count += 1
        return MemoryTransport(self, name or f"mem-{self._count:04d}")

    def crash(self, peer: str, after: int = 0) -> None:
        if after == 0:
            self.crashed.add(peer)
        else:
            self._crash_budget[peer] = after

    def drop(self, peer: str) -> None:
        self._dropped.add(peer)

    def corrupt(self, peer: str, fn: Callable[[bytes], bytes]) -> None:
        self._corrupt[peer] = fn

    def _outgoing(self, sender: str, data: bytes) -> bytes:
        if sender in self.crashed or sender in self._dropped:
            raise PeerUnreachable(f"{sender} is down")
        if sender in self._crash_budget:
            self._crash_budget[sender] -= 1
            if self._crash_budget[sender] <= 0:
                self.crashed.add(sender)  # this message still goes out; nothing after it
        fn = self._corrupt.get(sender)
        return fn(data) if fn else data


class MemoryTransport:
    """A node on a `MemoryNetwork` (see the module docstring)."""

    def __init__(self, network: MemoryNetwork, peer_id: str):
        self.network, self.peer_id = network, peer_id
        self._handlers: dict[str, Handler] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._uplink_free = 0.0  # loop time at which the uplink has sent everything queued

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.network.nodes[self.peer_id] = self

    async def stop(self) -> None:
        self.network.nodes.pop(self.peer_id, None)
        self._loop = None

    def addrs(self) -> list[str]:
        return [f"/memory/{self.peer_id}"]

    async def serve(self, protocol: str, handler: Handler) -> None:
        self._handlers[protocol] = handler

    async def request(self, peer: str, protocol: str, data: Message, timeout: float) -> bytes:
        if self._loop is None:
            raise TransportError("transport not started")
        data = self.network._outgoing(self.peer_id, b"".join(segments(data)))
        # the timeout covers the upload too, as on a real link
        return await asyncio.wait_for(self._deliver(peer, protocol, data), timeout)

    async def _deliver(self, peer: str, protocol: str, data: bytes) -> bytes:
        if self.network.delay:
            await asyncio.sleep(self.network.delay)
        if self.network.bandwidth:
            now = self._loop.time()
            self._uplink_free = max(now, self._uplink_free) + len(data) * 8 / self.network.bandwidth
            await asyncio.sleep(self._uplink_free - now)
        target = self.network.nodes.get(peer)
        if target is None or target._loop is None or peer in self.network.crashed:
            raise PeerUnreachable(f"no peer {peer}")
        handler = target._handlers.get(protocol)
        if handler is None:
            raise PeerUnreachable(f"{peer} does not serve {protocol}")
        fut = asyncio.run_coroutine_threadsafe(handler(self.peer_id, bytes(data)), target._loop)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except PeerUnreachable:
            raise
        except Exception as e:  # the remote handler failed: to us that peer is unreachable
            raise PeerUnreachable(f"{peer} failed to answer {protocol}: {type(e).__name__}: {e}") from None

    async def put(self, key: str, subkey: str, value: bytes, ttl: float) -> None:
        if self.peer_id in self.network.crashed:
            raise PeerUnreachable(f"{self.peer_id} is down")
        self.network.store.setdefault(key, {})[subkey] = (bytes(value), self.network.clock() + ttl)

    async def get(self, key: str) -> dict[str, bytes]:
        now = self.network.clock()
        return {k: v for k, (v, exp) in self.network.store.get(key, {}).items() if exp > now}
