"""`lowcomm join`: three nodes on loopback, a SIGKILL, a restart that catches up, clean exits."""

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TASK = ["--task", "tests.sim.tinytask:task", "--sync-every", "20", "--run-id", "itest"]


def pasted(join_line: str) -> list[str]:
    """The arguments of a printed `lowcomm join ...` line, as a shell would split them."""
    return shlex.split(join_line)[2:]
STATUS = re.compile(r"round\s+(\d+) \| step\s+(\d+) \| peers (\d+)/(\d+) .* phi (\w+)")


def p2pd_pids() -> set[int]:
    return {int(p) for p in subprocess.run(["pgrep", "-x", "p2pd"], capture_output=True, text=True).stdout.split()}


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class NodeProc:
    """A `lowcomm join` process whose output lines are collected by a thread."""

    def __init__(self, name: str, *args: str, cwd: Path = ROOT):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
        self.name = name
        self.proc = subprocess.Popen([sys.executable, "-m", "lowcomm", "join", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=cwd, env=env)
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def rounds(self) -> list[tuple[int, int, int, int, str]]:
        return [tuple(int(g) if g.isdigit() else g for g in m.groups())
                for m in map(STATUS.search, list(self.lines)) if m]

    def grep(self, pattern: str) -> list[str]:
        return [line for line in list(self.lines) if re.search(pattern, line)]

    def stop(self, sig=signal.SIGTERM, timeout: float = 10.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def nodes():
    made: list[NodeProc] = []
    before = p2pd_pids()

    def start(name, *args, cwd=ROOT):
        node = NodeProc(name, *args, cwd=cwd)
        made.append(node)
        return node

    try:
        yield start
    finally:
        for n in made:
            n.kill()
            print(f"--- {n.name} (last lines; pytest shows them when the test fails) ---")
            print("\n".join(line[:160] for line in n.lines[-15:]))
            if os.environ.get("JOIN_TEST_LOGS"):
                Path(os.environ["JOIN_TEST_LOGS"], f"{n.name}.log").write_text("\n".join(n.lines))
    wait_until(lambda: p2pd_pids() <= before, 15, "every p2pd to exit")


@pytest.mark.parametrize("backend", ["hivemind", "libp2p"])
def test_three_nodes_survive_a_kill_and_agree_after_catch_up(nodes, tmp_path, backend):
    # every node runs in tmp_path with the default checkpoint folder; the joiners run the printed line as is
    a = nodes("a", *TASK, "--backend", backend, "--log-to", "jsonl:a.jsonl", cwd=tmp_path)
    join_line = wait_until(lambda: a.grep(r"^lowcomm join --peers "), 60, "the join line")[0]
    assert "--log-to" not in join_line  # each node's own
    b = nodes("b", *pasted(join_line), cwd=tmp_path)
    wait_until(lambda: b.grep("caught up from|^round"), 60, "b to start")
    c = nodes("c", *pasted(join_line), cwd=tmp_path)
    everyone = (a, b, c)
    wait_until(lambda: all(sum(r[2] == 3 for r in n.rounds()) >= 3 for n in everyone), 90,
               "3 rounds with all three nodes")

    c.kill()  # SIGKILL: no cleanup at all
    seen = {n.name: len(n.rounds()) for n in (a, b)}
    wait_until(lambda: all(len(n.rounds()) >= seen[n.name] + 3 for n in (a, b)), 60,
               "a and b to keep training without c")

    c2 = nodes("c2", *pasted(join_line), cwd=tmp_path)  # takes over the dead node's folder and identity
    wait_until(lambda: c2.grep("caught up from"), 120, "the restarted node to catch up")

    def agreed():  # swarm rounds (same step on every node) where all three took part and hold one phi
        by_round = [{r[0]: r[4] for r in n.rounds() if r[2] == 3} for n in (a, b, c2)]
        common = set(by_round[0]) & set(by_round[1]) & set(by_round[2])
        return [r for r in sorted(common) if len({d[r] for d in by_round}) == 1]

    rounds = wait_until(agreed, 180, "a full round after the restart with identical global weights")
    assert rounds

    for n in (a, b, c2):
        assert n.stop(signal.SIGTERM) == 0, "\n".join(n.lines[-20:])
    start = float(re.findall(r"eval loss ([\d.]+) at step 0", "\n".join(a.lines))[0])  # the fresh model
    for n in (a, b, c2):
        evals = [float(x) for x in re.findall(r"eval loss ([\d.]+)", "\n".join(n.lines))]
        assert evals[-1] < start / 10
        assert n.grep("checkpoint written")
    check_records(a, tmp_path / "a.jsonl")
    folders = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoints"))
    assert folders == ["checkpoints", "checkpoints-2", "checkpoints-3"]
    assert all((tmp_path / f / "node.safetensors").exists() for f in folders)
    assert c2.grep("caught up from") and not c2.grep("using checkpoint folder checkpoints-4")


def check_records(node: NodeProc, path: Path) -> None:
    """``--log-to``'s records match the node's status lines: a start, one per round, a stop."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    start, rounds, stop = records[0], records[1:-1], records[-1]
    assert start["event"] == "start" and start["step"] == 0 and node.grep(f"^peer id {start['peer_id']} ")
    assert [(r["round"], r["step"], r["participants"], r["members"]) for r in rounds] == \
        [line[:4] for line in node.rounds()]
    assert all(list(r) == ["t", "step", "round", "participants", "members", "excluded", "loss", "tokens_per_s",
                           "bytes_sent", "bytes_received", "round_s", "compute_s", "wait_s"] for r in rounds)
    for before, after in zip(rounds, rounds[1:]):
        for key in ("t", "bytes_sent", "bytes_received", "compute_s", "wait_s"):  # (a catch-up may move step)
            assert after[key] >= before[key], key
    assert all(0 < r["compute_s"] + r["wait_s"] <= r["t"] for r in rounds)
    assert rounds[-1]["bytes_sent"] > 0 and rounds[-1]["bytes_received"] > 0
    loss, step = re.findall(r"eval loss ([\d.]+) at step (\d+)", "\n".join(node.lines))[-1]
    assert (stop["event"], f"{stop['eval_loss']:.4f}", stop["step"]) == ("stop", loss, int(step))
