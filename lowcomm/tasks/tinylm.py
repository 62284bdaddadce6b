"""`tinylm`: a byte-level causal transformer on Python source code.

The corpus is one every machine with Python has: the standard library's own
``.py`` files (found through ``sysconfig``, site-packages excluded, in sorted
path order). Every tenth file is held out for validation. ``data=PATH`` uses
every file under a folder instead. The model is nanoGPT-shaped (pre-norm
blocks, causal attention, GELU MLP) and small enough to train on two CPU cores.

Shards (``shards=``): ``iid`` (the default): every worker draws windows from
anywhere in the training text. ``noniid``: the training files, sorted by path
and concatenated, are cut into one contiguous slice per worker, and worker r
draws only from the r-th slice, so workers see different modules.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from lowcomm.tasks.base import Batch, Task, TaskError, check_shards, worker_generator

VOCAB = 256  # bytes


@dataclass(frozen=True)
class TinyLMConfig:
    seq_len: int = 64          # context, in bytes
    batch_size: int = 16       # sequences per worker per step
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    eval_batches: int = 8      # held-out batches per evaluation
    weight_decay: float = 0.0


class Block(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model))
        self.n_heads = cfg.n_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape  # (B, T, C)
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, c // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, VOCAB)


def init_weights(model: nn.Module, seed: int) -> None:
    """GPT-2 style init from a private generator (safe to call from threads)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "ln" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def stdlib_root() -> Path:
    """The folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """Every ``.py`` file of the standard library (site-packages excluded), sorted by path."""
    root = stdlib_root()
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.is_file())


def folder_files(path: str | Path) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise TaskError(f"--data {path}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.parts))
    if not files:
        raise TaskError(f"--data {path}: the folder has no files; point it at a folder of text files")
    return files


@lru_cache(maxsize=4)
def corpus(data: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, validation bytes) as uint8 tensors; every tenth file is validation."""
    files = folder_files(data) if data else stdlib_files()
    train, val = bytearray(), bytearray()
    for i, f in enumerate(files):
        (val if i % 10 == 9 else train).extend(f.read_bytes() + b"\n")
    if len(files) < 10:  # too few files to hold one out: use the last tenth of the text
        cut = len(train) * 9 // 10
        train, val = train[:cut], train[cut:]
    if len(train) < 4096 or len(val) < 1024:
        raise TaskError(f"--data {data or 'stdlib'}: only {len(train)} training and {len(val)} validation bytes; "
                        "need at least 4096 and 1024")
    return torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(val, dtype=torch.uint8)


def _windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> Batch:
    idx = starts.unsqueeze(1) + torch.arange(seq_len + 1)
    seqs = data[idx].long()
    return seqs[:, :-1], seqs[:, 1:]


def tinylm(data: str | None = None, seq_len: int = 64, batch_size: int = 16, d_model: int = 64,
           n_layers: int = 2, n_heads: int = 4, shards: str = "iid") -> Task:
    """The built-in task; ``data`` is a folder of text files (default: the stdlib);
    ``shards`` is ``"iid"`` or ``"noniid"`` (see the module docstring)."""
    check_shards(shards)
    cfg = TinyLMConfig(seq_len=seq_len, batch_size=batch_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    train, val = corpus(data)
    g = torch.Generator().manual_seed(1234)
    val_starts = torch.randint(0, len(val) - seq_len - 1, (cfg.eval_batches * batch_size,), generator=g)
    val_batches = [_windows(val, s, seq_len) for s in val_starts.split(batch_size)]

    def make_model(seed: int) -> nn.Module:
        model = TinyLM(cfg)
        init_weights(model, seed)
        return model

    def batches(rank: int, workers: int, seed: int) -> Iterator[Batch]:
        shard = len(train) // workers if shards == "noniid" else len(train)
        lo = rank * shard if shards == "noniid" else 0
        gen = worker_generator(seed, rank)
        while True:
            starts = lo + torch.randint(0, shard - seq_len - 1, (batch_size,), generator=gen)
            yield _windows(train, starts, seq_len)

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        return sum(loss(model, b).item() for b in val_batches) / len(val_batches)

    def make_inner(model: nn.Module, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)

    return Task("tinylm", make_model, batches, loss, evaluate, make_inner, batch_size * seq_len, default_lr=3e-3)


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["TinyLM", "TinyLMConfig", "tinylm", "param_count"]
