"""`HivemindTransport`: go-libp2p (hivemind's ``p2pd`` daemon) and hivemind's DHT.

One ``p2pd`` process per node, started by `hivemind.p2p.P2P` and stopped
with the transport. The daemon runs in a session of its own: a Ctrl+C in a
terminal (or a SIGTERM to the node's process group) reaches the node only,
which then leaves the swarm and stops its daemon in order, rather than the
daemon dying under the node mid-shutdown. Membership records live in a `hivemind.dht.DHTNode` run
on the swarm's own event loop (no forked DHT process). Requests are binary
streams: an 8-byte big-endian length, then the bytes, each way.

Imported only when the hivemind backend is chosen: it cannot share a process
with py-libp2p.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import subprocess
import sys

from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID
from multiaddr import Multiaddr
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.timed_storage import get_dht_time

from lowcomm.compressors import MAX_BLOB_BYTES
from lowcomm.p2p.transport import (
    BootstrapFailed, Handler, Message, PeerUnreachable, TransportError, chunks, message_size,
)

log = logging.getLogger("lowcomm.p2p.hivemind")
logging.getLogger("hivemind").setLevel(logging.WARNING)  # its INFO lines ("Generating new identity") are noise here
_LEN = 8

# A watchdog process: when the node's process is gone (even by SIGKILL, when
# no cleanup runs), it kills the node's p2pd, which would otherwise live on.
_GUARD = """
import os, signal, sys, time
parent, daemon = os.getppid(), int(sys.argv[1])
while os.getppid() == parent:
    time.sleep(0.25)
try:
    os.kill(daemon, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    size = int.from_bytes(await reader.readexactly(_LEN), "big")
    if size > MAX_BLOB_BYTES + (1 << 20):
        raise PeerUnreachable(f"message of {size} bytes is over the limit")
    return await reader.readexactly(size)


async def _write_frame(writer: asyncio.StreamWriter, data: Message) -> None:
    """Length, then the bytes in pieces, waiting for each to drain: the stream's
    buffer stays small instead of holding a copy of a large payload."""
    writer.write(message_size(data).to_bytes(_LEN, "big"))
    for piece in chunks(data):
        writer.write(piece)
        await writer.drain()


class HivemindTransport:
    """A node on go-libp2p with a hivemind DHT (see the module docstring).

    ``listen``: multiaddrs to listen on (default loopback, a free port);
    ``announce``: multiaddrs to tell others; ``identity_path``: a libp2p private
    key file, created if missing, so the peer id survives restarts.
    """

    def __init__(self, *, initial_peers: list[str] = (), listen: list[str] = ("/ip4/127.0.0.1/tcp/0",),
                 announce: list[str] = (), identity_path: str | None = None):
        self.initial_peers = list(initial_peers)
        self.listen, self.announce, self.identity_path = list(listen), list(announce), identity_path
        self.p2p: P2P | None = None
        self._guard: subprocess.Popen | None = None
        self.dht: DHTNode | None = None
        self.peer_id = ""
        self._addrs: list[str] = []
        self._peer_addrs: dict[str, list[str]] = {}  # member -> the addresses its membership record states
        self._dialed: set[str] = set()
        self._dials: set[asyncio.Task] = set()  # dials in the background (`learn_addrs`)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # hivemind starts p2pd with asyncio's create_subprocess_exec, which goes through
        # this loop: for that call only, every child starts in a session of its own
        loop.subprocess_exec = functools.partial(loop.subprocess_exec, start_new_session=True)
        try:
            self.p2p = await P2P.create(initial_peers=self.initial_peers or None, host_maddrs=self.listen,
                                        announce_maddrs=self.announce or None, identity_path=self.identity_path)
        except P2PDaemonError as e:
            if "bootstrap" in str(e):
                raise BootstrapFailed(f"could not reach {', '.join(self.initial_peers)}") from None
            raise TransportError(f"could not start the p2p daemon: {e}") from None
        finally:
            del loop.subprocess_exec  # the loop's own method again
        self.peer_id = str(self.p2p.peer_id)
        self._addrs = [str(a) for a in await self.p2p.get_visible_maddrs()]
        child = getattr(self.p2p, "_child", None)
        self._guard = subprocess.Popen([sys.executable, "-c", _GUARD, str(child.pid)],
                                       start_new_session=True) if child else None
        try:
            # a bootstrap peer that is reachable but runs no hivemind DHT (a py-libp2p node) is
            # tolerated: streams to it still work, only membership records stay local
            self.dht = await DHTNode.create(p2p=self.p2p, initial_peers=self.initial_peers or None,
                                            cache_locally=False, cache_on_store=False,
                                            ensure_bootstrap_success=False)
        except BaseException:
            await self.p2p.shutdown()
            raise

    async def stop(self) -> None:
        if self.dht is not None:
            await self.dht.shutdown()
            self.dht = None
        if self.p2p is not None:
            await self.p2p.shutdown()
            self.p2p = None
        if self._guard is not None:
            self._guard.kill()
            self._guard.wait()
            self._guard = None

    def kill(self) -> None:
        """Kill the p2pd daemon now (no clean shutdown). Safe from any thread."""
        child = getattr(self.p2p, "_child", None)
        if child is not None and child.returncode is None:
            child.kill()

    def addrs(self) -> list[str]:
        return list(self._addrs)

    async def serve(self, protocol: str, handler: Handler) -> None:
        async def on_stream(ctx, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                request = await _read_frame(reader)
                response = await handler(str(ctx.peer_id), request)
                await _write_frame(writer, response)
            except asyncio.CancelledError:  # shutting down: drop the stream quietly
                pass
            except Exception as e:  # a bad request is that peer's problem: close its stream
                log.info("request on %s from %s failed: %s: %s", protocol, ctx.peer_id, type(e).__name__, e)
            finally:
                writer.close()

        await self.p2p.add_binary_stream_handler(protocol, on_stream)

    async def request(self, peer: str, protocol: str, data: Message, timeout: float) -> bytes:
        if self.p2p is None:
            raise TransportError("transport not started")

        async def exchange() -> bytes:
            await self._dial(peer)
            _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer), protocol)
            try:
                await _write_frame(writer, data)
                return await _read_frame(reader)
            finally:
                writer.close()

        try:
            return await asyncio.wait_for(exchange(), timeout)
        except asyncio.TimeoutError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError, P2PDaemonError, ValueError) as e:
            self._dialed.discard(peer)  # dial its addresses again next time
            raise PeerUnreachable(f"{peer}: {type(e).__name__}: {e}") from None

    def learn_addrs(self, peer: str, addrs: list[str]) -> None:
        """``peer``'s addresses, from its membership record. New ones are dialled at
        once, in the background: a node that (re)starts connects to every member
        from its first refresh on, and members whose own dials to it failed while it
        was down (the daemon then refuses to redial for a while, "dial backoff")
        reach it over those connections."""
        if self._peer_addrs.get(peer) != addrs:
            self._peer_addrs[peer] = list(addrs)
            self._dialed.discard(peer)
            dial = asyncio.ensure_future(self._dial(peer))
            self._dials.add(dial)  # held until done: the loop keeps only weak references to tasks
            dial.add_done_callback(self._dials.discard)

    async def _dial(self, peer: str) -> None:
        """Connect to ``peer`` at the addresses its membership record states, once.
        Without this the daemon finds peers through its DHT, which ignores
        addresses it deems unroutable (benchmark ranges such as 198.18.0.0/15,
        some private networks) and then fails with "routing: not found".
        A failed dial is left to the daemon's own routing."""
        addrs = self._peer_addrs.get(peer)
        if not addrs or peer in self._dialed:
            return
        try:
            maddrs = [Multiaddr(a) for a in addrs]
            # hivemind's P2P has no public connect; its daemon client has
            await self.p2p._client.connect(PeerID.from_base58(peer), maddrs)
            self._dialed.add(peer)
        except Exception as e:  # unusable addresses or no route: the daemon may still find the peer
            log.debug("could not dial %s at %s: %s", peer, addrs, e)

    async def put(self, key: str, subkey: str, value: bytes, ttl: float) -> None:
        await self.dht.store(key, value, expiration_time=get_dht_time() + ttl, subkey=subkey)

    async def get(self, key: str) -> dict[str, bytes]:
        found = await self.dht.get(key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        now = get_dht_time()
        return {str(k): v.value for k, v in found.value.items()
                if v.expiration_time > now and isinstance(v.value, bytes)}
