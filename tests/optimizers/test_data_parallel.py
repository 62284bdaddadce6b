"""Data-parallel baselines: DDP equals large-batch training; compressed DDP and DGC."""

import torch

from lowcomm.compressors import get_compressor
from lowcomm.optimizers import CompressedDataParallel, DataParallel
from lowcomm.sim import LocalSwarm

from tests.optimizers.helpers import batch, flat, mlp, train


def test_ddp_equals_one_worker_on_the_mean_gradient():
    # SGD on the mean of 2 workers' gradients == SGD on the mean loss of both batches
    ref = mlp()
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for t in range(5):
        loss = sum(((ref(x) - y) ** 2).mean() for x, y in (batch(0, t), batch(1, t))) / 2
        loss.backward()
        sgd.step()
        sgd.zero_grad()

    def fn(rank, av):
        model = mlp()
        opt = DataParallel(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), av)
        train(model, opt, rank, 5)
        return flat(model), opt.stats

    numel = flat(mlp()).numel()
    for w, stats in LocalSwarm(2).run(fn):
        assert torch.allclose(w, flat(ref), atol=1e-6, rtol=0)
        assert stats.outer_rounds == 5
        assert stats.bytes_sent > 5 * numel * 4 / 2  # fp32: half the vector each way per step, plus headers


def test_compressed_ddp_with_ef_and_dgc_train():
    def run(**kw):
        def fn(rank, av):
            model = mlp()
            opt = CompressedDataParallel(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.05), av,
                                         get_compressor("topk", density=0.25, chunk_size=16, values="fp32"), **kw)
            x, y = batch(rank, 999)
            start = ((model(x) - y) ** 2).mean().item()
            train(model, opt, rank, 60)
            return start, ((model(x) - y) ** 2).mean().item(), opt
        return LocalSwarm(2).run(fn)

    for kw in ({}, {"momentum_correction": True}):
        for start, end, opt in run(**kw):
            assert end < start * 0.7
    # DGC clears the accumulated momentum where values were sent
    _, _, opt = run(momentum_correction=True)[0]
    assert any((u == 0).any() for u in opt.u)
