"""`lowcomm simulate` and `lowcomm plan`: files, determinism, agreement, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowcomm.config import SimulateConfig
from lowcomm.optimizers.registry import get_algorithm, settings_for
from lowcomm.sim import plan
from lowcomm.sim.network import TCP_EFFICIENCY, Network
from lowcomm.sim.report import MEASURED_FIELDS
from lowcomm.sim.simulate import simulate
from rich.console import Console

ROOT = Path(__file__).resolve().parents[2]
TINY = "tests.sim.tinytask:task"


def cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lowcomm", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_simulate_writes_every_file_and_repeats_exactly(tmp_path):
    args = ["simulate", "--task", TINY, "--steps", "40", "--eval-every", "10", "--sync-every", "10",
            "--fragments", "2", "--delay", "2", "--out", str(tmp_path), "--no-progress"]
    a = cli(*args, "--name", "a")
    b = cli(*args, "--name", "b")
    assert a.returncode == 0, a.stderr
    assert b.returncode == 0, b.stderr
    for name in ("config.json", "metrics.jsonl", "summary.json", "summary.md", "loss.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0
    assert (tmp_path / "a" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in MEASURED_FIELDS}
        return obj

    metrics = [[strip(json.loads(line)) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
               for r in "ab"]
    assert metrics[0] == metrics[1] and len(metrics[0]) == 5 * 5
    summaries = [strip(json.loads((tmp_path / r / "summary.json").read_text())) for r in "ab"]
    assert summaries[0] == summaries[1]
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert set(s) == {"ddp", "diloco", "streaming", "noloco", "sparseloco"}
    for entry in s.values():
        assert {"final_eval_loss", "bytes_sent_per_worker", "bytes_ratio_vs_ddp", "predicted_wall_clock_s",
                "compute_utilization"} <= set(entry)
    assert s["ddp"]["bytes_ratio_vs_ddp"] == 1.0
    assert s["diloco"]["bytes_ratio_vs_ddp"] > 5  # H = 10


def test_plan_agrees_with_simulate(tmp_path):
    cfg = SimulateConfig(task=TINY, steps=60, eval_every=30, sync_every=20, fragments=2, delay=3, workers=4,
                         step_time="20ms", bandwidth="2Mbit", latency="30ms", out=str(tmp_path), progress=False)
    run_dir = simulate(cfg, Console(file=open(os.devnull, "w")))
    summary = json.loads((run_dir / "summary.json").read_text())
    params = summary["ddp"]["params"]
    for alg, entry in summary.items():
        s = settings_for(alg, cfg.outer_options())
        assert entry["settings"] == {"algorithm": alg, "sync_every": s.sync_every, **s.options}
        numels = None
        if s.sync_every > 1:
            from lowcomm.optimizers.base import fragment_indices
            from tests.sim.tinytask import task
            named = list(task().make_model(0).named_parameters())
            numels = [sum(named[i][1].numel() for i in idx) for idx in
                      fragment_indices(named, s.fragments, "strided")]
            if alg == "noloco":
                numels = [2 * params]
        sched = get_algorithm(alg).schedule(s, params, 4, numels)
        predicted = plan.predict(sched, 0.02, Network(2e6, 0.03, TCP_EFFICIENCY), 60).utilization
        assert entry["compute_utilization"] < 1.0 or alg == "streaming"
        assert predicted == pytest.approx(entry["compute_utilization"], rel=2e-3), alg


def test_ddp_overlap_plan_agrees_with_simulate_and_changes_only_time(tmp_path):
    """ddp on a model of two buckets: the simulator's clocks are plan's and
    `ddp_step_time`'s; overlapping the backward pass moves no byte and no loss."""
    from lowcomm.sim.overlap import bucket_numels, ddp_step_time
    from tests.sim.tinytask import wide

    numels = [p.numel() for p in wide().make_model(0).parameters()]
    assert len(bucket_numels(numels)) == 2
    net = Network(2e9, 1e-3, TCP_EFFICIENCY)
    out = {}
    for share in ("0.8", "0"):
        cfg = SimulateConfig(task="tests.sim.tinytask:wide", algorithms="ddp", steps=30, eval_every=30, workers=4,
                             step_time="20ms", backward_share=share, bandwidth="2Gbit", latency="1ms",
                             out=str(tmp_path), name=f"share{share}", progress=False)
        run_dir = simulate(cfg, Console(file=open(os.devnull, "w")))
        out[share] = json.loads((run_dir / "summary.json").read_text())["ddp"]
        config = json.loads((run_dir / "config.json").read_text())
        assert config["backward_share"] == float(share) and config["backward_share_measured"] is False
        sched = get_algorithm("ddp").schedule(settings_for("ddp"), sum(numels), 4)
        clock = plan.predict(sched, 0.02, net, 30, float(share), numels)
        assert out[share]["compute_utilization"] == pytest.approx(clock.utilization, rel=1e-9)
        assert out[share]["predicted_wall_clock_s"] == pytest.approx(clock.now, rel=1e-9)
        wall, _ = ddp_step_time(numels, 0.02, float(share), net, 4)
        assert out[share]["predicted_wall_clock_s"] == pytest.approx(30 * wall, rel=1e-9)
    overlapped, after = out["0.8"], out["0"]
    for key in ("final_eval_loss", "bytes_sent_per_worker", "bytes_received_per_worker", "peak_exchange_bytes"):
        assert overlapped[key] == after[key], key
    # the first bucket's all-reduce (8.3 ms) starts 8.1 ms before the backward pass ends
    assert overlapped["stall_s"] < 0.6 * after["stall_s"]
    assert overlapped["compute_utilization"] > after["compute_utilization"]


def test_plan_prints_a_table():
    r = cli("plan", "--params", "125M", "--step-time", "500ms", "--workers", "8", "--bandwidth", "1Gbit")
    assert r.returncode == 0, r.stderr
    for alg in ("ddp", "diloco", "streaming", "noloco"):
        assert alg in r.stdout
    assert "bandwidth for 95%" in r.stdout.replace("\n", " ") or "95%" in r.stdout


@pytest.mark.parametrize("args,flag", [
    (["--workers", "0"], "--workers"),
    (["--algorithms", "ddp,magic"], "--algorithms"),
    (["--bandwidth", "10 potatoes"], "--bandwidth"),
    (["--task", "no_such_module_xyz:make"], "--task"),
    (["--task", "tests.sim.tinytask:broken"], "--task"),
    (["--step-time", "soon"], "--step-time"),
    (["--backward-share", "1.5"], "--backward-share"),
    (["--step-time-jitter", "-0.1"], "--step-time-jitter"),
    (["--ranks-per-worker", "0"], "--ranks-per-worker"),
    (["--ranks-per-worker", "-2"], "--ranks-per-worker"),
    (["--sync-every", "10", "--fragments", "3"], "--streaming"),
])
def test_bad_input_is_one_line_exit_2(args, flag):
    r = cli("simulate", "--task", TINY, "--steps", "5", "--no-progress", *args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and flag in lines[0], r.stderr


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("simulate", "--data", str(tmp_path / "empty"), "--steps", "5", "--no-progress")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--data" in r.stderr and "no files" in r.stderr


def test_config_file_and_flag_precedence(tmp_path):
    (tmp_path / "c.toml").write_text('workers = 3\nsteps = 7\nalgorithms = "diloco"\n')
    r = cli("simulate", "--config", str(tmp_path / "c.toml"), "--steps", "0", "--task", TINY, "--no-progress")
    assert r.returncode == 2 and "--steps" in r.stderr  # the flag (0) beat the file (7), then failed validation
    r = cli("simulate", "--config", str(tmp_path / "c.toml"), "--task", TINY, "--sync-every", "7",
            "--out", str(tmp_path), "--name", "x", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "workers = 3 (from config file)" in r.stdout and "sync_every = 7 (from flag)" in r.stdout
    config = json.loads((tmp_path / "x" / "config.json").read_text())
    assert config["simulate"]["workers"] == 3 and config["steps"] == 7


def test_step_factors_have_mean_one_the_asked_spread_and_repeat():
    import itertools
    import statistics

    from lowcomm.sim.runner import step_factors
    assert list(itertools.islice(step_factors(0.0, 0, 3), 4)) == [1.0] * 4
    draws = list(itertools.islice(step_factors(0.4, 7, 1), 100_000))
    assert statistics.fmean(draws) == pytest.approx(1.0, abs=0.01)
    assert statistics.pstdev(draws) / statistics.fmean(draws) == pytest.approx(0.4, abs=0.01)
    assert draws[:50] == list(itertools.islice(step_factors(0.4, 7, 1), 50))   # seeded by (seed, rank)
    assert draws[:50] != list(itertools.islice(step_factors(0.4, 7, 2), 50))


def test_step_time_jitter_makes_each_round_wait_for_its_slowest_worker(tmp_path):
    """DiLoCo, 2 workers, a network that costs nothing: each of the 4 rounds ends
    when the slower worker has done its 10 steps, so the wall clock is the sum
    over rounds of the larger of the two workers' compute (their step factors
    drawn as the simulator draws them)."""
    import itertools

    from lowcomm.sim.runner import step_factors
    walls = {}
    for cv in (0.0, 0.5):
        cfg = SimulateConfig(task=TINY, algorithms="diloco", steps=40, eval_every=40, sync_every=10, workers=2,
                             step_time="10ms", step_time_jitter=cv, bandwidth="100000Gbit", latency="0ms",
                             out=str(tmp_path), name=f"cv{cv}", progress=False)
        run_dir = simulate(cfg, Console(file=open(os.devnull, "w")))
        walls[cv] = json.loads((run_dir / "summary.json").read_text())["diloco"]["predicted_wall_clock_s"]
    f = [list(itertools.islice(step_factors(0.5, 0, r), 40)) for r in range(2)]
    expected = sum(max(sum(0.01 * x for x in f[r][k:k + 10]) for r in range(2)) for k in range(0, 40, 10))
    assert walls[0.0] == pytest.approx(0.4, rel=1e-6)
    assert walls[0.5] == pytest.approx(expected, rel=1e-6)
    assert walls[0.5] > 0.4 * 1.05   # the slower of two: above the mean step time


def test_ranks_per_worker_one_changes_nothing(tmp_path):
    args = ["simulate", "--task", TINY, "--steps", "20", "--eval-every", "10", "--sync-every", "10", "--workers", "2",
            "--algorithms", "ddp,diloco,noloco", "--step-time", "10ms", "--out", str(tmp_path), "--no-progress"]
    a = cli(*args, "--name", "a")
    b = cli(*args, "--name", "b", "--ranks-per-worker", "1")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    for name in ("summary.json", "metrics.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    for entry in s.values():
        assert entry["ranks_per_worker"] == 1 and entry["bytes_sent_per_rank"] == [entry["bytes_sent_per_worker"]]


def test_ranks_per_worker_split_bytes_and_wall_clock_by_hand(tmp_path):
    """DiLoCo (codec none), 2 workers of G = 2 ranks, 161 parameters, H = 10, 20
    steps of 10 ms: each rank averages its slice (slice_bounds: 81 and 80 values)
    by butterfly with the other worker's same rank; the two slices share the
    worker's link, one latency per phase."""
    from lowcomm.averaging import shard_bounds
    from lowcomm.compressors import get_compressor, wire_size
    from lowcomm.optimizers.worker_group import slice_bounds

    cfg = SimulateConfig(task=TINY, algorithms="diloco", steps=20, eval_every=10, sync_every=10, workers=2,
                         ranks_per_worker=2, step_time="10ms", bandwidth="100Mbit", latency="50ms",
                         out=str(tmp_path), progress=False)
    run_dir = simulate(cfg, Console(file=open(os.devnull, "w")))
    s = json.loads((run_dir / "summary.json").read_text())["diloco"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["simulate"]["ranks_per_worker"] == 2 and s["ranks_per_worker"] == 2
    none = get_compressor("none")
    slices = slice_bounds(161, 2, none.unit)
    assert slices == [(0, 81), (81, 161)]
    # a member of a butterfly of 2 sends the other's shard of its slice, then the mean of its own
    per_round = [sum(wire_size(none, hi - lo) for lo, hi in shard_bounds(b - a, 2)) for a, b in slices]
    assert s["bytes_sent_per_rank"] == [2 * per_round[0], 2 * per_round[1]]
    assert s["bytes_sent_per_worker"] == sum(s["bytes_sent_per_rank"])
    # worker 0, each phase: slice 0 moves 41 or 40 values each way, slice 1 40; the larger way is 41 + 40 values
    phase = (wire_size(none, 41) + wire_size(none, 40)) * 8 / (100e6 * TCP_EFFICIENCY)
    assert s["predicted_wall_clock_s"] == pytest.approx(2 * (10 * 0.01 + 2 * 0.05 + 2 * (phase + 0.05)), rel=1e-12)
    assert s["tokens"] == 20 * 2 * 2 * 32   # G micro-batches of 32 per worker step
