"""`Libp2pTransport`: py-libp2p (pure Python, trio), no Go daemon.

A py-libp2p host (TCP, Noise, yamux: py-libp2p's defaults) runs in its own
thread under ``trio.run``; the swarm's asyncio loop calls into it through
``trio.from_thread`` on a small thread pool, and incoming requests are handed
to the swarm's handlers with ``asyncio.run_coroutine_threadsafe``. Requests
are streams carrying an 8-byte big-endian length and the bytes, each way (the
same framing as the hivemind backend).

Membership records live in a small replicated store instead of a DHT: a node
keeps records (with absolute expiry times) locally, pushes each of its own
records to every peer it is connected to, and on `get` merges its own store
with those of its connected peers, which also tell it the addresses of the
peers they know. The bootstrap peers thus act as a rendezvous; expiry
semantics are those of the hivemind backend (a record lives ``ttl`` seconds
unless refreshed).

Identity: a libp2p private key in its protobuf serialisation, the format
hivemind's daemon writes, so one identity file gives the same peer id on both
backends. A missing file is created with a new Ed25519 key.

Imported only when the libp2p backend is chosen: it cannot share a process
with hivemind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr

from lowcomm.compressors import MAX_BLOB_BYTES
from lowcomm.p2p.transport import (
    BootstrapFailed, Handler, Message, PeerUnreachable, TransportError, chunks, message_size,
)

log = logging.getLogger("lowcomm.p2p.libp2p")
# py-libp2p logs at ERROR what it also raises (a dial to a peer that left, a stream
# reset); the swarm reports those in its own words, so its lines would only repeat them
logging.getLogger("libp2p").setLevel(logging.CRITICAL)
_LEN = 8
PROTOCOL_KV = "/lowcomm/kv/1"


# libp2p's PrivateKey protobuf for Ed25519 (KeyType 1) with the 64-byte key the
# spec and go-libp2p use (seed then public key); py-libp2p writes only the seed
_ED25519_HEADER = bytes([0x08, 0x01, 0x12, 0x40])


def load_identity(path: str | None) -> KeyPair:
    """The key pair in ``path`` (created with a new Ed25519 key if missing)."""
    if path is None:
        return create_new_key_pair()
    file = Path(path)
    if file.exists():
        data = file.read_bytes()
        try:
            if data[:4] == _ED25519_HEADER and len(data) == 68:
                private = Ed25519PrivateKey.from_bytes(data[4:36])
            else:
                private = deserialize_private_key(data)
        except Exception as e:  # the file is not a libp2p private key
            raise TransportError(f"identity file {path} is not a libp2p private key: {e}") from None
        return KeyPair(private, private.get_public_key())
    pair = create_new_key_pair()
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(_ED25519_HEADER + pair.private_key.to_bytes()[:32] + pair.public_key.to_bytes())
    return pair


async def _read_exactly(stream, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = await stream.read(min(n - got, 1 << 20))
        if not chunk:
            raise PeerUnreachable("stream closed early")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def _read_frame(stream) -> bytes:
    size = int.from_bytes(await _read_exactly(stream, _LEN), "big")
    if size > MAX_BLOB_BYTES + (1 << 20):
        raise PeerUnreachable(f"message of {size} bytes is over the limit")
    return await _read_exactly(stream, size)


async def _write_frame(stream, data: Message) -> None:
    await stream.write(message_size(data).to_bytes(_LEN, "big"))
    for piece in chunks(data):
        await stream.write(bytes(piece))  # py-libp2p's muxers want bytes


class Libp2pTransport:
    """A node on py-libp2p (see the module docstring)."""

    def __init__(self, *, initial_peers: list[str] = (), listen: list[str] = ("/ip4/127.0.0.1/tcp/0",),
                 announce: list[str] = (), identity_path: str | None = None):
        self.initial_peers = list(initial_peers)
        self.listen, self.announce, self.identity_path = list(listen), list(announce), identity_path
        self.peer_id = ""
        self._handlers: dict[str, Handler] = {}
        self._store: dict[str, dict[str, tuple[bytes, float]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="lowcomm-libp2p")
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token = None
        self._stop: trio.Event | None = None
        self.host = None

    # --- lifecycle ---
    async def start(self) -> None:
        self._aloop = asyncio.get_running_loop()
        key_pair = load_identity(self.identity_path)
        self._thread = threading.Thread(target=self._run_trio, args=(key_pair,), name="lowcomm-libp2p-trio",
                                        daemon=True)
        self._thread.start()
        await self._aloop.run_in_executor(self._pool, self._ready.wait)
        if self._error is not None:
            raise self._error

    def _run_trio(self, key_pair: KeyPair) -> None:
        try:
            trio.run(self._main, key_pair)
        except BaseException as e:  # reported to start() through _error
            self._error = self._error or e
            self._ready.set()

    async def _main(self, key_pair: KeyPair) -> None:
        listen = [multiaddr.Multiaddr(a) for a in self.listen]
        announce = [multiaddr.Multiaddr(a) for a in self.announce] or None
        self.host = new_host(key_pair=key_pair, listen_addrs=listen, announce_addrs=announce)
        self.peer_id = str(self.host.get_id())
        self._stop = trio.Event()
        async with self.host.run(listen_addrs=listen):
            self._token = trio.lowlevel.current_trio_token()
            self.host.set_stream_handler(PROTOCOL_KV, self._on_kv)
            if self.initial_peers:
                reached = 0
                for addr in self.initial_peers:
                    try:
                        with trio.fail_after(15):
                            await self.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
                        reached += 1
                    except Exception as e:  # try the other bootstrap peers
                        log.info("could not reach %s: %s", addr, e)
                if not reached:
                    self._error = BootstrapFailed(f"could not reach {', '.join(self.initial_peers)}")
                    self._ready.set()
                    return
            self._ready.set()
            await self._stop.wait()

    async def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            await self._aloop.run_in_executor(None, self._thread.join, 10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def addrs(self) -> list[str]:
        return [str(a) for a in self.host.get_addrs()] if self.host else []

    # --- requests ---
    async def serve(self, protocol: str, handler: Handler) -> None:
        self._handlers[protocol] = handler
        await self._aloop.run_in_executor(self._pool, lambda: trio.from_thread.run_sync(
            self.host.set_stream_handler, protocol, self._on_stream(protocol), trio_token=self._token))

    def _on_stream(self, protocol: str):
        async def handle(stream) -> None:
            sender = str(stream.muxed_conn.peer_id)
            try:
                request = await _read_frame(stream)
                future = asyncio.run_coroutine_threadsafe(self._handlers[protocol](sender, request), self._aloop)
                response = await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)
                await _write_frame(stream, response)
            except Exception as e:  # a bad request is that peer's problem: close its stream
                log.info("request on %s from %s failed: %s: %s", protocol, sender, type(e).__name__, e)
            finally:
                try:
                    await stream.close()
                except Exception:  # the stream may already be gone
                    pass
        return handle

    async def request(self, peer: str, protocol: str, data: Message, timeout: float) -> bytes:
        if self._token is None:
            raise TransportError("transport not started")

        def call() -> bytes:
            return trio.from_thread.run(self._trio_request, peer, protocol, data, timeout, trio_token=self._token)

        try:
            return await self._aloop.run_in_executor(self._pool, call)
        except trio.TooSlowError:
            raise asyncio.TimeoutError(f"{peer} did not answer {protocol} within {timeout:.0f} s") from None
        except trio.RunFinishedError:
            raise TransportError("transport stopped") from None

    async def _trio_request(self, peer: str, protocol: str, data: Message, timeout: float) -> bytes:
        with trio.fail_after(timeout):
            try:
                pid = ID.from_base58(peer)
                if not self.host.get_network().connections.get(pid):
                    addrs = self.host.get_peerstore().addrs(pid)
                    await self.host.connect(PeerInfo(pid, addrs))
                stream = await self.host.new_stream(pid, [protocol])
                try:
                    await _write_frame(stream, data)
                    return await _read_frame(stream)
                finally:
                    await stream.close()
            except (trio.TooSlowError, PeerUnreachable):
                raise
            except Exception as e:  # every other failure means we cannot talk to that peer now
                raise PeerUnreachable(f"{peer}: {type(e).__name__}: {e}") from None

    # --- the replicated record store ---
    def _live(self, key: str) -> dict[str, tuple[bytes, float]]:
        now = time.time()
        records = self._store.get(key, {})
        for sub in [s for s, (_, exp) in records.items() if exp <= now]:
            del records[sub]
        return dict(records)

    def _merge(self, key: str, records: dict) -> None:
        mine = self._store.setdefault(key, {})
        for sub, (value, exp) in records.items():
            if isinstance(value, bytes) and isinstance(exp, float) and (sub not in mine or mine[sub][1] < exp):
                mine[sub] = (value, exp)

    def _connected(self) -> list:
        return list(self.host.get_network().connections.keys())

    async def _on_kv(self, stream) -> None:
        try:
            msg = msgpack.unpackb(await _read_frame(stream), raw=False)
            if msg.get("op") == "put":
                self._merge(msg["key"], {msg["subkey"]: (msg["value"], float(msg["expires"]))})
                reply = {}
            else:
                store = self.host.get_peerstore()
                reply = {"records": {s: [v, e] for s, (v, e) in self._live(msg["key"]).items()},
                         "peers": {str(p): [str(a) for a in store.addrs(p)] for p in self._connected()}}
            await _write_frame(stream, msgpack.packb(reply, use_bin_type=True))
        except Exception as e:  # malformed request: drop it
            log.info("bad record request: %s", e)
        finally:
            try:
                await stream.close()
            except Exception:  # the stream may already be gone
                pass

    async def _ask_all(self, message: dict) -> list[dict]:
        payload = msgpack.packb(message, use_bin_type=True)
        replies: list[dict] = []

        async def ask(pid) -> None:
            try:
                raw = await self._trio_request(str(pid), PROTOCOL_KV, payload, 10)
                replies.append(msgpack.unpackb(raw, raw=False))
            except Exception as e:  # a peer that cannot answer is skipped
                log.debug("record request to %s failed: %s", pid, e)

        async with trio.open_nursery() as nursery:
            for pid in self._connected():
                nursery.start_soon(ask, pid)
        return replies

    async def put(self, key: str, subkey: str, value: bytes, ttl: float) -> None:
        expires = time.time() + ttl
        self._merge(key, {subkey: (bytes(value), expires)})
        message = {"op": "put", "key": key, "subkey": subkey, "value": bytes(value), "expires": expires}
        await self._aloop.run_in_executor(self._pool, lambda: trio.from_thread.run(
            self._ask_all, message, trio_token=self._token))

    async def get(self, key: str) -> dict[str, bytes]:
        replies = await self._aloop.run_in_executor(self._pool, lambda: trio.from_thread.run(
            self._ask_all, {"op": "get", "key": key}, trio_token=self._token))
        store = self.host.get_peerstore()
        for reply in replies:
            if not isinstance(reply, dict):
                continue
            records = {s: (v, float(e)) for s, (v, e) in (reply.get("records") or {}).items()}
            self._merge(key, records)
            for pid, addrs in (reply.get("peers") or {}).items():
                if pid != self.peer_id and addrs:
                    try:
                        store.add_addrs(ID.from_base58(pid), [multiaddr.Multiaddr(a) for a in addrs], 3600)
                    except Exception as e:  # an address we cannot parse is ignored
                        log.debug("ignoring address of %s: %s", pid, e)
        return {s: v for s, (v, _) in self._live(key).items()}
