"""What every outer optimizer shares: seconds waited for results (Stats.wait_s) and the
read-only views a caller may use (global_params, codec, swarm_round)."""

import pytest
import torch

from lowcomm.compressors import ErrorFeedback
from lowcomm.optimizers import DataParallel, DiLoCo, NoLoCo, SparseLoCo, StreamingDiLoCo, base
from lowcomm.sim import LocalSwarm

from tests.optimizers.helpers import mlp, train


class Clock:
    """Stands in for the `time` module of lowcomm.optimizers.base."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


class SlowAverager:
    """A LocalSwarm rank whose every ``result()`` call takes ``seconds`` on ``clock``."""

    def __init__(self, averager, clock: Clock, seconds: float):
        self.inner, self.clock, self.seconds = averager, clock, seconds
        self.peer_id, self.calls = averager.peer_id, 0

    def average(self, key, tensors, **kw):
        handle, outer = self.inner.average(key, tensors, **kw), self

        class Handle:
            def done(self):
                return handle.done()

            def result(self, timeout=None):
                outer.calls += 1
                outer.clock.now += outer.seconds
                return handle.result(timeout)

        return Handle()


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(base, "time", c)
    return c


@pytest.mark.parametrize("make, steps, results", [
    (lambda m, av: DiLoCo(m.parameters(), torch.optim.SGD(m.parameters(), lr=0.1), av, sync_every=4), 12, 3),
    (lambda m, av: NoLoCo(m.parameters(), torch.optim.SGD(m.parameters(), lr=0.1), av, sync_every=3), 9, 3),
    (lambda m, av: DataParallel(m.parameters(), torch.optim.SGD(m.parameters(), lr=0.1), av), 5, 5),
])
def test_wait_s_adds_up_the_time_blocked_on_every_result(clock, make, steps, results):
    model = mlp()
    averager = SlowAverager(LocalSwarm(1).averager(0), clock, 0.25)
    opt = make(model, averager)
    train(model, opt, 0, steps)
    assert averager.calls == results
    assert opt.stats.wait_s == 0.25 * results


def test_wait_s_counts_the_wait_in_state_dict_and_is_saved(clock):
    # H 4, delay 1: sent at steps 4 and 8, applied at 5; the one sent at 8 is waited for by state_dict
    model = mlp()
    averager = SlowAverager(LocalSwarm(1).averager(0), clock, 0.25)
    opt = DiLoCo(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), averager, sync_every=4, delay=1)
    train(model, opt, 0, 8)
    assert (averager.calls, opt.stats.wait_s) == (1, 0.25)
    state = opt.state_dict()
    assert (averager.calls, opt.stats.wait_s, state["stats"]["wait_s"]) == (2, 0.5, 0.5)
    other = mlp()
    again = DiLoCo(other.parameters(), torch.optim.SGD(other.parameters(), lr=0.1), LocalSwarm(1).averager(0),
                   sync_every=4, delay=1)
    again.load_state_dict(state)
    assert again.stats.wait_s == 0.5


def test_a_stats_dict_saved_before_wait_s_existed_loads_with_zero():
    model = mlp()
    opt = DiLoCo(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), LocalSwarm(1).averager(0),
                 sync_every=4)
    state = opt.state_dict()
    del state["stats"]["wait_s"]
    opt.load_state_dict(state)
    assert opt.stats.wait_s == 0.0


@pytest.mark.parametrize("cls", [DiLoCo, NoLoCo, SparseLoCo, DataParallel])
def test_after_load_state_dict_an_lr_scheduler_still_drives_the_inner_optimizer(cls):
    # torch's Optimizer.load_state_dict replaces param_groups with new dicts; the outer's must follow
    model = mlp()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = cls(model.parameters(), inner, LocalSwarm(1).averager(0))
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is inner.param_groups
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    train(model, opt, 0, 2, same_batches=True)
    sched.step()
    assert inner.param_groups[0]["lr"] == 0.05


def test_public_views_of_global_weights_codec_and_round():
    def build(cls, model, **kw):
        return cls(model.named_parameters(), torch.optim.SGD(model.parameters(), lr=0.1),
                   LocalSwarm(1).averager(0), **kw)

    model = mlp()
    streaming = build(StreamingDiLoCo, model, sync_every=4, fragments=2, delay=1)
    train(model, streaming, 0, 9)  # fragment 0 sends at 4 and 8, fragment 1 at 2 and 6
    assert streaming.rounds == [2, 2] and streaming.swarm_round == 4
    assert streaming.codec.name == "fp4"
    flat = streaming.global_params
    assert len(flat) == 4 and all(t.dtype == torch.float32 for t in flat)
    assert [t.data_ptr() for t in flat] == [t.data_ptr() for phi in streaming.phi for t in phi]  # views, in order

    sparse = build(SparseLoCo, mlp(), sync_every=4)
    assert isinstance(sparse.compression, ErrorFeedback) and sparse.codec is sparse.compression.compressor
    assert build(DiLoCo, mlp(), compressor=None).codec is None

    model = mlp()
    noloco = build(NoLoCo, model, sync_every=3)
    train(model, noloco, 0, 7)
    assert noloco.swarm_round == noloco.round == 2 and noloco.global_params is noloco.phi

    model = mlp()
    ddp = build(DataParallel, model)
    train(model, ddp, 0, 3)
    assert ddp.swarm_round == 3 and all(a is b for a, b in zip(ddp.global_params, model.parameters()))


def test_the_base_class_declares_what_subclasses_provide():
    assert base.OuterOptimizer.__abstractmethods__ == {"global_params", "swarm_round"}
