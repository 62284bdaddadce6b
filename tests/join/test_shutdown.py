"""A node stopped as a user stops it prints no traceback, on both backends
(and a node started with --wait-for trains only once the swarm has that many nodes).

A Ctrl+C in a terminal goes to the whole foreground process group, and
``kill -TERM -PGID`` (or a process supervisor) too: the signal reaches the
node and every process it started. Each node here runs in a process group of
its own and gets the signal the way a terminal sends it; its whole output is
then searched for what a broken shutdown prints.
"""

import os
import signal
import subprocess
import sys

import pytest

from tests.join.test_join import ROOT, STATUS, TASK, p2pd_pids, pasted, wait_until

BROKEN = ("Traceback", "Task was destroyed", "Task exception was never retrieved", "error while stopping",
          "Exception ignored")


def parent(pid: int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0


class GroupNode:
    """A `lowcomm join` process leading a process group of its own, output collected."""

    def __init__(self, tmp_path, name: str, *args: str):
        self.out = tmp_path / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
        with open(self.out, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "lowcomm", "join", *args,
                                          "--checkpoint-dir", str(tmp_path / name)],
                                         stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                         start_new_session=True)

    def text(self) -> str:
        return self.out.read_text()

    def rounds(self) -> int:
        return sum(1 for line in self.text().splitlines() if STATUS.search(line))

    def signal_group(self, sig: int) -> int:
        os.killpg(self.proc.pid, sig)  # what a terminal's Ctrl+C does
        return self.proc.wait(60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.mark.parametrize("backend", ["hivemind", "libp2p"])
def test_ctrl_c_and_group_sigterm_print_no_traceback(tmp_path, backend):
    args = [*TASK, "--backend", backend]
    first = GroupNode(tmp_path, "a", *args, "--wait-for", "2")  # trains only once the second node is in
    nodes = [first]
    try:
        line = wait_until(lambda: next((ln for ln in first.text().splitlines() if "lowcomm join --peers" in ln),
                                       None), 90, "the first node's join line")
        second = GroupNode(tmp_path, "b", *pasted(line.strip()))
        nodes.append(second)
        wait_until(lambda: second.rounds() >= 2 and first.rounds() >= 2, 120, "two rounds on both nodes")
        daemons = {pid for pid in p2pd_pids() if parent(pid) in (first.proc.pid, second.proc.pid)}
        assert len(daemons) == (2 if backend == "hivemind" else 0)
        codes = [second.signal_group(signal.SIGINT), first.signal_group(signal.SIGTERM)]
    finally:
        for node in nodes:
            node.kill()
    assert codes == [0, 0], [n.text()[-2000:] for n in nodes]
    lines = first.text().splitlines()
    waited = lines.index("waiting for 2 nodes: 1 in the swarm")
    started = lines.index("2 nodes in the swarm: starting")
    first_round = next(i for i, ln in enumerate(lines) if STATUS.search(ln))
    assert waited < started < first_round
    for node in nodes:
        out = node.text()
        assert "stopping: leaving the current round" in out
        assert "checkpoint written to" in out
        found = [b for b in BROKEN if b in out]
        assert not found, f"{node.out.name} printed {found}:\n{out[-3000:]}"
    assert daemons & p2pd_pids() == set()  # every daemon stopped
