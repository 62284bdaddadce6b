"""`lowcomm join --nproc-per-node 2`: two nodes of 2 ranks each train together on
loopback (hivemind, one swarm per rank slot), agree on the global weights, and
stop on a terminal's SIGTERM: every rank and every p2pd daemon exits, code 0,
no traceback. Plus the pieces that need no swarm: ports, and the settings
that make a node of another G refuse."""

import json
import os
import signal
import subprocess
import time

from lowcomm.join.group import rank_identity, with_port
from lowcomm.join.launch import exit_code
from lowcomm.join.settings import differences
from tests.join.test_join import STATUS, TASK, p2pd_pids, pasted, wait_until
from tests.join.test_shutdown import BROKEN, GroupNode, parent


def children(pid: int) -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit() and parent(int(p)) == pid}


def rounds(node: GroupNode) -> dict[int, tuple[int, str]]:
    """Swarm round -> (participants, phi digest) of the node's last status line for it."""
    out = {}
    for line in node.text().splitlines():
        m = STATUS.search(line)
        if m:
            out[int(m.group(1))] = (int(m.group(3)), m.group(5))
    return out


def test_two_nodes_of_two_ranks_train_together_and_stop_on_sigterm(tmp_path):
    args = [*TASK[:2], "--sync-every", "10", "--run-id", "nproc", "--nproc-per-node", "2"]
    first = GroupNode(tmp_path, "a", *args, "--wait-for", "2")
    nodes, ranks, daemons = [first], set(), set()
    try:
        line = wait_until(lambda: next((ln for ln in first.text().splitlines() if "lowcomm join --peers" in ln),
                                       None), 60, "the first node's join line")
        assert "--nproc-per-node 2" in line  # the pasted line starts a node of the same G
        second = GroupNode(tmp_path, "b", *pasted(line.strip()))
        nodes.append(second)

        def agreed():  # a round both nodes averaged as 2 workers, with one phi
            ra, rb = rounds(first), rounds(second)
            return [r for r in ra if r in rb and ra[r][0] == rb[r][0] == 2 and ra[r][1] == rb[r][1]]
        wait_until(lambda: len(agreed()) >= 2, 90, "two rounds of both nodes as 2 workers with equal phi")
        ranks = children(first.proc.pid) | children(second.proc.pid)
        daemons = {pid for pid in p2pd_pids() if parent(pid) in ranks}
        assert len(ranks) == 4 and len(daemons) == 4, (ranks, daemons)
        codes = [second.signal_group(signal.SIGTERM), first.signal_group(signal.SIGTERM)]
    finally:
        for node in nodes:
            node.kill()
        for pid in ranks:  # only if the test failed before the nodes stopped
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    texts = [n.text() for n in nodes]
    assert codes == [0, 0], [t[-3000:] for t in texts]
    for text in texts:
        assert not any(b in text for b in BROKEN), text[-3000:]
        assert "checkpoint written to" in text
    assert all(not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
               for pid in ranks), "a rank process outlived its node"
    wait_until(lambda: not (p2pd_pids() & daemons), 15, "every p2pd daemon of the ranks to exit")
    for name in "ab":  # one checkpoint per rank, at the same step
        steps = {json.loads((tmp_path / name / f"node-rank{r}.json").read_text())["meta"]["step"] for r in range(2)}
        assert len(steps) == 1, steps


def test_rank_ports_and_identity_files():
    assert with_port("/ip4/0.0.0.0/tcp/31337", 1) == "/ip4/0.0.0.0/tcp/31338"
    assert with_port("/ip4/127.0.0.1/tcp/0", 3) == "/ip4/127.0.0.1/tcp/0"
    assert with_port("", 1) == ""
    from pathlib import Path
    assert rank_identity(Path("ck/identity.key"), 2) == Path("ck/identity.rank2.key")


def test_a_node_of_another_g_is_named_in_the_refusal():
    mine, theirs = {"task": "t", "ranks_per_worker": 2}, {"task": "t"}  # a default node states no G
    assert differences(mine, theirs) == ["ranks_per_worker (2 here, 1 there)"]
    assert differences({"task": "t"}, {"task": "t"}) == []


def test_launcher_exit_code():
    assert exit_code([0, 0]) == 0
    assert exit_code([2, 1]) == 2          # rank 0 says why
    assert exit_code([0, -9]) == 137       # a rank killed by SIGKILL, as a shell reports it
    assert exit_code([0, 1, 130]) == 130


def test_bad_nproc_is_one_line(tmp_path):
    import sys
    from tests.join.test_join import ROOT
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "lowcomm", "join", "--nproc-per-node", "0", "--checkpoint-dir",
                          str(tmp_path / "c")], capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert out.returncode == 2 and time.monotonic() - start < 60
    assert "--nproc-per-node: must be >= 1, got 0" in out.stderr
