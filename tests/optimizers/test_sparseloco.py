"""SparseLoCo: a hand-computed two-round run, bitwise resume, bytes, settings."""

import pytest
import torch

from lowcomm.checkpoint import load_state, save_state
from lowcomm.compressors import ErrorFeedback, encode, get_compressor, wire_size
from lowcomm.optimizers import DiLoCo, SparseLoCo
from lowcomm.sim import LocalSwarm

from tests.optimizers.helpers import flat, mlp, train

KEY = "sparseloco/frag0"


def inner(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_two_workers_two_rounds_hand_computed():
    # One tensor of 4 values, phi0 = 0; inner SGD lr 1 with fixed gradients, H = 2, so each
    # round's outer gradient is delta = 2 g. One chunk of 4, k = round(0.75 * 4) = 3, beta 0.5.
    # int2: kept |p| split at (min + max) / 2; each side decodes to its mean |p|, with p's sign.
    #
    # round 1 (e = 0, p = delta)
    #   w0: p = [1, -2, .5, .125]  keeps 0, 1, 2; mid (.5 + 2) / 2 = 1.25; high {2}, low {1, .5} -> .75
    #       sent [.75, -2, .75, 0]; e = .5 (p - sent) = [.125, 0, -.125, .0625]
    #   w1: p = [-.5, 1, 3, 0]     keeps 0, 1, 2; mid 1.75; high {3}, low {.5, 1} -> .75
    #       sent [-.75, .75, 3, 0]; e = [.125, .125, 0, 0]
    #   mean [0, -.625, 1.875, 0]; phi = phi - 1.0 * mean = [0, .625, -1.875, 0]
    # round 2 (same deltas, p = delta + e)
    #   w0: p = [1.125, -2, .375, .1875]  keeps 0, 1, 2; mid 1.1875; high {2}, low {1.125, .375} -> .75
    #       sent [.75, -2, .75, 0]; e = [.1875, 0, -.1875, .09375]
    #   w1: p = [-.375, 1.125, 3, 0]  keeps 0, 1, 2; mid 1.6875; high {3}, low {.375, 1.125} -> .75
    #       sent [-.75, .75, 3, 0]; e = [.1875, .1875, 0, 0]
    #   mean [0, -.625, 1.875, 0]; phi = [0, 1.25, -3.75, 0]  (no momentum: the same step again)
    grads = [[0.5, -1.0, 0.25, 0.0625], [-0.25, 0.5, 1.5, 0.0]]

    def fn(rank, av):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = SparseLoCo([p], torch.optim.SGD([p], lr=1.0), av, sync_every=2, outer_lr=1.0, density=0.75,
                         chunk_size=4, beta=0.5)
        out = []
        for step in range(1, 5):
            p.grad = torch.tensor(grads[rank])
            opt.step()
            if step % 2 == 0:
                out.append((p.detach().clone(), opt.phi[0][0].clone(), opt.compression.residual(KEY).clone()))
        return out

    want_phi = [torch.tensor([0.0, 0.625, -1.875, 0.0]), torch.tensor([0.0, 1.25, -3.75, 0.0])]
    want_e = [[torch.tensor([0.125, 0.0, -0.125, 0.0625]), torch.tensor([0.1875, 0.0, -0.1875, 0.09375])],
              [torch.tensor([0.125, 0.125, 0.0, 0.0]), torch.tensor([0.1875, 0.1875, 0.0, 0.0])]]
    for rank, rounds in enumerate(LocalSwarm(2, seed=0).run(fn)):
        for r, (theta, phi, e) in enumerate(rounds):
            assert torch.equal(phi, want_phi[r])
            assert torch.equal(theta, want_phi[r])  # theta = phi after every sync
            assert torch.equal(e, want_e[rank][r])


def test_is_diloco_with_no_momentum_topk_int2_and_decayed_error_feedback():
    model = mlp()
    opt = SparseLoCo(model.parameters(), inner(model), LocalSwarm(1).averager(0))
    codec = opt.compression.compressor
    assert isinstance(opt, DiLoCo) and isinstance(opt.compression, ErrorFeedback)
    assert (codec.name, codec.values, codec.chunk_size, codec.k, opt.compression.beta) == ("topk", "int2", 4096, 64,
                                                                                            0.95)
    group = opt.outer[0].param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"]) == (2.0, 0.0, False)
    assert (opt.sync_every, opt.fragments, opt.delay, opt.alpha) == (30, 1, 0, 0.0)


def _run(tmp_path, stop_at=None, total=22):
    """2 workers, AdamW inner, H = 4; optionally stop at ``stop_at`` (between syncs, with
    residuals in hand), save to files, and continue with fresh objects built from them."""
    kw = dict(sync_every=4, density=0.25, chunk_size=16, beta=0.9, outer_lr=0.8)

    def first(rank, av):
        model = mlp()
        opt = SparseLoCo(model.parameters(), inner(model), av, **kw)
        train(model, opt, rank, stop_at or total)
        if stop_at:
            assert opt.compression.residual(KEY).abs().sum() > 0
            save_state(tmp_path / f"rank{rank}", {"model": model.state_dict(), "opt": opt.state_dict()})
        return flat(model), opt.compression.residual(KEY).clone(), opt.phi[0][0].clone()

    out = LocalSwarm(2).run(first)
    if not stop_at:
        return out

    def second(rank, av):
        model = mlp(seed=99)  # different weights: everything must come from the files
        opt = SparseLoCo(model.parameters(), inner(model), av, **kw)
        state, _ = load_state(tmp_path / f"rank{rank}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        train(model, opt, rank, total - stop_at, start=stop_at)
        return flat(model), opt.compression.residual(KEY).clone(), opt.phi[0][0].clone()

    return LocalSwarm(2).run(second)


def test_resume_from_files_mid_run_is_bitwise_equal(tmp_path):
    straight = _run(tmp_path)
    resumed = _run(tmp_path, stop_at=10)
    for a, b in zip(straight, resumed):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_state_dict_round_trips_the_residuals_bitwise():
    def fn(rank, av):
        model = mlp()
        opt = SparseLoCo(model.parameters(), inner(model), av, sync_every=3, density=0.25, chunk_size=16)
        train(model, opt, rank, 7)
        state = opt.state_dict()
        model2 = mlp(seed=5)
        opt2 = SparseLoCo(model2.parameters(), inner(model2), LocalSwarm(1).averager(0), sync_every=3,
                          density=0.25, chunk_size=16)
        opt2.load_state_dict(state)
        return opt.compression.residual(KEY), opt2.compression.residual(KEY), state["step"], opt2.step_count

    for e, e2, step, step2 in LocalSwarm(2).run(fn):
        assert e.abs().sum() > 0 and torch.equal(e, e2) and step == step2 == 7


def test_stats_bytes_equal_the_encoded_sizes():
    numel = sum(p.numel() for p in mlp().parameters())  # 49: 3 chunks of 16 (k = 4) and a tail of 1

    def fn(rank, av):
        model = mlp()
        opt = SparseLoCo(model.parameters(), inner(model), av, sync_every=3, density=0.25, chunk_size=16)
        train(model, opt, rank, 9)
        return opt.stats

    codec = get_compressor("topk", density=0.25, chunk_size=16, values="int2")
    per_round = len(encode(codec.compress(torch.randn(numel))))
    assert per_round == wire_size(codec, numel)
    for stats in LocalSwarm(2).run(fn):  # all-gather: the whole payload to the one other member
        assert stats.outer_rounds == 3
        assert stats.bytes_sent == stats.bytes_received == 3 * per_round


@pytest.mark.parametrize("kw,match", [
    (dict(density=0), "density"), (dict(density=1.5), "density"), (dict(density=float("nan")), "density"),
    (dict(density="0.1"), "density"), (dict(beta=-0.1), "beta"), (dict(beta=1.01), "beta"),
    (dict(beta=float("nan")), "beta"), (dict(chunk_size=0), "chunk_size"), (dict(outer_lr=0), "outer_lr"),
    (dict(sync_every=0), "sync_every"),
])
def test_invalid_settings_name_the_value(kw, match):
    model = mlp()
    with pytest.raises(ValueError, match=match):
        SparseLoCo(model.parameters(), inner(model), LocalSwarm(1).averager(0), **kw)


def test_diloco_refuses_error_feedback_twice():
    model = mlp()
    ef = ErrorFeedback(get_compressor("topk"), beta=0.9)
    with pytest.raises(ValueError, match="already an ErrorFeedback"):
        DiLoCo(model.parameters(), inner(model), LocalSwarm(1).averager(0), compressor=ef, error_feedback=True)
    opt = DiLoCo(model.parameters(), inner(model), LocalSwarm(1).averager(0), compressor=ef)
    assert opt.compression is ef
