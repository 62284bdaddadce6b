"""The settings every node of a run must share, their hash, and what differs."""

from __future__ import annotations

import hashlib
import json

from torch import nn

from lowcomm.optimizers.base import units
from lowcomm.optimizers.diloco import auto_fragments
from lowcomm.optimizers.registry import Settings


#: Settings whose absence means this value (nodes that predate them, and the
#: settings hash of a default node, stay as they were).
IMPLIED = {"ranks_per_worker": 1}


def run_settings(task_spec: str, data: str, model: nn.Module, settings: Settings, aggregator: str = "mean",
                 ranks_per_worker: int = 1) -> dict:
    """What must match between nodes: the task, the model's parameter shapes,
    the outer algorithm's settings and the swarm's aggregator (not learning
    rate or batch size, which are each node's own). Streaming DiLoCo's automatic fragment count is resolved
    for the model, so it matches a node that set the same count. ``ranks_per_worker``
    (``--nproc-per-node``, stated only when not 1): workers of G ranks exchange
    1/G slices, which pair only with slices of workers of the same G."""
    named = list(model.named_parameters())
    shapes = [[name, list(p.shape)] for name, p in named]
    options = dict(settings.options)
    if "fragments" in options and options["fragments"] is None:
        options["fragments"] = auto_fragments(settings.sync_every, len(units(named)), settings.delay)
    return {"task": task_spec, "data": data, "parameters": shapes, "algorithm": settings.algorithm,
            **options, "sync_every": settings.sync_every, "aggregator": aggregator,
            **({"ranks_per_worker": ranks_per_worker} if ranks_per_worker != 1 else {})}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def differences(mine: dict, theirs: dict) -> list[str]:
    """Human-readable list of the settings that differ (``theirs`` as a peer sent it)."""
    out = []
    for key in sorted(set(mine) | set(theirs)):
        a, b = mine.get(key, IMPLIED.get(key)), theirs.get(key, IMPLIED.get(key))
        if a != b:
            if key == "parameters":
                na, nb = (len(x) if isinstance(x, list) else 0 for x in (a, b))
                out.append(f"model shape ({na} vs {nb} tensors{', shapes differ' if na == nb else ''})")
            else:
                out.append(f"{key} ({a!r} here, {b!r} there)")
    return out
