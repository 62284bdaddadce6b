"""One side of the cross-backend test, run as a subprocess (the two backends
cannot share a process):

    python -m tests.p2p.interop serve hivemind          # prints {"addrs": [...]}, answers one payload
    python -m tests.p2p.interop call libp2p MULTIADDR    # sends one payload, prints the reply

The server decodes an averaging payload (the wire format of the codecs) and
answers with twice the values as an int8 payload.
"""

import asyncio
import json
import sys

import torch

from lowcomm.compressors import decode, decompress, encode, get_compressor
from lowcomm.p2p.backends import make_transport

PROTOCOL = "/lowcomm/interop-test/1"


async def serve(backend: str) -> None:
    t = make_transport(backend, initial_peers=[], listen=["/ip4/127.0.0.1/tcp/0"], announce=[], identity_path=None)
    await t.start()
    done = asyncio.Event()

    async def handler(sender: str, data: bytes) -> bytes:
        x = decompress(decode(data))
        print(json.dumps({"from": sender, "received": x.tolist()}), flush=True)
        done.set()
        return encode(get_compressor("int8").compress(2 * x))

    await t.serve(PROTOCOL, handler)
    print(json.dumps({"addrs": t.addrs(), "peer_id": t.peer_id}), flush=True)
    await asyncio.wait_for(done.wait(), 60)
    await asyncio.sleep(0.2)  # let the reply leave before the transport stops
    await t.stop()


async def call(backend: str, addr: str) -> None:
    t = make_transport(backend, initial_peers=[addr], listen=["/ip4/127.0.0.1/tcp/0"], announce=[],
                       identity_path=None)
    await t.start()
    x = torch.arange(10.0)
    reply = await t.request(addr.split("/p2p/")[1], PROTOCOL, encode(get_compressor("none").compress(x)), 30)
    print(json.dumps({"peer_id": t.peer_id, "reply": decompress(decode(reply)).tolist()}), flush=True)
    await t.stop()


if __name__ == "__main__":
    mode, backend, *rest = sys.argv[1:]
    asyncio.run(serve(backend) if mode == "serve" else call(backend, rest[0]))
