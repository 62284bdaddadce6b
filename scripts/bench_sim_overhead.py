"""Simulator overhead: one simulated DDP worker against a plain torch loop.

    python scripts/bench_sim_overhead.py            # tinylm, 300 steps, best of 3

Both train the same model on the same batches for the same steps, on one
core, and evaluate at the start and the end. The simulated worker goes
through everything `lowcomm simulate` does: LocalSwarm, the DataParallel
wrapper, the averaging call, the network model's clock and the LR scheduler.
Prints both wall times and their ratio (target <= 1.15).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from lowcomm.config import SimulateConfig
from lowcomm.sim.network import Network
from lowcomm.optimizers.registry import settings_for
from lowcomm.sim.runner import run_algorithm
from lowcomm.tasks import load_task


def plain(task, steps: int, seed: int, lr: float) -> float:
    model = task.make_model(seed)
    opt = task.make_inner(model, lr)
    data = task.batches(0, 1, seed)
    task.evaluate(model)
    for _ in range(steps):
        task.loss(model, next(data)).backward()
        opt.step()
        opt.zero_grad()
    return task.evaluate(model)


def simulated(task, steps: int, seed: int, lr: float) -> float:
    cfg = SimulateConfig(workers=1, algorithms="ddp", steps=steps, eval_every=steps, seed=seed, lr=lr,
                         progress=False)
    run = run_algorithm(cfg, task, settings_for("ddp"), steps, 0.01, Network(1e8, 0.05))
    return run.records[-1].eval_loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = load_task("tinylm")
    lr = task.default_lr
    times = {"plain": [], "simulated": []}
    losses = {}
    for _ in range(args.repeats):
        for name, fn in (("plain", plain), ("simulated", simulated)):
            t0 = time.perf_counter()
            losses[name] = fn(task, args.steps, 0, lr)
            times[name].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    print(f"# {datetime.date.today()} · {platform.machine()} · torch {torch.__version__} · 1 thread · "
          f"tinylm · {args.steps} steps · best of {args.repeats}")
    print(f"plain torch loop     {best['plain']:.3f} s   final eval loss {losses['plain']:.4f}")
    print(f"simulated DDP worker {best['simulated']:.3f} s   final eval loss {losses['simulated']:.4f}")
    print(f"ratio simulated / plain: {best['simulated'] / best['plain']:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
