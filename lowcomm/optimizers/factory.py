"""Outer optimizers by name: the per-algorithm defaults of `lowcomm simulate`,
`lowcomm plan` and `lowcomm join`, resolved once into `Settings`, and the
optimizer they describe.

    s = settings_for("diloco", SimulateConfig())      # sync_every 100, codec none ...
    opt = build_optimizer(s, model, torch.optim.AdamW(model.parameters()), averager)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowcomm.config import SimulateConfig
from lowcomm.optimizers.base import OuterOptimizer
from lowcomm.optimizers.data_parallel import DataParallel
from lowcomm.optimizers.diloco import DiLoCo
from lowcomm.optimizers.noloco import NoLoCo

DEFAULT_SYNC = {"diloco": 100, "streaming": 100, "noloco": 50}
DEFAULT_CODEC = {"ddp": "none", "diloco": "none", "streaming": "fp4", "noloco": "none"}


@dataclass
class Settings:
    """The resolved per-algorithm settings of one run."""

    algorithm: str
    sync_every: int
    fragments: int
    delay: int
    alpha: float
    compressor: str
    error_feedback: bool
    group_size: int | None
    outer_lr: float = 0.7
    outer_momentum: float = 0.9


def settings_for(algorithm: str, cfg: SimulateConfig) -> Settings:
    """``algorithm``'s settings: what ``cfg`` sets, the algorithm's defaults for the rest."""
    sync = cfg.sync_every or DEFAULT_SYNC.get(algorithm, 1)
    codec = "none" if algorithm == "ddp" else (cfg.compressor or DEFAULT_CODEC[algorithm])
    group = cfg.group_size or (2 if algorithm == "noloco" else None)
    outer_lr = cfg.outer_lr or 0.7
    momentum = cfg.outer_momentum if cfg.outer_momentum >= 0 else (0.5 if algorithm == "noloco" else 0.9)
    if algorithm == "streaming":
        return Settings(algorithm, sync, cfg.fragments, cfg.delay, cfg.alpha, codec, cfg.error_feedback, group,
                        outer_lr, momentum)
    return Settings(algorithm, sync, 1, 0, 0.0, codec, cfg.error_feedback and algorithm != "ddp", group,
                    outer_lr, momentum)


def build_optimizer(s: Settings, model: torch.nn.Module, inner: torch.optim.Optimizer, averager) -> OuterOptimizer:
    """The outer optimizer ``s`` describes, over ``model``'s parameters, ``inner`` and ``averager``."""
    named = list(model.named_parameters())
    if s.algorithm == "ddp":
        return DataParallel(named, inner, averager)
    if s.algorithm == "noloco":
        return NoLoCo(named, inner, averager, sync_every=s.sync_every, group_size=s.group_size,
                      compressor=s.compressor, error_feedback=s.error_feedback, outer_lr=s.outer_lr,
                      outer_momentum=s.outer_momentum)
    return DiLoCo(named, inner, averager, sync_every=s.sync_every, fragments=s.fragments, delay=s.delay,
                  alpha=s.alpha, compressor=s.compressor, error_feedback=s.error_feedback, group_size=s.group_size,
                  outer_lr=s.outer_lr, outer_momentum=s.outer_momentum)
