"""`lowcomm join`: refusal of other settings, corrupt checkpoints, and errors a volunteer can act on."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from lowcomm.checkpoint import CheckpointError, load_state, save_state
from lowcomm.config import JoinConfig
from lowcomm.join.checkpoints import NodeCheckpoint
from lowcomm.join.node import Node
from lowcomm.sim import LocalSwarm
from lowcomm.optimizers.registry import build_optimizer
from tests.join.test_join import TASK, NodeProc, p2pd_pids, pasted, wait_until

ROOT = Path(__file__).resolve().parents[2]


def join(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300"}
    return subprocess.run([sys.executable, "-m", "lowcomm", "join", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def one_error_line(r) -> str:
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_unreachable_bootstrap_peer(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    addr = f"/ip4/127.0.0.1/tcp/{port}/p2p/QmPPJKZbroDaVDDgtdfg4TiyFy94VccTNiJQn75GFkft3e"
    line = one_error_line(join(*TASK, "--peers", addr, cwd=tmp_path))
    assert f"could not reach {addr}; check the address and that the port is open" in line


def test_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_error_line(join(*TASK, "--listen", f"/ip4/127.0.0.1/tcp/{port}", cwd=tmp_path))
    assert "--listen" in line and f"port {port}" in line


def test_malformed_multiaddrs(tmp_path):
    for bad, words in (("127.0.0.1:31337", "not a multiaddr"), ("/ip4/1.2.3.4/tcp/31337", "/p2p/"),
                       ("/ip4/1.2.3.999/tcp/1/p2p/QmPPJKZbroDaVDDgtdfg4TiyFy94VccTNiJQn75GFkft3e", "IPv4")):
        line = one_error_line(join(*TASK, "--peers", bad, cwd=tmp_path))
        assert "--peers" in line and words in line


def test_a_node_with_other_settings_is_refused(tmp_path):
    before = p2pd_pids()
    a = NodeProc("a", *TASK, cwd=tmp_path)
    try:
        line = wait_until(lambda: a.grep(r"^lowcomm join --peers "), 60, "the join line")[0]
        addr = line.split()[3]
        other = [a if a != "20" else "10" for a in TASK]  # sync_every 10 instead of 20
        err = one_error_line(join(*other, "--peers", addr, cwd=tmp_path))
        assert "refused by" in err and "run 'itest' settings" in err and "sync_every (10 here, 20 there)" in err
        err = one_error_line(join(*[x if x != "itest" else "other" for x in TASK], "--peers", addr, cwd=tmp_path))
        assert "run id ('other' here, 'itest' there)" in err
        assert a.stop(signal.SIGTERM) == 0
    finally:
        a.kill()
    wait_until(lambda: p2pd_pids() <= before, 15, "every p2pd to exit")


def _node(tmp_path) -> tuple[Node, NodeCheckpoint]:
    cfg = JoinConfig(task="tests.sim.tinytask:task", checkpoint_dir=str(tmp_path), sync_every=5)
    console = Console(file=open(os.devnull, "w"))
    node = Node(cfg, console)
    node._build()
    node.opt = build_optimizer(node.settings, node.model, node.inner, LocalSwarm(1).averager(0))
    return node, NodeCheckpoint(tmp_path, node.hash, cfg.run_id, console)


def test_corrupt_or_truncated_checkpoint_is_reported_and_skipped(tmp_path):
    node, checkpoint = _node(tmp_path)
    data = node.task.batches(0, 1, 0)
    for _ in range(7):
        node.task.loss(node.model, next(data)).backward()
        node.opt.step()
        node.opt.zero_grad()
    checkpoint.save(node.model, node.opt)
    fresh, checkpoint = _node(tmp_path)
    assert checkpoint.load(fresh.model, fresh.opt) == 7
    path = tmp_path / "node.safetensors"
    good = path.read_bytes()
    for broken in (good[: len(good) // 2], good[:-1] + bytes([good[-1] ^ 1])):
        path.write_bytes(broken)
        fresh, checkpoint = _node(tmp_path)
        messages = []
        checkpoint.console.print = lambda *a, **k: messages.append(" ".join(map(str, a)))
        assert checkpoint.load(fresh.model, fresh.opt) is None
        assert fresh.opt.step_count == 0 and any("skipping checkpoint" in m for m in messages)
        try:
            load_state(tmp_path / "node")
            raise AssertionError("a broken checkpoint loaded")
        except CheckpointError as e:
            assert "truncated" in str(e) or "checksum" in str(e)


def test_checkpoints_are_written_atomically(tmp_path):
    save_state(tmp_path / "x", {"a": [1, 2.5, None], "t": __import__("torch").arange(3.0)}, {"step": 3})
    state, meta = load_state(tmp_path / "x")
    assert state["a"] == [1, 2.5, None] and state["t"].tolist() == [0.0, 1.0, 2.0] and meta == {"step": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.safetensors"]  # no temp files left


def test_a_private_swarm_admits_only_holders_of_its_secret(tmp_path):
    before = p2pd_pids()
    secret = tmp_path / "swarm.secret"
    secret.write_bytes(bytes(range(32)))
    a = NodeProc("a", *TASK, "--secret-file", str(secret), cwd=tmp_path)
    b = None
    try:
        line = wait_until(lambda: a.grep(r"^lowcomm join --peers "), 60, "the join line")[0]
        assert f"--secret-file {secret}" in line and a.grep("a private swarm: copy")
        assert a.grep(r"^peer id \w{40,} \(its key: checkpoints/identity.key\)")  # what --allow lists
        addr = line.split()[3]
        b = NodeProc("b", *pasted(line), cwd=tmp_path)  # the printed line, secret included
        wait_until(lambda: any(r[2] == 2 for r in b.rounds()), 90, "b to average with a")
        wrong = tmp_path / "wrong.secret"
        wrong.write_bytes(bytes(range(1, 33)))
        err = one_error_line(join(*TASK, "--peers", addr, "--secret-file", str(wrong), cwd=tmp_path))
        assert "refused by" in err and "not a member of its private swarm" in err
        err = one_error_line(join(*TASK, "--peers", addr, cwd=tmp_path))
        assert "runs a private swarm; join it with its --secret-file" in err
        assert a.stop(signal.SIGTERM) == 0 and b.stop(signal.SIGTERM) == 0
    finally:
        for n in (a, b):
            if n is not None:
                n.kill()
    wait_until(lambda: p2pd_pids() <= before, 15, "every p2pd to exit")


def test_bad_secret_files_and_allowlists(tmp_path):
    line = one_error_line(join(*TASK, "--secret-file", str(tmp_path / "missing"), cwd=tmp_path))
    assert "--secret-file" in line and "cannot read" in line and "head -c 32 /dev/urandom" in line
    (tmp_path / "short").write_bytes(b"12345")
    line = one_error_line(join(*TASK, "--secret-file", str(tmp_path / "short"), cwd=tmp_path))
    assert "holds 5 bytes; a secret needs at least 16" in line
    line = one_error_line(join(*TASK, "--allow", "alice,bob", cwd=tmp_path))
    assert "--allow" in line and "'alice' is not a peer id" in line


def test_the_aggregator_is_a_run_setting_nodes_must_share():
    from lowcomm.join.settings import differences, run_settings, settings_hash
    from lowcomm.optimizers.registry import settings_for
    from tests.sim.tinytask import task

    model, s = task().make_model(0), settings_for("diloco")
    mine = run_settings("t", "", model, s, "trimmed_mean")
    theirs = run_settings("t", "", model, s, "mean")
    assert settings_hash(mine) != settings_hash(theirs)
    assert differences(mine, theirs) == ["aggregator ('trimmed_mean' here, 'mean' there)"]


def test_a_bad_aggregator_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lowcomm", "join", "--aggregator", "best", "--checkpoint-dir",
                        str(tmp_path)], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 2 and "--aggregator" in r.stderr and "trimmed_mean" in r.stderr


def test_a_negative_wait_for_is_one_line(tmp_path):
    line = one_error_line(join("--wait-for", "-1", "--checkpoint-dir", str(tmp_path), cwd=tmp_path))
    assert "--wait-for" in line and "must be >= 0, got -1" in line


def test_a_bad_log_level_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300", "LOWCOMM_LOG": "loud"}
    r = subprocess.run([sys.executable, "-m", "lowcomm", "join", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=120)
    assert one_error_line(r) == "LOWCOMM_LOG must be debug, info, warning or error, got 'loud'"
