"""DiLoCo and Streaming DiLoCo: identities, a hand-computed round, schedules, resume, bytes."""

import pytest
import torch

from lowcomm.checkpoint import load_state, save_state
from lowcomm.compressors import encode, get_compressor
from lowcomm.averaging import shard_bounds
from lowcomm.optimizers import DiLoCo, StreamingDiLoCo
from lowcomm.sim import LocalSwarm

from tests.optimizers.helpers import Recorder, flat, mlp, train


def inner(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_one_worker_lr1_momentum0_is_the_inner_trajectory():
    ref_model = mlp()
    train(ref_model, inner(ref_model), 0, 15)
    model = mlp()
    opt = DiLoCo(model.parameters(), inner(model), LocalSwarm(1).averager(0), sync_every=5,
                 outer_lr=1.0, outer_momentum=0.0)
    train(model, opt, 0, 15)
    assert opt.stats.outer_rounds == 3
    assert torch.allclose(flat(model), flat(ref_model), atol=1e-6, rtol=0)


def test_four_identical_workers_equal_one():
    def run(n):
        swarm = LocalSwarm(n)

        def fn(rank, av):
            model = mlp()
            opt = DiLoCo(model.parameters(), inner(model), av, sync_every=4)
            return flat(train(model, opt, rank, 12, same_batches=True))

        return swarm.run(fn)

    one, four = run(1)[0], run(4)
    for w in four:
        assert torch.allclose(w, one, atol=1e-6, rtol=0)


def _scalar_worker(theta0, grad, lr=0.1):
    p = torch.nn.Parameter(torch.tensor([theta0]))
    opt = torch.optim.SGD([p], lr=lr)

    def step():
        p.grad = torch.tensor([grad])
    return p, opt, step


def test_two_worker_round_with_nesterov_hand_computed():
    # worker 0: grad 0.5, worker 1: grad -1.0, inner SGD lr 0.1, H = 2, phi0 = 1
    # round 1: theta = 0.9, 1.2 -> deltas 0.1, -0.2 -> mean -0.05
    #   buf = -0.05; nesterov grad = -0.05 + 0.9 * -0.05 = -0.095; phi = 1 + 0.7 * 0.095 = 1.0665
    # round 2: same deltas -> buf = 0.9 * -0.05 - 0.05 = -0.095
    #   grad = -0.05 + 0.9 * -0.095 = -0.1355; phi = 1.0665 + 0.7 * 0.1355 = 1.16135
    def fn(rank, av):
        p, sgd, set_grad = _scalar_worker(1.0, [0.5, -1.0][rank])
        opt = DiLoCo([p], sgd, av, sync_every=2, outer_lr=0.7, outer_momentum=0.9)
        phis = []
        for _ in range(4):
            set_grad()
            opt.step()
            phis.append(p.item())
        return phis

    for phis in LocalSwarm(2).run(fn):
        assert phis[1] == pytest.approx(1.0665, abs=1e-6)
        assert phis[3] == pytest.approx(1.16135, abs=1e-6)


def reference_streaming(theta0, grads, lr, steps, H, P, tau, alpha, outer_lr=0.7, mu=0.9, restart=False):
    """A spec-level loop: scalar parameters, one per fragment, SGD inner,
    Nesterov outer (with adaptive restart: momentum cleared when the new mean
    points against it), two workers with fixed gradients (worker w, param p)."""
    n_workers = len(grads)
    theta = [[theta0[p] for p in range(P)] for _ in range(n_workers)]
    phi, buf = list(theta0), [None] * P
    pending = []  # (apply_at, p, mean delta)
    for t in range(1, steps + 1):
        for w in range(n_workers):
            for p in range(P):
                theta[w][p] -= lr * grads[w][p]
        for p in range(P):
            if t % H == p * H // P:
                mean = sum(phi[p] - theta[w][p] for w in range(n_workers)) / n_workers
                pending.append((t + tau, p, mean))
        for item in [x for x in pending if x[0] == t]:
            pending.remove(item)
            _, p, g = item
            if restart and buf[p] is not None and buf[p] * g < 0:
                buf[p] = 0.0
            buf[p] = g if buf[p] is None else mu * buf[p] + g
            phi[p] -= outer_lr * (g + mu * buf[p])
            for w in range(n_workers):
                theta[w][p] = alpha * theta[w][p] + (1 - alpha) * phi[p]
    return theta, phi


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("tau,alpha", [(0, 0.0), (2, 0.0), (1, 0.5), (3, 1.0)])
def test_streaming_matches_the_per_fragment_rule(tau, alpha, restart):
    H, P, steps = 12, 3, 40
    theta0 = [1.0, -0.5, 2.0]
    grads = [[0.5, -1.0, 0.25], [-0.3, 0.7, 1.5]]

    def fn(rank, av):
        ps = [torch.nn.Parameter(torch.tensor([v], dtype=torch.float64)) for v in theta0]
        sgd = torch.optim.SGD(ps, lr=0.1)
        opt = DiLoCo(ps, sgd, av, sync_every=H, fragments=P, fragment_strategy="sequential",
                     delay=tau, alpha=alpha, outer_lr=0.7, outer_momentum=0.9, momentum_restart=restart)
        for _ in range(steps):
            for p, g in zip(ps, grads[rank]):
                p.grad = torch.tensor([g], dtype=torch.float64)
            opt.step()
        return [p.item() for p in ps], [phi[0].item() for phi in opt.phi]

    theta_ref, phi_ref = reference_streaming(theta0, grads, 0.1, steps, H, P, tau, alpha)
    for rank, (theta, phi) in enumerate(LocalSwarm(2).run(fn)):
        assert theta == pytest.approx(theta_ref[rank], abs=1e-6)
        assert phi == pytest.approx(phi_ref, abs=1e-6)


def test_fragment_p_is_sent_exactly_at_tp_plus_kH_and_applied_tau_later():
    H, P, tau = 12, 3, 2
    model = mlp()
    holder = {}
    rec = Recorder(LocalSwarm(1).averager(0), lambda: holder["opt"].step_count)
    opt = holder["opt"] = DiLoCo(model.named_parameters(), inner(model), rec, sync_every=H, fragments=P, delay=tau)
    applied = []
    orig = opt._apply
    opt._apply = lambda e: (applied.append((e.fragment, opt.step_count)), orig(e))
    train(model, opt, 0, 40)
    sends = [(int(k[-1]), step) for k, _, step in rec.calls]
    want = sorted((p, t) for p in range(P) for t in range(1, 41) if t % H == p * H // P)
    assert sorted(sends) == want
    assert sorted(applied) == sorted((p, t + tau) for p, t in want if t + tau <= 40)


def test_alpha_one_keeps_local_weights_while_global_advances():
    ref = mlp()
    train(ref, inner(ref), 0, 20)

    def fn(rank, av):
        model = mlp()
        opt = DiLoCo(model.parameters(), inner(model), av, sync_every=4, alpha=1.0)
        train(model, opt, rank, 20, same_batches=True)
        return flat(model), torch.cat([t.reshape(-1) for t in opt.phi[0]])

    for theta, phi in LocalSwarm(2).run(fn):
        assert torch.equal(theta, flat(ref))
        assert not torch.allclose(phi, flat(mlp()))


def _resume_run(tmp_path, stop_at=None, total=60, **codec):
    """4 workers, Streaming DiLoCo (P=2, H=10, tau=3, so fragment 1 sent at step 35
    is in flight at step 37); optionally stop at ``stop_at``, save, and continue
    with fresh objects from the files."""
    kw = dict(sync_every=10, fragments=2, delay=3, **codec)

    def first(rank, av):
        model = mlp()
        opt = DiLoCo(model.parameters(), inner(model), av, **kw)
        train(model, opt, rank, stop_at or total)
        if stop_at:
            assert opt.inflight, "a fragment must be in flight at the stop"
            save_state(tmp_path / f"rank{rank}", {"model": model.state_dict(), "opt": opt.state_dict()})
        return flat(model)

    out = LocalSwarm(4).run(first)
    if not stop_at:
        return out

    def second(rank, av):
        model = mlp(seed=99)  # fresh, different weights: everything must come from the files
        opt = DiLoCo(model.parameters(), inner(model), av, **kw)
        state, _ = load_state(tmp_path / f"rank{rank}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        train(model, opt, rank, total - stop_at, start=stop_at)
        return flat(model)

    return LocalSwarm(4).run(second)


@pytest.mark.parametrize("codec", [{}, {"compressor": "randk", "error_feedback": True}])
def test_resume_from_files_mid_flight_is_bitwise_equal(tmp_path, codec):
    # randk: the codec's seed stream is saved too, or the resumed run draws other coordinates
    straight = _resume_run(tmp_path, **codec)
    resumed = _resume_run(tmp_path, stop_at=37, **codec)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


@pytest.mark.parametrize("codec,ef", [("fp4", False), ("sign", True), ("topk", True)])
def test_stats_bytes_equal_encoded_sizes(codec, ef):
    n = 2
    options = {"topk": {"density": 0.1, "chunk_size": 32}}.get(codec, {"block_size": 32})
    comp = get_compressor(codec, **options)

    def fn(rank, av):
        model = mlp()
        opt = DiLoCo(model.parameters(), inner(model), av, sync_every=3, compressor=comp, error_feedback=ef)
        train(model, opt, rank, 9)
        return opt.stats

    numel = sum(p.numel() for p in mlp().parameters())
    for rank, stats in enumerate(LocalSwarm(n).run(fn)):
        if comp.sparse:  # all-gather: the whole payload to the other member
            per_round = len(encode(comp.compress(torch.zeros(numel))))
        else:  # butterfly: the other's shard, then my reduced shard back
            bounds = shard_bounds(numel, n)
            sizes = [len(encode(comp.compress(torch.zeros(hi - lo)))) for lo, hi in bounds]
            per_round = sizes[1 - rank] + sizes[rank]
        assert stats.outer_rounds == 3
        assert stats.bytes_sent == 3 * per_round


@pytest.mark.parametrize("kw,match", [
    (dict(sync_every=10, fragments=3), "divisible"),
    (dict(sync_every=12, fragments=3, delay=4), "delay"),
    (dict(alpha=1.5), "alpha"),
    (dict(sync_every=10, fragments=10), "more than the 4"),
    (dict(group_size=1), "group_size"),
    (dict(sync_every=0), "sync_every"),
    (dict(fragment_strategy="random", fragments=2, sync_every=10), "fragment_strategy"),
])
def test_invalid_settings_name_the_value(kw, match):
    model = mlp()
    with pytest.raises(ValueError, match=match):
        DiLoCo(model.parameters(), inner(model), LocalSwarm(1).averager(0), **kw)


def test_params_must_match_the_inner_optimizer():
    a, b = mlp(), mlp()
    with pytest.raises(ValueError, match="exactly the parameters"):
        DiLoCo(a.parameters(), inner(b), LocalSwarm(1).averager(0))


def test_lr_scheduler_on_the_wrapper_drives_the_inner_optimizer():
    model = mlp()
    inner_opt = inner(model)
    opt = DiLoCo(model.parameters(), inner_opt, LocalSwarm(1).averager(0), sync_every=5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    train(model, opt, 0, 2)
    sched.step()
    sched.step()
    assert inner_opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)


def test_streaming_defaults_and_named_fragments():
    blocks = torch.nn.ModuleDict({"embed": torch.nn.Linear(2, 2), "blocks": torch.nn.ModuleList(
        [torch.nn.Linear(2, 2) for _ in range(4)])})
    opt = StreamingDiLoCo(blocks.named_parameters(), torch.optim.AdamW(blocks.parameters()),
                          LocalSwarm(1).averager(0), sync_every=100)
    assert (opt.fragments, opt.delay, opt.alpha, opt.compression.name) == (4, 1, 0.0, "fp4")
    names = [n for n, _ in blocks.named_parameters()]
    # 5 units: embed.weight, embed.bias (alone each) and blocks.0..3; strided over 4 fragments
    frag_names = [[names[i] for i in idx] for idx in opt.fragment_params]
    assert any({"blocks.0.weight", "blocks.0.bias"} <= set(f) for f in frag_names)
    assert all(sum(n.startswith(f"blocks.{b}.") for n in f) in (0, 2) for f in frag_names for b in range(4))


@pytest.mark.parametrize("restart,phi2", [(True, 1.33), (False, 0.763)])
def test_momentum_restart_when_the_mean_reverses_hand_computed(restart, phi2):
    # one worker, H = 1, inner SGD lr 1, outer lr 0.7, Nesterov 0.9, phi0 = 0
    # step 1: grad 1 -> delta 1, buf 1, phi = -0.7 * (1 + 0.9) = -1.33
    # step 2: grad -2 -> delta -2 points against buf:
    #   restart: buf = -2, phi = -1.33 + 0.7 * (2 + 1.8) = 1.33
    #   no restart: buf = 0.9 - 2 = -1.1, phi = -1.33 + 0.7 * (2 + 0.99) = 0.763
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = DiLoCo([p], torch.optim.SGD([p], lr=1.0), LocalSwarm(1).averager(0), sync_every=1, outer_lr=0.7,
                 outer_momentum=0.9, momentum_restart=restart)
    for g in (1.0, -2.0):
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
    assert p.item() == pytest.approx(phi2, abs=1e-6)  # phi is kept in fp32
    assert opt.stats.momentum_restarts == int(restart)
