"""Metric sinks: spec parsing (good and bad), JSON lines written, flushed and read back;
TensorBoard scalars (ours and `lowcomm simulate`'s) read back by TensorBoard's own reader;
W&B offline runs read back by wandb's own (where wandb is installed)."""

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowcomm.compressors.base import codec_class
from lowcomm.config import ConfigError
from lowcomm.metrics import SINKS, JsonlSink, Sinks, TensorBoardSink, open_sinks, parse_sinks, scalars
from lowcomm.sim.network import exchange_phases

ROOT = Path(__file__).resolve().parents[1]


def test_specs_parse_into_kind_and_argument():
    assert parse_sinks("") == []
    assert parse_sinks("jsonl:a.jsonl") == [("jsonl", "a.jsonl")]
    assert parse_sinks(" jsonl:a.jsonl , jsonl:/tmp/x:y.jsonl,") == [("jsonl", "a.jsonl"), ("jsonl", "/tmp/x:y.jsonl")]
    assert parse_sinks("tensorboard:tb,wandb,wandb:proj,wandb:") == [("tensorboard", "tb"), ("wandb", ""),
                                                                      ("wandb", "proj"), ("wandb", "")]
    assert list(SINKS) == ["jsonl", "tensorboard", "wandb"]


KINDS = "kinds: jsonl, tensorboard, wandb"


@pytest.mark.parametrize("spec, message", [
    ("metrics.jsonl", f"--log-to: 'metrics.jsonl' is not KIND:ARG; write e.g. jsonl:metrics.jsonl ({KINDS})"),
    ("csv:m.csv", f"--log-to: unknown sink kind 'csv' in 'csv:m.csv'; {KINDS}"),
    ("jsonl:a.jsonl,mlflow:x", f"--log-to: unknown sink kind 'mlflow' in 'mlflow:x'; {KINDS}"),
    ("jsonl:", "--log-to: jsonl: needs a file: jsonl:PATH"),
    ("jsonl", "--log-to: jsonl: needs a file: jsonl:PATH"),
    ("tensorboard", "--log-to: tensorboard: needs a folder: tensorboard:DIR"),
])
def test_bad_specs_are_config_errors_naming_the_kinds(spec, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        open_sinks(spec)
    assert (e.value.flag, str(e.value)) == ("--log-to", message)
    assert list(tmp_path.iterdir()) == []  # nothing opened was left behind


@pytest.mark.parametrize("kind, module", [("tensorboard:tb", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_package_is_a_config_error_with_the_pip_command(kind, module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    monkeypatch.chdir(tmp_path)
    name = kind.partition(":")[0]
    with pytest.raises(ConfigError) as e:
        open_sinks(f"jsonl:a.jsonl,{kind}")
    assert str(e.value) == f"--log-to: {name}: needs the {name} package: pip install 'lowcomm[{name}]'"
    assert [p.name for p in tmp_path.iterdir()] == ["a.jsonl"]  # opened before, closed, empty
    assert (tmp_path / "a.jsonl").read_text() == ""


def test_a_file_that_cannot_be_opened_is_a_config_error_for_the_given_flag(tmp_path):
    with pytest.raises(ConfigError) as e:
        open_sinks(f"jsonl:{tmp_path}/missing/m.jsonl", flag="--metrics")
    assert str(e.value) == f"--metrics: jsonl: cannot open {tmp_path}/missing/m.jsonl (No such file or directory)"


def test_jsonl_records_round_trip_flushed_per_line_and_appended(tmp_path):
    path = tmp_path / "m.jsonl"
    sinks = open_sinks(f"jsonl:{path}")
    assert isinstance(sinks, Sinks) and [type(s) for s in sinks.sinks] == [JsonlSink]
    first = {"t": 0.5, "step": 20, "round": 1, "loss": 2.25, "peer_id": "12D3KooWabc", "excluded": 0}
    sinks.write(first)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [first]  # readable before close
    sinks.write({"step": 40, "loss": math.nan, "tokens_per_s": math.inf, "list": [1.0, -math.inf]})
    sinks.close()
    again = open_sinks(f"jsonl:{path}")  # appends: a restarted node keeps the earlier records
    again.write({"event": "start", "step": 40})
    again.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all(line.startswith("{") for line in lines)
    assert json.loads(lines[1]) == {"step": 40, "loss": None, "tokens_per_s": None, "list": [1.0, None]}
    assert json.loads(lines[2]) == {"event": "start", "step": 40}
    assert list(json.loads(lines[0])) == list(first)  # key order kept


def test_an_empty_spec_opens_nothing():
    sinks = open_sinks("")
    assert sinks.sinks == []
    sinks.write({"step": 1})
    sinks.close()


JOIN_ROUND = {"t": 2.5, "step": 10, "round": 2, "participants": 3, "members": 4, "excluded": 1, "loss": 0.75,
              "tokens_per_s": 100.0, "bytes_sent": 640, "bytes_received": 1280, "round_s": 0.125,
              "compute_s": 1.75, "wait_s": 0.5}
JOIN_TAGS = {"time/t": 2.5, "swarm/round": 2.0, "swarm/participants": 3.0, "swarm/members": 4.0,
             "swarm/excluded": 1.0, "train/loss": 0.75, "train/tokens_per_s": 100.0, "net/bytes_sent": 640.0,
             "net/bytes_received": 1280.0, "time/round_s": 0.125, "time/compute_s": 1.75, "time/wait_s": 0.5}


def test_records_map_to_namespaced_tags_at_their_step():
    assert scalars(JOIN_ROUND) == ("", 10, JOIN_TAGS)
    assert scalars({"algorithm": "diloco", "step": 5, "loss": 0.5, "peer_id": "12D3KooW", "ok": True,
                    "gap": None, "grad_norm": 3}) == ("diloco", 5, {"train/loss": 0.5, "other/grad_norm": 3.0})
    # an event gives its eval tags only (its counters repeat the rounds'); no step: step 0
    assert scalars({"event": "stop", "t": 9.0, "step": 40, "bytes_sent": 1, "eval_loss": 2.0}) == \
        ("", 40, {"eval/loss": 2.0})
    assert scalars({"event": "start", "peer_id": "x"}) == ("", 0, {})
    assert math.isnan(scalars({"step": 1, "loss": math.nan})[2]["train/loss"])


def read_tensorboard(folder) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the event files in ``folder``, read by TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def f32(x: float) -> float:
    """``x`` as TensorBoard stores it (float32)."""
    return float(np.float32(x))


def test_tensorboard_scalars_read_back_exactly_one_folder_per_algorithm(tmp_path):
    pytest.importorskip("tensorboard")
    tb = tmp_path / "tb"
    sinks = open_sinks(f"tensorboard:{tb}")
    assert [type(s) for s in sinks.sinks] == [TensorBoardSink]
    sinks.write({"event": "start", "t": 0.0, "step": 0, "round": 0, "peer_id": "12D3KooW", "eval_loss": 2.5})
    sinks.write(JOIN_ROUND)
    assert read_tensorboard(tb)["train/loss"] == [(10, 0.75)]  # flushed: readable before close
    sinks.write({**JOIN_ROUND, "step": 20, "loss": 0.1, "bytes_sent": 1280})
    sinks.write({"event": "stop", "t": 3.0, "step": 20, "round": 4, "eval_loss": 2.25, "bytes_sent": 1280})
    sinks.write({"algorithm": "diloco", "step": 5, "loss": 0.5, "bytes_sent": 99})
    sinks.write({"algorithm": "ddp", "step": 5, "loss": 0.4})
    sinks.write({"algorithm": "diloco", "step": 10, "loss": 0.25, "bytes_sent": 198})
    sinks.close()
    got = read_tensorboard(tb)
    assert set(got) == set(JOIN_TAGS) | {"eval/loss"}
    assert got["eval/loss"] == [(0, 2.5), (20, 2.25)]
    assert got["train/loss"] == [(10, 0.75), (20, f32(0.1))]
    assert got["net/bytes_sent"] == [(10, 640.0), (20, 1280.0)]
    for tag, value in JOIN_TAGS.items():
        assert got[tag][0] == (10, f32(value)), tag
    assert sorted(p.name for p in tb.iterdir() if p.is_dir()) == ["ddp", "diloco"]
    assert read_tensorboard(tb / "diloco") == {"train/loss": [(5, 0.5), (10, 0.25)],
                                               "net/bytes_sent": [(5, 99.0), (10, 198.0)]}
    assert read_tensorboard(tb / "ddp") == {"train/loss": [(5, f32(0.4))]}


def test_simulate_logs_to_jsonl_and_tensorboard_that_tensorboard_reads_back(tmp_path):
    """The issue's acceptance: `lowcomm simulate --log-to jsonl:...,tensorboard:DIR` writes
    event files TensorBoard's reader reads, with the expected tags, steps and values (those of
    the jsonl records, and of the run's own metrics.jsonl and summary.json)."""
    pytest.importorskip("tensorboard")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "lowcomm", "simulate", "--task", "tests.sim.tinytask:task",
                        "--algorithms", "diloco", "--workers", "2", "--steps", "20", "--sync-every", "5",
                        "--eval-every", "10", "--step-time", "20ms", "--no-progress", "--out", "runs",
                        "--log-to", "jsonl:a.jsonl,tensorboard:tb"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    rounds = [x for x in records if "event" not in x]
    evals = [x for x in records if "event" in x]
    assert [x["step"] for x in rounds] == [5, 10, 15, 20] and [x["round"] for x in rounds] == [1, 2, 3, 4]
    assert {x["algorithm"] for x in records} == {"diloco"} and {x["participants"] for x in rounds} == {2}
    assert [(x["event"], x["step"]) for x in evals] == [("eval", 0), ("eval", 10), ("eval", 20)]
    assert [p.name for p in (tmp_path / "tb").iterdir()] == ["diloco"]  # one run per algorithm

    got = read_tensorboard(tmp_path / "tb" / "diloco")
    assert set(got) == {"train/loss", "net/bytes_sent", "net/bytes_received", "swarm/round",
                        "swarm/participants", "time/t", "time/compute_s", "time/wait_s", "eval/loss"}
    for key, tag in (("loss", "train/loss"), ("bytes_sent", "net/bytes_sent"), ("t", "time/t"),
                     ("wait_s", "time/wait_s"), ("compute_s", "time/compute_s")):
        assert got[tag] == [(x["step"], f32(x[key])) for x in rounds], tag
    # every round the wire bytes of the tiny MLP's 161 fp32 values, butterfly between 2 workers
    per_round = sum(sent for sent, _ in exchange_phases(codec_class("none")(), 161, 2, 0))
    assert per_round == 792
    assert got["net/bytes_sent"] == [(5, 792.0), (10, 1584.0), (15, 2376.0), (20, 3168.0)]
    assert got["time/compute_s"] == [(s, f32(s * 0.02)) for s in (5, 10, 15, 20)]  # 20 ms a step

    run = tmp_path / "runs" / "simulate-0"
    own = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert got["eval/loss"] == [(x["step"], f32(x["eval_loss"])) for x in own] == \
        [(x["step"], f32(x["eval_loss"])) for x in evals]
    summary = json.loads((run / "summary.json").read_text())["diloco"]
    assert summary["bytes_sent_per_worker"] == rounds[-1]["bytes_sent"] == 3168  # 2 workers send alike
    assert summary["predicted_wall_clock_s"] == rounds[-1]["t"]
    assert summary["outer_rounds"] == 4


def test_help_names_every_sink_kind():
    from typer.testing import CliRunner

    from lowcomm.cli import app

    for command in ("simulate", "join"):
        text = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"}).output
        for kind in ("jsonl:PATH", "tensorboard:DIR", "wandb:PROJECT", "pip install 'lowcomm[tensorboard]'",
                     "pip install 'lowcomm[wandb]'"):
            assert kind in text, (command, kind)


WANDB_WRITER = """
from lowcomm.metrics import open_sinks
sinks = open_sinks("wandb:lowcomm-test")
sinks.write({"algorithm": "diloco", "step": 5, "loss": 0.5, "bytes_sent": 792, "peer_id": "x"})
sinks.write({"algorithm": "diloco", "step": 10, "loss": 0.25, "bytes_sent": 1584})
sinks.write({"event": "eval", "algorithm": "diloco", "step": 0, "tokens": 0, "eval_loss": 0.75})
sinks.write({"algorithm": "ddp", "step": 1, "loss": 0.875})
sinks.close()
"""


def test_wandb_writes_an_offline_run_per_algorithm_that_wandb_reads_back(tmp_path):
    """In a subprocess (wandb's service process ends with it), with no WANDB_MODE: offline runs under
    WANDB_DIR, read back with ``wandb leet inspect --json``."""
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", WANDB_WRITER], capture_output=True, text=True, cwd=tmp_path,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    runs = {}
    for log in glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb")):
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", log], capture_output=True,
                             text=True, env=env, timeout=60)
        lines = [json.loads(line) for line in out.stdout.splitlines()]
        run = next(x["run"] for x in lines if x["type"] == "run")
        assert run["project"] == "lowcomm-test" and run["run_group"].startswith("lowcomm-")
        runs[run["display_name"]] = [{k: v for k, v in x["history"]["item"].items() if not k.startswith("_")}
                                     for x in lines if x["type"] == "history"]
    assert runs == {
        "diloco": [{"step": 5, "train/loss": 0.5, "net/bytes_sent": 792},
                   {"step": 10, "train/loss": 0.25, "net/bytes_sent": 1584},
                   {"step": 0, "eval/loss": 0.75}],
        "ddp": [{"step": 1, "train/loss": 0.875}],
    }
