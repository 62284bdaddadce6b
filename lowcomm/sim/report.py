"""Writing a simulation's results: metrics.jsonl, summary.json, summary.md, loss.png."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

#: Fields that depend on the measured step time (differ between runs when
#: ``--step-time auto``); everything else is identical for the same command.
MEASURED_FIELDS = ("virtual_time_s", "compute_utilization", "predicted_wall_clock_s", "stall_s",
                   "bandwidth_for_95pct_bps", "step_time_s", "backward_share", "eval_loss_at_ddp_wall_clock",
                   "ddp_eval_loss_at_this_wall_clock")


def _clean(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def write_metrics(path: Path, runs: list) -> None:
    with open(path, "w") as f:
        for run in runs:
            for r in run.records:
                f.write(json.dumps({k: _clean(v) for k, v in asdict(r).items()}) + "\n")


def summarize(runs: list, plan_bandwidth: dict) -> dict:
    """One entry per algorithm (see `MEASURED_FIELDS` for the time-dependent keys)."""
    ddp = next((r for r in runs if r.settings.algorithm == "ddp"), None)
    ddp_bytes = ddp.records[-1].bytes_sent_per_worker if ddp else None
    ddp_loss = ddp.records[-1].eval_loss if ddp else None
    ddp_time = ddp.records[-1].virtual_time_s if ddp else None
    out = {}
    for run in runs:
        last = run.records[-1]
        s = run.settings
        out[s.algorithm] = {
            "final_eval_loss": last.eval_loss,
            "eval_loss_ratio_vs_ddp": last.eval_loss / ddp_loss if ddp_loss else None,
            "eval_loss_rise_last_half": rise_last_half(run.records),
            "eval_loss_at_ddp_wall_clock": loss_at_time(run.records, ddp_time) if ddp_time else None,
            "ddp_eval_loss_at_this_wall_clock": loss_at_time(ddp.records, last.virtual_time_s) if ddp else None,
            "bytes_sent_per_worker": last.bytes_sent_per_worker,
            "bytes_sent_per_rank": run.bytes_sent_per_rank,
            "ranks_per_worker": len(run.bytes_sent_per_rank),
            "bytes_ratio_vs_ddp": (ddp_bytes / last.bytes_sent_per_worker
                                   if ddp_bytes and last.bytes_sent_per_worker else None),
            "predicted_wall_clock_s": last.virtual_time_s,
            "compute_utilization": last.compute_utilization,
            "bytes_received_per_worker": last.bytes_received_per_worker,
            "peak_exchange_bytes": max(c.peak_exchange_bytes for c in run.clocks),
            "bandwidth_for_95pct_bps": plan_bandwidth.get(s.algorithm),
            "stall_s": max(c.stall for c in run.clocks),
            "outer_rounds": last.outer_rounds,
            "tokens": last.tokens,
            "params": run.params,
            "settings": {"algorithm": s.algorithm, "sync_every": s.sync_every, **s.options},
        }
    return out


def rise_last_half(records: list) -> float:
    """Final eval loss minus the eval loss at the evaluation nearest half the run's
    steps (positive: the loss rose over the last half)."""
    half = records[-1].step / 2
    mid = min(records, key=lambda r: (abs(r.step - half), r.step))
    return records[-1].eval_loss - mid.eval_loss


def loss_at_time(records: list, seconds: float) -> float:
    """Eval loss of the last evaluation reached within ``seconds`` of predicted
    wall clock (a run that ends sooner: its final loss; it trains no further)."""
    reached = [r for r in records if r.virtual_time_s <= seconds * (1 + 1e-9)]
    return reached[-1].eval_loss if reached else records[0].eval_loss


def format_bytes(n: float) -> str:
    """``1234567`` -> ``'1.23 MB'``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def table_rows(summary: dict) -> list[list[str]]:
    rows = []
    for alg, s in summary.items():
        ratio = s["bytes_ratio_vs_ddp"]
        loss_ratio = s["eval_loss_ratio_vs_ddp"]
        rows.append([alg, f"{s['final_eval_loss']:.4f}", f"{loss_ratio:.3f}" if loss_ratio else "-", format_bytes(s["bytes_sent_per_worker"]),
                     f"{ratio:.1f}x" if ratio else "-", f"{s['predicted_wall_clock_s']:.1f} s",
                     f"{s['compute_utilization']:.3f}"])
    return rows


HEADER = ["algorithm", "final eval loss", "loss / DDP's", "bytes sent / worker", "DDP bytes / these", "predicted wall clock",
          "compute utilisation"]


def write_markdown(path: Path, summary: dict, context: list[str]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(summary)]
    text = "\n".join(context + [""] + lines) + "\n"
    path.write_text(text)
    return text


def plot(path: Path, runs: list) -> None:
    """Eval loss against tokens, bytes sent (log scale) and predicted wall clock, one line per algorithm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.2))
    for run in runs:
        alg = run.settings.algorithm
        tokens = [r.tokens for r in run.records]
        loss = [r.eval_loss for r in run.records]
        ax1.plot(tokens, loss, marker="o", ms=3, label=alg)
        pts = [(r.bytes_sent_per_worker, r.eval_loss) for r in run.records if r.bytes_sent_per_worker > 0]
        if pts:
            ax2.plot(*zip(*pts), marker="o", ms=3, label=alg)
        ax3.plot([r.virtual_time_s for r in run.records], loss, marker="o", ms=3, label=alg)
    ax1.set(xlabel="training tokens (all workers)", ylabel="eval loss", title="loss vs tokens")
    ax2.set(xlabel="bytes sent per worker", ylabel="eval loss", title="loss vs bytes sent", xscale="log")
    ax3.set(xlabel="predicted wall clock (s)", ylabel="eval loss", title="loss vs predicted wall clock")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
