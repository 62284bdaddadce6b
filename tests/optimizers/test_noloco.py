"""NoLoCo: a hand-computed group update and the weight-averaging identity."""

import pytest
import torch

from lowcomm.optimizers import NoLoCo
from lowcomm.sim import LocalSwarm

from tests.optimizers.helpers import flat, mlp, train


def test_two_worker_group_update_hand_computed():
    # phi0 = 1 and 2; grads 0.5 and -1.0; inner SGD lr 0.1; H = 2; eta 0.7; mu 0.5
    # round 1: theta = 0.9, 2.2; phi_bar = 1.5; d_bar = mean(-0.1, 0.2) = 0.05
    #   m0 = 0.7 (0.05 + 1.5 - 1.0) = 0.385  -> phi0 = 1.385
    #   m1 = 0.7 (0.05 + 1.5 - 2.0) = -0.315 -> phi1 = 1.685
    # round 2: theta = 1.285, 1.885; phi_bar = 1.535; d_bar = 0.05
    #   m0 = 0.5 * 0.385 + 0.7 (0.05 + 1.535 - 1.385) = 0.3325   -> phi0 = 1.7175
    #   m1 = 0.5 * -0.315 + 0.7 (0.05 + 1.535 - 1.685) = -0.2275 -> phi1 = 1.4575
    def fn(rank, av):
        p = torch.nn.Parameter(torch.tensor([[1.0, 2.0][rank]], dtype=torch.float64))
        opt = NoLoCo([p], torch.optim.SGD([p], lr=0.1), av, sync_every=2, group_size=2)
        out = []
        for _ in range(4):
            p.grad = torch.tensor([[0.5, -1.0][rank]], dtype=torch.float64)
            opt.step()
            out.append(p.item())
        return out

    w0, w1 = LocalSwarm(2).run(fn)
    assert w0[1] == pytest.approx(1.385) and w1[1] == pytest.approx(1.685)
    assert w0[3] == pytest.approx(1.7175) and w1[3] == pytest.approx(1.4575)


def test_whole_group_lr1_momentum0_is_weight_averaging():
    H = 5

    # reference: train each worker H steps on its own, then average the weights
    refs = []
    for rank in range(3):
        m = mlp()
        train(m, torch.optim.AdamW(m.parameters(), lr=1e-2), rank, H)
        refs.append(flat(m))
    want = torch.stack(refs).mean(0)

    def full(rank, av):
        model = mlp()
        opt = NoLoCo(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-2), av, sync_every=H,
                     group_size=None, outer_lr=1.0, outer_momentum=0.0)
        train(model, opt, rank, H)
        assert opt.stats.outer_rounds == 1 and opt.stats.last_group_size == 3
        return flat(model)

    for w in LocalSwarm(3).run(full):
        assert torch.allclose(w, want, atol=1e-6, rtol=0)


def test_pairs_keep_separate_slow_weights():
    def fn(rank, av):
        model = mlp()
        opt = NoLoCo(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-2), av, sync_every=3)
        train(model, opt, rank, 9)
        return flat(model), opt.stats

    out = LocalSwarm(4).run(fn)
    assert all(s.outer_rounds == 3 and s.last_group_size == 2 for _, s in out)
    assert len({tuple(w.tolist()) for w, _ in out}) > 1  # no global consensus is forced
