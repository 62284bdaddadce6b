"""The join node's --log-to records: exact keys, counters of this session only, a bad spec refused."""

import io
from types import SimpleNamespace

import pytest
from rich.console import Console

from lowcomm.config import ConfigError, JoinConfig
from lowcomm.join.node import Meter, Node
from lowcomm.optimizers import base
from lowcomm.optimizers.registry import build_optimizer
from lowcomm.sim import LocalSwarm

ROUND_KEYS = ["t", "step", "round", "participants", "members", "excluded", "loss", "tokens_per_s", "bytes_sent",
              "bytes_received", "round_s", "compute_s", "wait_s"]


def test_a_round_record_has_the_documented_keys_and_counts_this_session_only(monkeypatch):
    monkeypatch.setattr(base, "time", SimpleNamespace(monotonic=lambda: 0.0))  # results take no time
    node = Node(JoinConfig(task="tests.sim.tinytask:task", sync_every=5), Console(file=io.StringIO()))
    node._build()
    opt = node.opt = build_optimizer(node.settings, node.model, node.inner, LocalSwarm(1).averager(0))
    opt.stats.bytes_sent, opt.stats.bytes_received, opt.stats.wait_s = 1000, 3000, 2.0  # as from a checkpoint
    meter = Meter(opt, start=10.0)
    data = node.task.batches(0, 1, 0)
    for _ in range(10):
        node.task.loss(node.model, next(data)).backward()
        opt.step()
        opt.zero_grad()
    meter.computed(1.5)
    meter.computed(0.25)
    opt.stats.bytes_sent += 640
    opt.stats.bytes_received += 1280
    opt.stats.wait_s += 0.5
    record = node.round_record(meter, now=12.5, loss=0.75, tokens_per_s=100.0, round_s=0.125, members=3,
                               excluded=1)
    assert list(record) == ROUND_KEYS
    assert record == {"t": 2.5, "step": 10, "round": 2, "participants": 1, "members": 3, "excluded": 1,
                      "loss": 0.75, "tokens_per_s": 100.0, "bytes_sent": 640, "bytes_received": 1280,
                      "round_s": 0.125, "compute_s": 1.75, "wait_s": 0.5}


def test_a_bad_log_to_is_a_config_error_before_anything_starts(tmp_path):
    cfg = JoinConfig(task="tests.sim.tinytask:task", log_to="csv:m.csv", checkpoint_dir=str(tmp_path))
    with pytest.raises(ConfigError) as e:
        Node(cfg, Console(file=io.StringIO()))._validate()
    assert str(e.value) == "--log-to: unknown sink kind 'csv' in 'csv:m.csv'; kinds: jsonl, tensorboard, wandb"
