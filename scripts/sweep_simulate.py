"""Sweep `lowcomm simulate` settings and print one line per run.

    python scripts/sweep_simulate.py                      # the outer-defaults sweep of docs/results.md
    python scripts/sweep_simulate.py --sweep lr           # the inner learning rate of each task, for DDP
    python scripts/sweep_simulate.py --sweep ablation-2026-11-22   # the first session's ablation
    python scripts/sweep_simulate.py --steps 200 --runs '[{"algorithms": "ddp,diloco", "batch_size": 64}]'

Each run is a `SimulateConfig` (fields as the CLI flags, with underscores)
on top of ``--steps`` and a fixed step time; results go to runs/sweep-<i>/.
"""

from __future__ import annotations

import argparse
import io
import json

from rich.console import Console

from lowcomm.config import SimulateConfig
from lowcomm.sim.simulate import simulate


def _grid(tasks: list[str], algorithm: str, settings: list[dict]) -> list[dict]:
    return [{"algorithms": algorithm, "task": t, **kw} for t in tasks for kw in settings]


TASKS = ["tinylm", "codeclass", "terrain"]
SWEEPS = {
    # inner AdamW learning rate, for DDP (the tasks' default_lr)
    "lr": [{"algorithms": "ddp", "task": t, "lr": lr} for t, lrs in
           (("tinylm", (2e-3, 3e-3, 5e-3, 8e-3)), ("codeclass", (1e-4, 3e-4, 1e-3, 3e-3)),
            ("terrain", (1e-3, 3e-3, 1e-2, 3e-2))) for lr in lrs],
    # DiLoCo's outer (lr, momentum), Streaming DiLoCo's alpha, SparseLoCo's outer lr
    "outer": [{"algorithms": "ddp", "task": t} for t in TASKS]
    + _grid(TASKS, "diloco", [{"outer_lr": lr, "outer_momentum": m} for lr, m in
                              ((0.7, 0.9), (0.7, 0.5), (1.0, 0.0), (0.9, 0.5), (0.7, 0.7))])
    + _grid(TASKS, "streaming", [{"alpha": a} for a in (0.5, 0.0)])
    + _grid(TASKS, "sparseloco", [{"outer_lr": lr} for lr in (1.0, 2.0, 4.0)]),
    # the first session's DiLoCo ablation on its settings: non-IID tinylm, constant lr, H 100, momentum 0.9
    "ablation-2026-11-22": [{"shards": "noniid", "schedule": "constant", "sync_every": 100, "outer_momentum": 0.9,
                             **kw} for kw in (
        {"algorithms": "ddp", "workers": 1},
        {"algorithms": "diloco", "sync_every": 1, "outer_lr": 1.0, "outer_momentum": 0.0},
        {"algorithms": "diloco", "sync_every": 25, "outer_lr": 1.0, "outer_momentum": 0.5},
        {"algorithms": "diloco", "sync_every": 50},
        {"algorithms": "diloco", "sync_every": 50, "outer_lr": 1.0, "outer_momentum": 0.5},
        {"algorithms": "diloco", "outer_lr": 1.0, "outer_momentum": 0.0},
        {"algorithms": "diloco", "outer_lr": 1.0, "outer_momentum": 0.5},
        {"algorithms": "diloco", "outer_lr": 1.4, "outer_momentum": 0.0},
        {"algorithms": "ddp,diloco", "schedule": "cosine"},
    )],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--step-time", default="20ms")
    ap.add_argument("--sweep", default="outer", choices=sorted(SWEEPS), help="a named sweep [%(default)s]")
    ap.add_argument("--runs", default=None, help="JSON list of settings (instead of a named sweep)")
    args = ap.parse_args()
    runs = json.loads(args.runs) if args.runs else SWEEPS[args.sweep]
    for i, kw in enumerate(runs):
        cfg = SimulateConfig(**{"progress": False, "steps": args.steps, "step_time": args.step_time,
                                "name": f"sweep-{i}", **kw})
        run_dir = simulate(cfg, Console(file=io.StringIO()))
        summary = json.loads((run_dir / "summary.json").read_text())
        cells = "  ".join(f"{alg} {v['final_eval_loss']:.4f} ({v['bytes_sent_per_worker'] / 1e6:.2f} MB)"
                          for alg, v in summary.items())
        print(f"{json.dumps(kw):85s} {cells}", flush=True)


if __name__ == "__main__":
    main()
