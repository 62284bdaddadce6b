"""Sweep `lowcomm simulate` settings and print one line per run.

    python scripts/sweep_simulate.py                      # the DiLoCo ablation in docs/results.md
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

ABLATION = [
    {"algorithms": "ddp", "workers": 1},
    {"algorithms": "diloco", "sync_every": 1, "outer_lr": 1.0, "outer_momentum": 0.0},
    {"algorithms": "diloco", "sync_every": 25, "outer_lr": 1.0, "outer_momentum": 0.5},
    {"algorithms": "diloco", "sync_every": 50},
    {"algorithms": "diloco", "sync_every": 50, "outer_lr": 1.0, "outer_momentum": 0.5},
    {"algorithms": "diloco", "outer_lr": 1.0, "outer_momentum": 0.0},
    {"algorithms": "diloco", "outer_lr": 1.0, "outer_momentum": 0.5},
    {"algorithms": "diloco", "outer_lr": 1.4, "outer_momentum": 0.0},
    {"algorithms": "ddp,diloco", "schedule": "cosine"},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--step-time", default="20ms")
    ap.add_argument("--runs", default=None, help="JSON list of settings (default: the DiLoCo ablation)")
    args = ap.parse_args()
    runs = json.loads(args.runs) if args.runs else ABLATION
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
