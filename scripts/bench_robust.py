"""Hostile workers against the aggregators: the honest workers' final loss.

    python scripts/bench_robust.py                         # codeclass, 4 and 8 workers, every rule and attack
    python scripts/bench_robust.py --workers 4 --aggregators mean,trimmed_mean --steps 200

Each cell trains DiLoCo (constructor defaults, H = 20) with `LocalSwarm` on a
built-in task, one worker hostile (`lowcomm.sim.attacks`: scaled x100,
sign-flipped x10, noise of 10x the honest norm, the negated update with a
claimed weight of 1e6, x100 in every other round), and prints the honest
workers' mean held-out loss as a ratio to the clean run with the same rule
(no attacker) and, for the clean runs, the rule's cost against ``mean``.
Members flagged as outliers in 3 consecutive rounds are left out for 20, as
in the real swarm.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lowcomm.sim.attacks import ATTACKS, train_under_attack  # noqa: E402
from lowcomm.tasks import load_task  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="codeclass")
    ap.add_argument("--workers", default="4,8", help="comma-separated worker counts [%(default)s]")
    ap.add_argument("--aggregators", default="mean,trimmed_mean,centered_clip,median,norm_clip+trimmed_mean")
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--steps", type=int, default=400)
    args = ap.parse_args()
    task = load_task(args.task)
    attacks = args.attacks.split(",")
    print(f"| M | aggregator | clean | clean / mean's | " + " | ".join(attacks) + " |")
    print("|" + "---|" * (4 + len(attacks)))
    started = time.time()
    for workers in (int(m) for m in args.workers.split(",")):
        mean_clean = None
        for agg in args.aggregators.split(","):
            clean = train_under_attack(task, workers, agg, None, steps=args.steps)
            mean_clean = clean if agg == "mean" else mean_clean
            cost = f"{clean / mean_clean:.3f}" if mean_clean else "-"
            cells = [f"{train_under_attack(task, workers, agg, ATTACKS[a], steps=args.steps) / clean:.3f}"
                     for a in attacks]
            print(f"| {workers} | {agg} | {clean:.4f} | {cost} | " + " | ".join(cells) + " |", flush=True)
    print(f"(honest loss / clean loss of the same rule; task {args.task}, {args.steps} steps, "
          f"{time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
