"""Backends side by side: interoperability, one identity file, and the one-process rule."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.p2p.test_swarm_real import assert_no_new_daemons, p2pd_pids

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("server,client", [("hivemind", "libp2p"), ("libp2p", "hivemind")])
def test_a_py_libp2p_node_and_a_go_libp2p_node_exchange_a_payload(server, client):
    before = p2pd_pids()
    srv = subprocess.Popen([sys.executable, "-m", "tests.p2p.interop", "serve", server], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    try:
        hello = json.loads(srv.stdout.readline())
        cli = subprocess.run([sys.executable, "-m", "tests.p2p.interop", "call", client, hello["addrs"][0]],
                             capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
        assert cli.returncode == 0, cli.stderr[-2000:]
        out, err = srv.communicate(timeout=60)
    finally:
        if srv.poll() is None:
            srv.kill()
    reply = json.loads(cli.stdout.strip().splitlines()[-1])
    received = json.loads(out.strip().splitlines()[-1])
    assert received["received"] == [float(i) for i in range(10)]
    assert received["from"] == reply["peer_id"]                      # the server saw the client's peer id
    assert max(abs(a - 2 * i) for i, a in enumerate(reply["reply"])) <= 18 / 127  # int8 of 2x
    assert_no_new_daemons(before)


def _peer_id(backend: str, identity: Path) -> str:
    code = ("import sys, asyncio\n"
            "from lowcomm.p2p.backends import make_transport\n"
            "t = make_transport(sys.argv[1], initial_peers=[], listen=['/ip4/127.0.0.1/tcp/0'], announce=[], "
            "identity_path=sys.argv[2])\n"
            "async def main():\n    await t.start(); print(t.peer_id); await t.stop()\n"
            "asyncio.run(main())\n")
    r = subprocess.run([sys.executable, "-c", code, backend, str(identity)], capture_output=True, text=True,
                       cwd=ROOT, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("first,second", [("hivemind", "libp2p"), ("libp2p", "hivemind")])
def test_one_identity_file_gives_one_peer_id_on_both_backends(tmp_path, first, second):
    identity = tmp_path / "node.key"
    a = _peer_id(first, identity)   # creates the key file
    b = _peer_id(second, identity)  # reads it
    assert a == b and len(a) > 40


def test_both_backends_in_one_process_is_refused_plainly():
    code = ("from lowcomm.p2p.backends import make_transport, BackendConflict\n"
            "make_transport('hivemind', initial_peers=[], listen=[], announce=[], identity_path=None)\n"
            "try:\n"
            "    make_transport('libp2p', initial_peers=[], listen=[], announce=[], identity_path=None)\n"
            "except BackendConflict as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "cannot share one Python process" in r.stdout and "crypto.pb.KeyType" in r.stdout
