"""A task small enough for CLI tests: a 2-layer MLP regression, sharded by rank."""

import torch
from torch import nn

from lowcomm.tasks import Task


def task(hidden: int = 16, depth: int = 0) -> Task:
    """``depth`` more hidden-to-hidden layers make the model larger (`wide`)."""
    def make_model(seed):
        inner = [m for _ in range(depth) for m in (nn.Linear(hidden, hidden), nn.Tanh())]
        model = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), *inner, nn.Linear(hidden, 1))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return model

    def target(x):
        return torch.sin(x.sum(1, keepdim=True))

    def batches(rank, workers, seed):
        g = torch.Generator().manual_seed(seed * 101 + rank)
        while True:
            x = torch.randn(32, 8, generator=g) + 0.1 * rank
            yield x, target(x)

    gv = torch.Generator().manual_seed(5)
    xv = torch.randn(256, 8, generator=gv)

    def loss(model, batch):
        x, y = batch
        return ((model(x) - y) ** 2).mean()

    @torch.no_grad()
    def evaluate(model):
        return loss(model, (xv, target(xv))).item()

    def make_inner(model, lr):
        return torch.optim.AdamW(model.parameters(), lr=lr)

    return Task("tiny", make_model, batches, loss, evaluate, make_inner, tokens_per_batch=32, default_lr=1e-2)


def wide() -> Task:
    """530,433 parameters, 2.1 MB of fp32 gradients: two DDP buckets, 263,169 values (the last two layers,
    past 1 MiB) then 267,264."""
    return task(hidden=512, depth=2)


def broken():
    return "not a task"
