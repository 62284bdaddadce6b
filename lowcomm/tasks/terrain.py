"""`terrain`: the elevation of a real landscape from the position on the map.

The data ships with matplotlib: ``jacksboro_fault_dem.npz``, a digital
elevation model (344 x 403 pixels, metres) of the Jacksboro fault in
Tennessee. An example is one pixel: the input is its (x, y) position, each in
[-1, 1] (x: column, left to right; y: row), the target its elevation
standardised with the training pixels' mean and std. A fixed random tenth of
the pixels is held out; `evaluate` is the MSE on `EVAL_PIXELS` of them. The
model maps the position to `FREQUENCIES` random Fourier features (sin and cos
of 2 pi <b, xy>, b ~ N(0, `SCALE`^2), the same b for every seed; Tancik et al.
2020, "Fourier features let networks learn high frequency functions"), then an
MLP (``2 * FREQUENCIES -> 128 -> 128 -> 1``, GELU); the loss is MSE.

Shards (``shards=``): ``iid`` (the default): every worker draws pixels from the
whole training set. ``noniid``: the map is cut into one vertical strip (a range
of columns, i.e. of x) per worker, and worker r draws only training pixels of
the r-th strip from the left.

    from lowcomm.tasks import load_task
    task = load_task("terrain", shards="noniid")
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lowcomm.tasks.base import Batch, Task, TaskError, check_shards, example_task, seeded_mlp

SAMPLE = "jacksboro_fault_dem.npz"  # in matplotlib's mpl-data/sample_data
FREQUENCIES = 64   # random Fourier features (each gives a sin and a cos)
SCALE = 5.0        # std of the frequencies, in cycles per unit of x or y (the map spans 2 units)
HIDDEN = 128
HELD_OUT = 0.1     # fraction of the pixels held out
EVAL_PIXELS = 4096
SPLIT_SEED = 0     # the held-out pixels and the frequencies are the same in every run


@dataclass(frozen=True)
class Terrain:
    """Every pixel of the map, flattened row by row."""

    xy: torch.Tensor         # (H*W, 2) float32, (x, y) in [-1, 1]
    elevation: torch.Tensor  # (H*W,) float32, standardised with the training pixels' mean and std
    column: torch.Tensor     # (H*W,) int64, 0 .. width-1
    train: torch.Tensor      # (n,) int64 pixel indices
    held_out: torch.Tensor   # (H*W // 10,) int64 pixel indices, in random order (the first EVAL_PIXELS: eval)
    width: int


def sample_path() -> Path:
    """Where matplotlib keeps the elevation map; a `TaskError` if it is not there."""
    try:
        from matplotlib import cbook
        path = Path(cbook.get_sample_data(SAMPLE, asfileobj=False))
    except Exception as e:  # matplotlib missing, or its sample data left out of the install
        raise TaskError(f"terrain needs matplotlib's sample data ({SAMPLE}): {type(e).__name__}: {e}; "
                        "install matplotlib with its mpl-data") from None
    if not path.is_file():
        raise TaskError(f"terrain needs matplotlib's sample data: {path} is missing; reinstall matplotlib")
    return path


@lru_cache(maxsize=1)
def terrain_data() -> Terrain:
    """The map as pixels, and the fixed train / held-out split."""
    with np.load(sample_path()) as npz:
        elevation = torch.from_numpy(npz["elevation"].astype(np.float32))  # (H, W), metres
    height, width = elevation.shape
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    xy = torch.stack([cols.flatten() / (width - 1), rows.flatten() / (height - 1)], dim=1) * 2 - 1
    perm = torch.randperm(height * width, generator=torch.Generator().manual_seed(SPLIT_SEED))
    cut = int(height * width * HELD_OUT)
    held_out, train = perm[:cut], perm[cut:].sort().values
    z = elevation.flatten()
    z = (z - z[train].mean()) / z[train].std()
    return Terrain(xy, z, cols.flatten(), train, held_out, width)


class TerrainNet(nn.Module):
    """(B, 2) positions -> (B,) standardised elevations, through random Fourier features."""

    def __init__(self, seed: int):
        super().__init__()
        freqs = torch.randn(2, FREQUENCIES, generator=torch.Generator().manual_seed(SPLIT_SEED)) * SCALE
        self.register_buffer("freqs", freqs, persistent=False)  # fixed: not a parameter, not in checkpoints
        self.mlp = seeded_mlp([2 * FREQUENCIES, HIDDEN, HIDDEN, 1], seed)

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        phase = 2 * math.pi * xy @ self.freqs                               # (B, FREQUENCIES)
        return self.mlp(torch.cat([phase.sin(), phase.cos()], dim=-1)).squeeze(-1)  # (B,)


def terrain(batch_size: int = 64, shards: str = "iid") -> Task:
    """The built-in regression task; ``shards`` is ``"iid"`` or ``"noniid"`` (see the module docstring)."""
    check_shards(shards)
    data = terrain_data()

    def pool(rank: int, workers: int) -> torch.Tensor:
        if shards == "iid":
            return data.train
        col = data.column[data.train]
        return data.train[(col >= rank * data.width // workers) & (col < (rank + 1) * data.width // workers)]

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        xy, z = batch  # (B, 2), (B,)
        return F.mse_loss(model(xy), z)

    return example_task("terrain", data.xy, data.elevation, pool, data.held_out[:EVAL_PIXELS], TerrainNet, loss,
                        batch_size, default_lr=1e-2)


__all__ = ["FREQUENCIES", "SCALE", "Terrain", "TerrainNet", "terrain", "terrain_data"]
