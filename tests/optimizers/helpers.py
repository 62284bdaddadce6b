"""Small deterministic problems for the optimizer tests."""

import torch
from torch import nn


def seeded(model: nn.Module, seed: int, scale: float) -> nn.Module:
    """``model`` with every parameter drawn from N(0, scale^2) by a generator of its
    own (thread-safe, unlike the global seed)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def mlp(seed=0):
    """A small MLP initialised from its own generator."""
    return seeded(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)), seed, 0.5)


def batch(rank, step, seed=0):
    g = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step)
    x = torch.randn(16, 4, generator=g)
    return x, x.sum(1, keepdim=True).sin() + 0.1 * rank


def train(model, opt, rank, steps, start=0, same_batches=False):
    for t in range(start, start + steps):
        x, y = batch(0 if same_batches else rank, t)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class Recorder:
    """An averager proxy that records (key, round, step) of every call."""

    def __init__(self, averager, clock):
        self.inner, self.clock, self.calls = averager, clock, []
        self.peer_id = averager.peer_id

    def average(self, key, tensors, **kw):
        self.calls.append((key, kw["round"], self.clock()))
        return self.inner.average(key, tensors, **kw)
