"""A join node's checkpoint folder (claimed with a lock file) and its checkpoint.

One running node per folder: `claim_folder` writes the process id to
``<folder>/.lock``. A lock whose process is gone is taken over; with
``find_free`` (the default folder) a folder in use is skipped for
``<folder>-2``, ``-3`` ... instead of refused. `NodeCheckpoint` keeps the
model and optimizer state as ``<folder>/node.safetensors`` + ``node.json``
(`lowcomm.checkpoint`: atomic, checksummed) and loads it only for the same
settings.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from lowcomm.checkpoint import CheckpointError, load_state, save_state
from lowcomm.config import ConfigError
from lowcomm.optimizers import OuterOptimizer

CHECKPOINT = "node"


@dataclass
class FolderLock:
    """A checkpoint folder this process holds until `release`."""

    folder: Path
    lock: Path

    def release(self) -> None:
        self.lock.unlink(missing_ok=True)


def claim_folder(base: str | Path, find_free: bool, console: Console) -> FolderLock:
    """Take the folder ``base`` (made if missing) for this process; with
    ``find_free``, the first of ``base``, ``base-2``, ``base-3`` ... that no
    running process holds. `ConfigError` for ``--checkpoint-dir`` otherwise."""
    base = Path(base)
    for i in range(1, 1000):
        folder = base if i == 1 else base.with_name(f"{base.name}-{i}")
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / ".lock"
        try:
            holder = int(lock.read_text().strip())
            os.kill(holder, 0)
            alive = holder != os.getpid()
        except (FileNotFoundError, ValueError, ProcessLookupError):
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            lock.write_text(str(os.getpid()))
            if folder != base:
                console.print(f"using checkpoint folder {folder} ({base} is in use by a running node)",
                              highlight=False)
            return FolderLock(folder, lock)
        if not find_free:
            raise ConfigError("--checkpoint-dir", f"{folder} is in use by a running node (pid {holder}); "
                                                  "give this node a folder of its own")
    raise ConfigError("--checkpoint-dir", "no free checkpoint folder")


class NodeCheckpoint:
    """The checkpoint ``<folder>/node.*`` of a node whose run settings hash to
    ``settings_hash``; ``console`` gets a line for a checkpoint it skips.

    A node of G ranks (``rank``, ``ranks``: `lowcomm.join.group`) keeps one per
    rank, ``<folder>/node-rank{r}.*`` (model, inner and outer optimizer state
    with the rank's own error-feedback residuals), all written at the same
    step; a rank loads its own only if every rank's is there at the same step
    (a node killed while writing them starts without), so the ranks resume
    together, bitwise."""

    def __init__(self, folder: Path, settings_hash: str, run_id: str, console: Console, rank: int = 0,
                 ranks: int = 1):
        names = [CHECKPOINT] if ranks == 1 else [f"{CHECKPOINT}-rank{r}" for r in range(ranks)]
        self.paths = [Path(folder) / name for name in names]
        self.path = self.paths[rank]
        self.hash, self.run_id, self.console = settings_hash, run_id, console

    def save(self, model: torch.nn.Module, opt: OuterOptimizer) -> None:
        save_state(self.path, {"model": model.state_dict(), "opt": opt.state_dict()},
                   {"hash": self.hash, "step": opt.step_count, "run_id": self.run_id})

    def load(self, model: torch.nn.Module, opt: OuterOptimizer) -> int | None:
        """Load the checkpoint into ``model`` and ``opt`` if there is a valid one for
        these settings and return its step; None (a missing one silently, an unusable
        one with a line saying why) otherwise."""
        path = self.path
        if not path.with_suffix(".json").exists() and not path.with_suffix(".safetensors").exists():
            return None
        try:
            steps = {self._step(p) for p in self.paths}
            if len(steps) > 1:
                raise CheckpointError(f"the ranks' checkpoints are at different steps "
                                      f"({', '.join(map(str, sorted(steps, key=str)))})")
            state, meta = load_state(path)
            if meta.get("hash") != self.hash:
                raise CheckpointError(f"it was written for other settings ({meta.get('hash')})")
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        except (CheckpointError, KeyError, ValueError, RuntimeError) as e:
            self.console.print(f"[yellow]skipping checkpoint {escape(str(path))}: {escape(str(e))}[/]",
                               highlight=False)
            return None
        self.console.print(f"resumed from checkpoint at step {meta['step']}", highlight=False)
        return int(meta["step"])

    @staticmethod
    def _step(path: Path) -> int | None:
        """The step in the meta of the checkpoint at ``path`` (None: missing or unreadable)."""
        try:
            return json.loads(path.with_suffix(".json").read_bytes())["meta"]["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
