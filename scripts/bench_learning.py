"""The learning benchmark: every built-in task, M = 4 and 8 workers, IID and
non-IID shards, every algorithm at equal tokens, with the defaults a user gets.

    python scripts/bench_learning.py                      # the full suite (~25 min on 2 cores)
    python scripts/bench_learning.py --tasks codeclass --workers 4 --shards iid
    python scripts/bench_learning.py --write docs/results.md

Each cell is one `lowcomm simulate` run (the same code path as the command):
default outer settings, the same inner AdamW with warm-up and cosine decay for
every algorithm, 100 Mbit/s links with 50 ms latency. Per task and algorithm it
prints:

- loss / DDP: final eval loss divided by DDP's;
- DDP bytes / these: DDP's bytes sent per worker divided by the algorithm's;
- rise: eval loss at the end minus at half-way (positive: rose in the last half);
- loss @ DDP's wall clock: the eval loss the algorithm had reached when the
  network model says DDP finished (an algorithm that finishes sooner shows its
  final loss: the runs are of equal tokens, not extended to DDP's time);
- DDP's loss @ this wall clock: DDP's eval loss (at its last evaluation) when
  this algorithm finished: what DDP buys in the same time on the same link.

``--write FILE`` replaces the section between the benchmark's markers in FILE
(appending one if absent) with the table, the date and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowcomm.config import SimulateConfig  # noqa: E402
from lowcomm.sim.simulate import simulate  # noqa: E402

ALGORITHMS = "ddp,diloco,streaming,noloco,dgc,sparseloco"
#: Steps per worker of each task: every algorithm completes >= 20 outer rounds per fragment at H = 20
#: (Streaming DiLoCo's first fragment is sent at steps 20, 40, ... and applied a step later).
STEPS = {"tinylm": 420, "codeclass": 420, "terrain": 420}
BEGIN, END = "<!-- bench_learning: begin -->", "<!-- bench_learning: end -->"


def run_cell(task: str, workers: int, shards: str, algorithms: str, out: str, seed: int) -> dict:
    cfg = SimulateConfig(task=task, workers=workers, shards=shards, algorithms=algorithms, steps=STEPS[task],
                         eval_every=30, seed=seed, out=out, name=f"{task}-{workers}-{shards}", progress=False)
    run_dir = simulate(cfg, Console(file=open(os.devnull, "w")))
    return json.loads((run_dir / "summary.json").read_text())


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def rows_of(task: str, workers: int, shards: str, summary: dict) -> list[list[str]]:
    ddp_rise = summary["ddp"]["eval_loss_rise_last_half"] if "ddp" in summary else None
    rows = []
    for alg, s in summary.items():
        rise = s["eval_loss_rise_last_half"]
        rose = "yes" if rise > 0 else "no"
        if ddp_rise is not None and rise > max(ddp_rise, 0.0):
            rose += " (more than DDP)"
        rows.append([task, str(workers), shards, alg, f"{s['final_eval_loss']:.4f}",
                     _num(s["eval_loss_ratio_vs_ddp"], ".3f"), _num(s["bytes_ratio_vs_ddp"], ".0f") + "x",
                     f"{rise:+.4f} {rose}", _num(s["eval_loss_at_ddp_wall_clock"], ".4f"),
                     _num(s["ddp_eval_loss_at_this_wall_clock"], ".4f"), f"{s['outer_rounds']}"])
    return rows


HEADER = ["task", "M", "shards", "algorithm", "final eval loss", "loss / DDP", "DDP bytes / these",
          "rise over last half", "loss @ DDP's wall clock", "DDP's loss @ this wall clock", "exchanges"]


def markdown(rows: list[list[str]], context: str) -> str:
    lines = [BEGIN, context, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines + [END]) + "\n"


def write_section(path: Path, text: str) -> None:
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END) + 1:]
    else:
        new = old + ("\n" if old and not old.endswith("\n\n") else "") + "## Learning benchmark\n\n" + text
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", default=",".join(STEPS), help="comma-separated tasks [%(default)s]")
    ap.add_argument("--workers", default="4,8", help="comma-separated worker counts M [%(default)s]")
    ap.add_argument("--shards", default="iid,noniid", help="iid, noniid or both [%(default)s]")
    ap.add_argument("--algorithms", default=ALGORITHMS, help="[%(default)s]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", default="", help="markdown file to put the table in (e.g. docs/results.md)")
    ap.add_argument("--json", default="", help="also write every cell's summary to this JSON file")
    args = ap.parse_args()

    console = Console()
    started, rows, cells = time.time(), [], {}
    with tempfile.TemporaryDirectory() as out:
        for task in args.tasks.split(","):
            for workers in (int(m) for m in args.workers.split(",")):
                for shards in args.shards.split(","):
                    t0 = time.time()
                    summary = run_cell(task, workers, shards, args.algorithms, out, args.seed)
                    cells[f"{task}/{workers}/{shards}"] = summary
                    new = rows_of(task, workers, shards, summary)
                    rows += new
                    console.print(f"[bold]{task}[/] M={workers} {shards}: {time.time() - t0:.0f} s", highlight=False)
                    for r in new:
                        console.print("  " + "  ".join(f"{c:>12}" for c in r[3:]), highlight=False)
    elapsed = time.time() - started
    context = (f"{datetime.date.today()} · {platform.machine()}, {os.cpu_count()} cores · "
               f"`python scripts/bench_learning.py` · {elapsed / 60:.1f} min")
    text = markdown(rows, context)
    print(text, flush=True)  # as is: markdown must not be wrapped
    if args.write:
        write_section(Path(args.write), text)
        console.print(f"wrote {args.write}")
    if args.json:
        Path(args.json).write_text(json.dumps(cells, indent=1) + "\n")


if __name__ == "__main__":
    main()
