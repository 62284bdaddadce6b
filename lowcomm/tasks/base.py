"""What a training task is, and how one is found by name or ``module:function``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]


class TaskError(ValueError):
    """A task cannot be loaded or built (bad path, no data ...)."""


@dataclass
class Task:
    """A model, data per worker, a loss and an evaluation.

    ``make_model(seed)`` builds the model (the same seed gives the same
    weights); ``batches(rank, workers, seed)`` yields the (inputs, targets) of
    worker ``rank``'s own shard, forever; ``loss(model, batch)`` is the training
    loss; ``evaluate(model)`` the held-out loss (a float); ``make_inner(model,
    lr)`` the inner optimizer; ``tokens_per_batch`` counts one batch.
    """

    name: str
    make_model: Callable[[int], nn.Module]
    batches: Callable[[int, int, int], Iterator[Batch]]
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    evaluate: Callable[[nn.Module], float]
    make_inner: Callable[[nn.Module, float], torch.optim.Optimizer]
    tokens_per_batch: int
    default_lr: float = 3e-3


BUILTIN = {"tinylm": "lowcomm.tasks.tinylm:tinylm"}


def load_task(spec: str, **options) -> Task:
    """``"tinylm"`` or ``"package.module:function"``; the function gets ``options``
    (e.g. ``data=PATH``) and returns a `Task`."""
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
    task = factory(**options)
    if not isinstance(task, Task):
        raise TaskError(f"{target} returned {type(task).__name__}, not a lowcomm.tasks.Task")
    return task
