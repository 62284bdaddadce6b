"""`codeclass`: which standard-library package a chunk of Python source comes from.

The data is the running Python's own standard library (the files of
`tinylm.stdlib_files`): every file of the `PACKAGES` (their ``test``/``tests``
subfolders left out, as newer Pythons moved them) is cut into non-overlapping
`CHUNK`-byte chunks, and each chunk becomes a `FEATURES`-dim vector of hashed
byte-bigram and -trigram counts (log1p, then standardised per dimension with
the training chunks' mean and std). The label is the package. Every tenth file
of each package, counting from its second, is held out, so the evaluation
chunks come from files no worker trains on: the model must generalise to
unseen files, and it does to about 60% accuracy, after which longer training
overfits (the held-out loss rises again while the accuracy stays). The model is an MLP
(``FEATURES -> 128 -> 128 -> len(PACKAGES)``, GELU); the loss is cross-entropy.

Shards (``shards=``): ``iid`` (the default): every worker draws examples from
the whole training set. ``noniid``: the training examples, sorted by label, are
cut into one contiguous slice per worker, and worker r draws only from the r-th
slice (label skew: each worker sees only a few packages).

    from lowcomm.tasks import load_task
    task = load_task("codeclass", shards="noniid")
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lowcomm.tasks.base import Batch, Task, TaskError, check_shards, example_task, seeded_mlp
from lowcomm.tasks.tinylm import stdlib_files, stdlib_root

#: The labels: large packages every CPython 3.10+ standard library has.
PACKAGES = ("asyncio", "email", "http", "importlib", "json", "logging", "multiprocessing", "unittest", "urllib",
            "xml")
CHUNK = 256      # bytes per example
FEATURE_BITS = 10
FEATURES = 1 << FEATURE_BITS  # buckets of hashed byte bigrams and trigrams
HIDDEN = 128


@dataclass(frozen=True)
class CodeSet:
    """Every chunk of every file of the packages found, in file order."""

    features: torch.Tensor   # (N, FEATURES) float32, standardised with the training rows' mean and std
    labels: torch.Tensor     # (N,) int64, index into `packages`
    files: torch.Tensor      # (N,) int64, index into `paths`
    held_out: torch.Tensor   # (N,) bool, the evaluation chunks
    packages: tuple[str, ...]
    paths: tuple[Path, ...]


def ngram_features(chunks: torch.Tensor) -> torch.Tensor:
    """(N, L) uint8 byte chunks -> (N, FEATURES) log1p counts of their hashed byte bigrams and trigrams."""
    x = chunks.long()
    bigrams = x[:, :-1] * 256 + x[:, 1:]                                   # (N, L-1), in [0, 2**16)
    trigrams = bigrams[:, :-1] * 256 + x[:, 2:] + 2**16                     # (N, L-2), in [2**16, 2**24 + 2**16)
    keys = torch.cat([bigrams, trigrams], dim=1)
    buckets = (keys * 2654435761 % 2**32) >> (32 - FEATURE_BITS)           # Knuth's multiplicative hash
    rows = torch.arange(len(x)).unsqueeze(1) * FEATURES
    counts = torch.bincount((rows + buckets).flatten(), minlength=len(x) * FEATURES).view(len(x), FEATURES)
    return torch.log1p(counts.float())


def package_files() -> dict[str, list[Path]]:
    """The `PACKAGES` this Python has, each with its ``.py`` files (sorted, tests left out)."""
    root = stdlib_root()
    found: dict[str, list[Path]] = {name: [] for name in PACKAGES}
    for path in stdlib_files():
        parts = path.relative_to(root).parts
        if len(parts) > 1 and parts[0] in found and not {"test", "tests"} & set(parts):
            found[parts[0]].append(path)
    return {name: files for name, files in found.items() if files}


@lru_cache(maxsize=1)
def dataset() -> CodeSet:
    """All chunks, their features and labels; built once per process (about a second)."""
    found = package_files()
    if len(found) < 2:
        raise TaskError(f"codeclass: found only {sorted(found)} of the standard-library packages {PACKAGES} under "
                        f"{stdlib_root()}; it needs at least 2 (a full CPython install has them all)")
    data, labels, files, held_out, paths = bytearray(), [], [], [], []
    for label, name in enumerate(found):
        for i, path in enumerate(found[name]):
            text = path.read_bytes()
            n = len(text) // CHUNK
            data += text[:n * CHUNK]
            labels += [label] * n
            files += [len(paths)] * n
            held_out += [i % 10 == 1] * n
            paths.append(path)
    features = ngram_features(torch.frombuffer(data, dtype=torch.uint8).view(-1, CHUNK))
    held_out = torch.tensor(held_out)
    train = features[~held_out]
    features = (features - train.mean(0)) / (train.std(0) + 1e-3)
    return CodeSet(features, torch.tensor(labels), torch.tensor(files), held_out, tuple(found), tuple(paths))


def codeclass(batch_size: int = 32, shards: str = "iid") -> Task:
    """The built-in classification task; ``shards`` is ``"iid"`` or ``"noniid"`` (see the module docstring)."""
    check_shards(shards)
    data = dataset()
    train = torch.nonzero(~data.held_out).squeeze(1)
    train = train[torch.sort(data.labels[train], stable=True).indices]  # by label, for the noniid slices
    classes = len(data.packages)

    def pool(rank: int, workers: int) -> torch.Tensor:
        shard = len(train) // workers
        return train[rank * shard:(rank + 1) * shard] if shards == "noniid" else train

    def make_model(seed: int) -> nn.Module:
        return seeded_mlp([FEATURES, HIDDEN, HIDDEN, classes], seed)  # (B, FEATURES) -> (B, classes) logits

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch  # (B, FEATURES), (B,)
        return F.cross_entropy(model(x), y)

    return example_task("codeclass", data.features, data.labels, pool, torch.nonzero(data.held_out).squeeze(1),
                        make_model, loss, batch_size, default_lr=3e-4)


__all__ = ["CHUNK", "FEATURES", "PACKAGES", "CodeSet", "codeclass", "dataset"]
