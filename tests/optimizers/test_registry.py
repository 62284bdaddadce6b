"""The algorithm registry: one set of defaults for simulate, plan and join (the
constructors' own), flags that reach only the algorithms that take them, every
spec builds and trains, sync schedules, and the names the CLI accepts."""

import inspect
import os

import pytest
import torch
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

from lowcomm import cli
from lowcomm.config import ConfigError, JoinConfig, PlanConfig, SimulateConfig
from lowcomm.join.node import Node
from lowcomm.optimizers.diloco import auto_fragments
from lowcomm.optimizers.registry import ALGORITHMS, get_algorithm, settings_for
from lowcomm.sim import LocalSwarm

NAMES = ["ddp", "dgc", "diloco", "streaming", "noloco", "sparseloco"]
OUTER = ["diloco", "streaming", "noloco", "sparseloco"]  # those with an H of their own


def signature_default(cls: type, name: str):
    """``name``'s default in ``cls(...)``: the most derived constructor that names it
    (constructors pass ``**kwargs`` on to their bases)."""
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            p = inspect.signature(klass.__init__).parameters.get(name)
            if p is not None and p.kind is not p.VAR_KEYWORD:
                return p.default
    raise AssertionError(f"{cls.__name__} takes no argument {name!r}")


def test_the_registry_holds_the_six_algorithms():
    assert list(ALGORITHMS) == NAMES
    assert [n for n, spec in ALGORITHMS.items() if spec.periodic] == OUTER


# --- 1. one set of defaults ---

@pytest.mark.parametrize("name", NAMES)
def test_simulate_plan_and_join_resolve_the_same_defaults(name):
    from_simulate = settings_for(name, SimulateConfig().outer_options())
    assert from_simulate == settings_for(name, PlanConfig().outer_options())
    assert from_simulate == settings_for(name, JoinConfig().outer_options())
    assert from_simulate == get_algorithm(name).settings({}) == get_algorithm(name).settings(None)
    assert from_simulate.algorithm == name


# --- 2. the defaults are the constructors' ---

@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_the_constructor_signatures(name):
    spec = get_algorithm(name)
    options = spec.settings({}).options
    for key in spec.options:
        expected = spec.fixed[key] if key in spec.fixed else signature_default(spec.cls, key)
        assert expected is not inspect.Parameter.empty, key
        assert options[key] == expected, (name, key)
    for key, value in spec.fixed.items():
        assert options[key] == value


def test_concrete_defaults():
    s = settings_for("streaming")
    assert s.sync_every == 20 and s.options["sync_every"] == 20
    assert s.options["delay"] == 1 and s.delay == 1
    assert s.options["alpha"] == 0.0
    assert s.options["compressor"] == "fp4" and s.compressor == "fp4"
    assert s.options["fragments"] is None and s.fragments == 4  # auto: largest P <= 4 dividing 20
    assert s.options["error_feedback"] is False and s.options["group_size"] is None
    assert set(s.options) == {"sync_every", "outer_lr", "outer_momentum", "compressor", "error_feedback",
                              "group_size", "fragments", "delay", "alpha"}

    s = settings_for("diloco")
    assert set(s.options) == {"sync_every", "outer_lr", "outer_momentum", "compressor", "error_feedback",
                              "group_size"}
    assert (s.sync_every, s.fragments, s.delay, s.compressor, s.group_size) == (20, 1, 0, "none", None)
    assert s.options["error_feedback"] is False

    s = settings_for("noloco")
    assert s.options["group_size"] == 2 and s.group_size == 2
    assert (s.sync_every, s.compressor) == (20, "none")

    s = settings_for("sparseloco")
    assert set(s.options) == {"sync_every", "outer_lr", "group_size", "density", "chunk_size", "beta"}
    assert s.options["density"] == 1 / 64 and s.options["beta"] == 0.95 and s.options["chunk_size"] == 4096
    assert (s.sync_every, s.fragments, s.delay, s.group_size) == (20, 1, 0, None)

    s = settings_for("dgc")
    assert s.options == {"compressor": "topk", "momentum_correction": True, "momentum": 0.0} and s.sync_every == 1

    s = settings_for("ddp")
    assert s.options == {} and (s.sync_every, s.fragments, s.delay, s.compressor) == (1, 1, 0, "none")


# --- 3. flags reach exactly the algorithms that take them ---

def test_delay_reaches_streaming_only():
    given = SimulateConfig(delay=3).outer_options()
    assert settings_for("streaming", given).options["delay"] == 3
    assert settings_for("streaming", given).delay == 3
    for name in ("ddp", "dgc", "diloco", "noloco", "sparseloco"):
        s = settings_for(name, given)
        assert "delay" not in s.options and s.delay == 0, name


def test_delay_zero_is_a_value_not_the_default():
    assert settings_for("streaming", SimulateConfig(delay=0).outer_options()).delay == 0


def test_sync_every_sets_h_of_every_outer_algorithm():
    given = SimulateConfig(sync_every=40).outer_options()
    for name in OUTER:
        s = settings_for(name, given)
        assert s.sync_every == 40 and s.options["sync_every"] == 40, name
        assert get_algorithm(name).schedule(s, 1000, 4).every == 40
    for name in ("ddp", "dgc"):  # exchange every step whatever H is
        s = settings_for(name, given)
        assert s.sync_every == 1 and "sync_every" not in s.options, name
        assert get_algorithm(name).schedule(s, 1000, 4).every == 1


def test_other_flags_override_only_where_taken():
    given = SimulateConfig(compressor="int8", group_size=3, alpha=0.25, fragments=2, outer_lr=0.3,
                           outer_momentum=0.0, error_feedback=True).outer_options()
    s = settings_for("streaming", given)
    assert {k: s.options[k] for k in ("compressor", "group_size", "alpha", "fragments", "outer_lr",
                                      "outer_momentum", "error_feedback")} == {
        "compressor": "int8", "group_size": 3, "alpha": 0.25, "fragments": 2, "outer_lr": 0.3,
        "outer_momentum": 0.0, "error_feedback": True}
    s = settings_for("sparseloco", given)  # no codec or momentum to choose: its own stay
    assert "compressor" not in s.options and "outer_momentum" not in s.options
    assert s.options["outer_lr"] == 0.3 and s.options["group_size"] == 3
    assert settings_for("dgc", given).options == {"compressor": "int8", "momentum_correction": True, "momentum": 0.0}
    assert settings_for("ddp", given).options == {}


def test_fragments_zero_means_automatic():
    for h, p in ((20, 4), (30, 3), (7, 1), (2, 1), (4, 2)):  # H / P must exceed the default delay, 1
        s = settings_for("streaming", SimulateConfig(sync_every=h, fragments=0).outer_options())
        assert s.options["fragments"] is None
        assert s.fragments == auto_fragments(h, delay=1) == p, h
    assert auto_fragments(2) == 2 and auto_fragments(4, delay=1) == 2 and auto_fragments(20, delay=5) == 2
    assert auto_fragments(20, n_units=3) == 2  # capped by the model's parameter units


# --- 4. every spec builds and trains ---

class Blocks(nn.Module):
    """Four "blocks.N" layers: four parameter units for Streaming DiLoCo's fragments."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):  # (B, 4) -> (B, 4)
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def sends_counted(schedule, steps: int) -> int:
    """Rounds an optimizer has recorded after ``steps`` inner steps: a fragment is sent
    after inner step s when s % every == its offset (s = 1, 2, ...), and its mean is
    applied and counted ``delay`` steps later, within the run only."""
    return sum(1 for s in range(1, steps + 1) for off in schedule.offsets
               if s % schedule.every == off and s + schedule.delay <= steps)


# ddp/dgc: every step; diloco, noloco, sparseloco: after steps 20 and 40; streaming: fragments
# sent after steps 5, 10, ..., 40 and applied one step later, so the one sent after step 40 is
# still in flight.
ROUNDS_IN_40_STEPS = {"ddp": 40, "dgc": 40, "diloco": 2, "streaming": 7, "noloco": 2, "sparseloco": 2}


@pytest.mark.parametrize("name", NAMES)
def test_every_spec_builds_and_trains(name):
    spec = get_algorithm(name)
    s = spec.settings({})
    model = Blocks()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = spec.build(s, list(model.named_parameters()), inner, LocalSwarm(1).averager(0))
    assert isinstance(opt, spec.cls) and type(opt) is spec.cls
    if name == "streaming":
        assert opt.fragments == 4 and opt.offsets == [0, 5, 10, 15] and opt.delay == 1
    before = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    steps = 2 * 20
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        loss = ((model(x) - x.flip(1)) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert opt.stats.inner_steps == steps
    sched = spec.schedule(s, sum(p.numel() for p in model.parameters()), 1)
    assert sends_counted(sched, steps) == ROUNDS_IN_40_STEPS[name]
    assert opt.stats.outer_rounds == ROUNDS_IN_40_STEPS[name]
    assert opt.stats.rounds_not_averaged == 0


# --- 5. schedules ---

def test_schedules():
    def schedule(name, given=None):
        return get_algorithm(name).schedule(settings_for(name, given), 1000, 4)

    sched = schedule("diloco")
    assert (sched.every, sched.numels, sched.offsets, sched.delay, sched.group) == (20, [1000], [0], 0, 4)
    assert sched.compressor.name == "none"

    sched = schedule("noloco")  # phi and theta - phi, in pairs
    assert (sched.every, sched.numels, sched.offsets, sched.group) == (20, [2000], [0], 2)

    sched = schedule("streaming", {"sync_every": 20})
    assert (sched.every, sched.numels, sched.offsets, sched.delay, sched.group) == (
        20, [250, 250, 250, 250], [0, 5, 10, 15], 1, 4)
    assert sched.compressor.name == "fp4"

    sched = schedule("sparseloco")
    assert (sched.every, sched.numels, sched.offsets, sched.delay, sched.group) == (20, [1000], [0], 0, 4)
    codec = sched.compressor
    assert (codec.name, codec.values, codec.density, codec.k, codec.chunk_size) == ("topk", "int2", 1 / 64, 64, 4096)
    codec = get_algorithm("sparseloco").schedule(settings_for("sparseloco", {"density": 1 / 32}), 1000, 4).compressor
    assert codec.k == 128  # density is an option of sparseloco, read by its wire codec

    sched = schedule("ddp")
    assert (sched.every, sched.numels, sched.offsets, sched.delay, sched.group) == (1, [1000], [0], 0, 4)
    assert sched.compressor.name == "none"
    sched = schedule("dgc")
    assert (sched.every, sched.compressor.name) == (1, "topk")

    assert schedule("noloco", {"group_size": 8}).group == 4  # a group is at most everyone


# --- 6. unknown names ---

def test_unknown_names():
    with pytest.raises(ValueError) as e:
        get_algorithm("nope")
    assert str(e.value) == "unknown algorithm 'nope'; choose from ddp, dgc, diloco, streaming, noloco, sparseloco"
    with pytest.raises(ConfigError) as e:
        SimulateConfig(algorithms="ddp,nope").algorithm_list()
    assert e.value.flag == "--algorithms"
    assert str(e.value) == ("--algorithms: unknown algorithm 'nope'; choose from ddp, dgc, diloco, streaming, "
                            "noloco, sparseloco")
    assert SimulateConfig(algorithms=" ddp , sparseloco,").algorithm_list() == ["ddp", "sparseloco"]


# --- 7. plan lists every algorithm ---

def test_plan_lists_every_algorithm(monkeypatch):
    monkeypatch.setattr(cli, "console", Console(width=300, no_color=True))  # rows unwrapped
    r = CliRunner().invoke(cli.app, ["plan", "--algorithms", ",".join(NAMES)])
    assert r.exit_code == 0, r.output
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in r.output.splitlines() if "│" in line]
    rows = {c[0]: c for c in cells}
    assert list(rows) == NAMES
    assert [rows[n][1] for n in NAMES] == ["1", "1", "20", "20", "20", "20"]  # H
    assert [rows[n][2] for n in NAMES] == ["none", "topk", "none", "fp4", "none", "topk"]  # codec


# --- 8. join takes exactly the outer algorithms ---

def node(algorithm: str) -> Node:
    cfg = JoinConfig(algorithm=algorithm, listen="/ip4/127.0.0.1/tcp/0")
    return Node(cfg, Console(file=open(os.devnull, "w")))


@pytest.mark.parametrize("name", ["ddp", "dgc"])
def test_join_refuses_data_parallel(name):
    with pytest.raises(ConfigError) as e:
        node(name)._validate()
    assert e.value.flag == "--algorithm"
    assert str(e.value) == f"--algorithm: must be one of diloco, streaming, noloco, sparseloco, got {name!r}"


@pytest.mark.parametrize("name", OUTER)
def test_join_accepts_outer_algorithms(name):
    assert node(name)._validate() == []
