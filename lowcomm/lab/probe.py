"""One timed transfer through a real transport, for the network lab.

    python -m lowcomm.lab.probe serve --backend hivemind --listen /ip4/198.18.0.1/tcp/0
    python -m lowcomm.lab.probe send --backend hivemind --peer MULTIADDR --bytes 5000000

``serve`` prints ``{"addr": MULTIADDR}`` and answers every request with the
number of bytes it received, until its standard input closes. ``send``
connects, makes one small request (so the connection and the protocol
negotiation are done), times ``--pings`` 1-byte requests (the transport's own
round trip, which is all a message costs beside its bytes on an unloaded
link), then one request carrying ``--bytes`` bytes, and prints
``{"bytes": N, "seconds": S, "echoed": N, "round_trip_s": R}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from lowcomm.p2p.backends import make_transport

PROTOCOL = "/lowcomm/probe/1"


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def serve(args) -> None:
    transport = make_transport(args.backend, initial_peers=[], listen=[args.listen], announce=[],
                               identity_path=None)
    await transport.start()

    async def count(sender: str, data: bytes) -> bytes:
        return str(len(data)).encode()

    await transport.serve(PROTOCOL, count)
    emit(addr=transport.addrs()[0])
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the lab closes stdin
    finally:
        await transport.stop()


async def send(args) -> None:
    transport = make_transport(args.backend, initial_peers=[args.peer], listen=[args.listen], announce=[],
                               identity_path=None)
    await transport.start()
    try:
        peer = args.peer.split("/p2p/")[-1]
        await transport.request(peer, PROTOCOL, b"x", timeout=60)
        trips = []
        for _ in range(args.pings):
            t0 = time.perf_counter()
            await transport.request(peer, PROTOCOL, b"x", timeout=60)
            trips.append(time.perf_counter() - t0)
        payload = bytes(args.bytes)
        t0 = time.perf_counter()
        echoed = int(await transport.request(peer, PROTOCOL, payload, timeout=600))
        emit(bytes=args.bytes, seconds=time.perf_counter() - t0, echoed=echoed,
             round_trip_s=sorted(trips)[len(trips) // 2] if trips else None)
    finally:
        await transport.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowcomm.lab.probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=["serve", "send"])
    parser.add_argument("--backend", default="hivemind", choices=["hivemind", "libp2p"])
    parser.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0")
    parser.add_argument("--peer", default="", help="the server's multiaddr (send)")
    parser.add_argument("--bytes", type=int, default=5_000_000, help="payload size (send)")
    parser.add_argument("--pings", type=int, default=0, help="also time this many 1-byte requests (send): "
                        "their median round trip is printed as round_trip_s")
    args = parser.parse_args(argv)
    if args.role == "send" and not args.peer:
        parser.error("send needs --peer MULTIADDR (what serve printed)")
    asyncio.run(serve(args) if args.role == "serve" else send(args))


if __name__ == "__main__":
    main()
