"""Metric sinks: spec parsing (good and bad), JSON lines written, flushed and read back."""

import json
import math

import pytest

from lowcomm.config import ConfigError
from lowcomm.metrics import SINKS, JsonlSink, Sinks, open_sinks, parse_sinks


def test_specs_parse_into_kind_and_argument():
    assert parse_sinks("") == []
    assert parse_sinks("jsonl:a.jsonl") == [("jsonl", "a.jsonl")]
    assert parse_sinks(" jsonl:a.jsonl , jsonl:/tmp/x:y.jsonl,") == [("jsonl", "a.jsonl"), ("jsonl", "/tmp/x:y.jsonl")]
    assert list(SINKS) == ["jsonl"]


@pytest.mark.parametrize("spec, message", [
    ("metrics.jsonl", "--log-to: 'metrics.jsonl' is not KIND:ARG; write e.g. jsonl:metrics.jsonl (kinds: jsonl)"),
    ("tensorboard:runs", "--log-to: unknown sink kind 'tensorboard' in 'tensorboard:runs'; kinds: jsonl"),
    ("jsonl:a.jsonl,wandb:proj", "--log-to: unknown sink kind 'wandb' in 'wandb:proj'; kinds: jsonl"),
    ("jsonl:", "--log-to: jsonl: needs a file: jsonl:PATH"),
])
def test_bad_specs_are_config_errors_naming_the_kinds(spec, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        open_sinks(spec)
    assert (e.value.flag, str(e.value)) == ("--log-to", message)
    assert list(tmp_path.iterdir()) == []  # nothing opened was left behind


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
