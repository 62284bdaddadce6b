"""The network lab: namespaces on shaped links, one transfer timed through the real transport.

Skipped where the machine cannot make namespaces (no root, no iproute2).
"""

import json
import subprocess
import sys

import pytest

from lowcomm.lab import NetLab, mbit, support_problem
from lowcomm.lab.netns import lab_namespaces, ns_pids, tbf_args

PROBLEM = support_problem()
needs_lab = pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))


def test_token_bucket_sizes():
    assert tbf_args(mbit(20)) == ["tbf", "rate", "20000000bit", "burst", "32768", "latency", "100ms"]
    assert tbf_args(mbit(1000)) == ["tbf", "rate", "1000000000bit", "burst", "500000", "latency", "100ms"]


def test_bad_lab_sizes_are_refused():
    with pytest.raises(ValueError, match="at least one node"):
        NetLab([])
    with pytest.raises(ValueError, match="positive"):
        NetLab([mbit(10), 0.0])


@needs_lab
@pytest.mark.parametrize("backend", ["hivemind", "libp2p"])
def test_5mb_through_the_transport_on_a_20mbit_link_takes_2_seconds(backend):
    with NetLab([mbit(20), mbit(20)]) as lab:
        names = lab_namespaces(lab.tag[len("lcl-"):])
        assert len(names) == 3  # two nodes and the bridge
        probe = [sys.executable, "-m", "lowcomm.lab.probe"]
        server = lab.popen(0, [*probe, "serve", "--backend", backend, "--listen", f"/ip4/{lab.addr(0)}/tcp/0"],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        addr = json.loads(server.stdout.readline())["addr"]
        assert f"/ip4/{lab.addr(0)}/" in addr
        sender = lab.popen(1, [*probe, "send", "--backend", backend, "--peer", addr, "--bytes", "5000000",
                               "--listen", f"/ip4/{lab.addr(1)}/tcp/0"], stdout=subprocess.PIPE, text=True)
        out, _ = sender.communicate(timeout=120)
        server.stdin.close()
        assert server.wait(60) == 0
        result = json.loads(out.splitlines()[-1])
    assert result["echoed"] == 5_000_000
    # 5 MB = 40 Mbit at 20 Mbit/s: 2 s, plus the transport's framing and encryption
    assert abs(result["seconds"] / 2.0 - 1) <= 0.25, result
    assert all(ns not in lab_namespaces() for ns in names)  # the lab is gone
    assert all(not ns_pids(ns) for ns in names)
