"""A task small enough for CLI tests: a 2-layer MLP regression, sharded by rank."""

import torch
from torch import nn

from lowcomm.tasks import Task


def task(hidden: int = 16) -> Task:
    def make_model(seed):
        model = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 1))
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


def broken():
    return "not a task"
