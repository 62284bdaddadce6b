"""The swarm over real backends on loopback (hivemind's go-libp2p daemon and
py-libp2p), each node its own process: the two cannot share one."""

import json
import os
import time
import subprocess
import sys
from pathlib import Path

import pytest



ROOT = Path(__file__).resolve().parents[2]
BACKENDS = pytest.mark.parametrize("backend", ["hivemind", "libp2p"])


def p2pd_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "p2pd"], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def assert_no_new_daemons(before: set[int], timeout: float = 15) -> None:
    """Every p2pd started since ``before`` exits within ``timeout`` (a daemon whose
    node died hard is killed by the node's watchdog, a moment later)."""
    deadline = time.monotonic() + timeout
    while not p2pd_pids() <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert p2pd_pids() <= before, "a p2pd daemon outlived its node"


def run_nodes(job: str, count: int, backend: str = "hivemind", extra=(), timeout: float = 150,
              logs: list | None = None) -> list[list[dict]]:
    """Start ``count`` nodes (rank 0 first, the rest joining it); return each node's JSON lines
    (and append each node's stderr to ``logs``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "tests.p2p.node", "--backend", backend, "--count", str(count), "--job", job,
           *extra]
    before = p2pd_pids()
    procs = [subprocess.Popen([*cmd, "--rank", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT, env=env)]
    try:
        first = json.loads(procs[0].stdout.readline())
        procs += [subprocess.Popen([*cmd, "--rank", str(r), "--peers", *first["addrs"]], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env) for r in range(1, count)]
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        if logs is not None:
            logs.append(err)
    assert_no_new_daemons(before)
    return [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out, _ in outputs]


@BACKENDS
def test_four_peers_average_exactly_with_none_and_within_bound_with_int8_and_pair_up(backend):
    lines = run_nodes("average", 4, backend)
    by_check = {}
    for node in lines:
        for rec in node:
            by_check.setdefault((rec.get("check"), rec.get("codec")), []).append(rec)
    exact = by_check[("mean", "none")]
    assert len(exact) == 4 and all(r["averaged"] and r["participants"] == 4 for r in exact)
    assert all(r["max_err"] <= 1e-6 for r in exact)
    assert len({r["digest"] for r in exact}) == 1
    int8 = by_check[("mean", "int8")]
    assert all(r["max_err"] <= 2 * r["absmax"] / 254 for r in int8)  # two int8 roundings (contribution, mean)
    assert len({r["digest"] for r in int8}) == 1
    assert all(r["bytes_sent"] < exact[0]["bytes_sent"] / 3 for r in int8)
    pairs = by_check[("pairs", None)]
    groups = {tuple(r["participants"]) for r in pairs}
    assert len(groups) == 2 and all(len(g) == 2 for g in groups)
    assert sorted(p for g in groups for p in g) == sorted(r["me"] for r in pairs)
    for g in groups:
        assert len({r["digest"] for r in pairs if r["me"] in g}) == 1


@BACKENDS
def test_diloco_with_three_peers_trains_and_agrees(backend):
    lines = run_nodes("diloco", 3, backend)
    recs = [node[-1] for node in lines]
    assert all(r["check"] == "diloco" and r["rounds"] == 3 and r["group"] == 3 for r in recs)
    assert all(r["not_averaged"] == 0 for r in recs)
    assert all(r["after"] < r["before"] for r in recs)
    assert len({r["phi"] for r in recs}) == 1  # identical global weights after a round where all took part
    assert len({r["theta"] for r in recs}) == 1


@BACKENDS
def test_a_peer_killed_mid_round_leaves_the_mean_of_the_others(backend):
    lines = run_nodes("crash", 4, backend)
    survivors = [node[-1] for node in lines if node and node[-1].get("check") == "crash"]
    assert len(survivors) == 3
    for r in survivors:
        assert r["averaged"] and r["all_shards"] and r["participants"] == 3
        assert r["max_err"] <= 1e-6
    assert len({r["digest"] for r in survivors}) == 1


def test_five_peers_with_a_scaling_attacker_trimmed_and_excluded():
    from lowcomm.sim.attacks import train_under_attack
    from lowcomm.tasks import load_task

    logs: list[str] = []
    lines = run_nodes("hostile", 5, extra=["--aggregator", "trimmed_mean", "--steps", "200"], timeout=240,
                      logs=logs)
    recs = [node[-1] for node in lines]
    (attacker,) = [r["me"] for r in recs if r["hostile"]]
    honest = [(r, log) for r, log in zip(recs, logs) if not r["hostile"]]
    clean = train_under_attack(load_task("codeclass"), 5, "trimmed_mean", None, steps=200)  # the same loop, no attacker
    loss = sum(r["loss"] for r, _ in honest) / len(honest)
    assert loss <= 1.05 * clean, (loss, clean)
    for r, log in honest:  # excluded within 3 rounds of 10, and named in every honest node's log
        assert attacker in r["excluded"]
        assert f"excluding {attacker}" in log
    assert next(r for r in recs if r["hostile"])["not_averaged"] >= 1  # it was left out of rounds


def test_interpreter_exit_without_close_stops_the_daemon():
    before = p2pd_pids()
    code = ("from lowcomm.p2p import Swarm\n"
            "s = Swarm.create(run_id='exit-test')\n"
            "import subprocess; print(len(subprocess.run(['pgrep', '-x', 'p2pd'], capture_output=True, text=True)"
            ".stdout.split()))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) >= 1  # the daemon was running while the node was up
    assert_no_new_daemons(before)       # and is gone once the interpreter exited
