"""What a training task is, how one is found by name or ``module:function``, and
the pieces the built-in tasks share (the ``shards`` option, per-worker
generators, a seeded MLP, a task over a table of examples)."""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]

#: How the built-in tasks split training data between workers: ``iid`` (every
#: worker samples the whole training set) or ``noniid`` (each worker one part).
SHARDS = ("iid", "noniid")


class TaskError(ValueError):
    """A task cannot be loaded or built (bad path, no data ...)."""


@dataclass
class Task:
    """A model, data per worker, a loss and an evaluation.

    ``make_model(seed)`` builds the model (the same seed gives the same
    weights); ``batches(rank, workers, seed)`` yields worker ``rank``'s
    (inputs, targets) batches, forever (which data: ``shards`` below); ``loss(model, batch)`` is the training
    loss; ``evaluate(model)`` the held-out loss (a float); ``make_inner(model,
    lr)`` the inner optimizer; ``tokens_per_batch`` counts one batch.

    The built-in tasks take ``shards`` (one of `SHARDS`): with ``"iid"`` every
    worker draws from the whole training set with a generator of its own; with
    ``"noniid"`` worker ``rank`` draws only from its own part (each task's
    docstring says which part).
    """

    name: str
    make_model: Callable[[int], nn.Module]
    batches: Callable[[int, int, int], Iterator[Batch]]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    make_inner: Callable[[nn.Module, float], torch.optim.Optimizer]
    tokens_per_batch: int
    default_lr: float = 3e-3


BUILTIN = {
    "tinylm": "lowcomm.tasks.tinylm:tinylm",
    "codeclass": "lowcomm.tasks.codeclass:codeclass",
    "terrain": "lowcomm.tasks.terrain:terrain",
}


def check_shards(shards: str) -> str:
    """``shards`` itself if it is one of `SHARDS`; otherwise a `TaskError`."""
    if shards not in SHARDS:
        raise TaskError(f"shards={shards!r}: use one of {', '.join(SHARDS)}")
    return shards


def worker_generator(seed: int, rank: int) -> torch.Generator:
    """The private generator worker ``rank`` draws its batches with (the same for every task)."""
    return torch.Generator().manual_seed(seed * 7919 + rank)


def seeded_mlp(sizes: list[int], seed: int) -> nn.Sequential:
    """Linear layers of ``sizes`` with GELU between; weights N(0, 1/fan_in), biases 0,
    drawn from a private generator (the same seed gives the same weights; safe from threads)."""
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
    model = nn.Sequential(*layers[:-1])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * layer.in_features ** -0.5)
                layer.bias.zero_()
    return model


def example_task(name: str, inputs: torch.Tensor, targets: torch.Tensor, pool: Callable[[int, int], torch.Tensor],
                 held_out: torch.Tensor, make_model: Callable[[int], nn.Module],
                 loss: Callable[[nn.Module, Batch], torch.Tensor], batch_size: int, default_lr: float) -> Task:
    """A `Task` over a table of examples (row i: ``inputs[i]``, ``targets[i]``).

    ``pool(rank, workers)`` gives the rows worker ``rank`` trains on; it draws
    ``batch_size`` of them at a time, with replacement, with `worker_generator`.
    `evaluate` is ``loss`` over the rows ``held_out``, in one batch; the inner
    optimizer is AdamW. ``tokens_per_batch`` is ``batch_size`` (examples).
    """
    val = inputs[held_out], targets[held_out]

    def batches(rank: int, workers: int, seed: int) -> Iterator[Batch]:
        rows = pool(rank, workers)
        gen = worker_generator(seed, rank)
        while True:
            idx = rows[torch.randint(0, len(rows), (batch_size,), generator=gen)]
            yield inputs[idx], targets[idx]

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        return loss(model, val).item()

    def make_inner(model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    return Task(name, make_model, batches, loss, evaluate, make_inner, batch_size, default_lr)


def load_task(spec: str, **options) -> Task:
    """A built-in task's name (`BUILTIN`: ``"tinylm"``, ``"codeclass"``, ``"terrain"``) or
    ``"package.module:function"``; the function gets ``options`` (e.g. ``data=PATH``, and for
    the built-in tasks ``shards="iid"`` or ``"noniid"``, ``batch_size=N``) and returns a `Task`."""
    target = BUILTIN.get(spec, spec)
    if ":" not in target:
        raise TaskError(f"unknown task {spec!r}; use one of {sorted(BUILTIN)} or 'module:function'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any import failure of the user's module is reported the same way
        raise TaskError(f"could not import task module {module_name!r}: {type(e).__name__}: {e}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise TaskError(f"module {module_name!r} has no callable {attr!r}")
    try:
        inspect.signature(factory).bind(**options)
    except TypeError as e:
        raise TaskError(f"task {spec!r} does not take these options {sorted(options)}: {e}") from None
    except ValueError:  # no signature to check (a builtin): let the call itself tell
        pass
    task = factory(**options)
    if not isinstance(task, Task):
        raise TaskError(f"{target} returned {type(task).__name__}, not a lowcomm.tasks.Task")
    return task
