"""`lowcomm simulate`: compare algorithms on one machine with a network model.

    lowcomm simulate                                   # tinylm, 4 workers, 5 algorithms
    lowcomm simulate --workers 16 --bandwidth 100Mbit --algorithms diloco,streaming

Writes ``<out>/<name>/`` with config.json, metrics.jsonl, summary.json,
summary.md and loss.png. ``--log-to`` (`lowcomm.metrics`: jsonl, tensorboard,
wandb) gets worker 0's `lowcomm.sim.runner.round_record` after each of its
rounds and, after each algorithm, one ``eval`` event per evaluation
(`eval_records`); every record names its algorithm, so TensorBoard and W&B
keep one run per algorithm:

    lowcomm simulate --algorithms ddp,diloco --log-to tensorboard:tb && tensorboard --logdir tb
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lowcomm.config import ConfigError, SimulateConfig, check_aggregator
from lowcomm.metrics import open_sinks, parse_sinks
from lowcomm.sim import plan, report
from lowcomm.sim.network import TCP_EFFICIENCY, Network, NetworkSpecError, parse_bandwidth, parse_duration
from lowcomm.sim.overlap import DEFAULT_BACKWARD_SHARE, BackwardShareError, parse_backward_share
from lowcomm.optimizers.registry import get_algorithm, settings_for
from lowcomm.sim.runner import AlgorithmRun, measure_step_time, run_algorithm
from lowcomm.tasks.base import TaskError, check_shards, load_task


def validate(cfg: SimulateConfig) -> None:
    for flag, value, lo in (("--workers", cfg.workers, 1), ("--ranks-per-worker", cfg.ranks_per_worker, 1),
                            ("--steps", cfg.steps, 1), ("--eval-every", cfg.eval_every, 1),
                            ("--tokens", cfg.tokens, 0), ("--batch-size", cfg.batch_size, 0)):
        if value < lo:
            raise ConfigError(flag, f"must be >= {lo}, got {value}")
    if cfg.schedule not in ("cosine", "constant"):
        raise ConfigError("--schedule", f"must be cosine or constant, got {cfg.schedule!r}")
    try:
        check_shards(cfg.shards)
    except TaskError as e:
        raise ConfigError("--shards", str(e)) from None
    if cfg.lr < 0:
        raise ConfigError("--lr", f"must be positive (or 0 for the task default), got {cfg.lr}")
    if not 0 <= cfg.step_time_jitter <= 10:
        raise ConfigError("--step-time-jitter", f"must be a coefficient of variation in [0, 10] (e.g. 0.3), "
                                                f"got {cfg.step_time_jitter}")
    cfg.check_outer()
    check_aggregator(cfg.aggregator)
    cfg.algorithm_list()
    backward_share_given(cfg.backward_share)
    parse_sinks(cfg.log_to, "--log-to")


def backward_share_given(text: str) -> float | None:
    """``--backward-share`` as a number, or None for 'auto'."""
    try:
        return parse_backward_share(text)
    except BackwardShareError as e:
        raise ConfigError("--backward-share", str(e)) from None


def note_ignored(spec, given: dict, console: Console) -> None:
    """One line naming the flags ``spec``'s algorithm does not take (one command
    may compare algorithms that take different flags)."""
    ignored = spec.ignored(given)
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        console.print(f"[dim]{spec.name} does not take {flags}: not applied to it[/]", highlight=False)


def network_of(cfg: SimulateConfig) -> Network:
    try:
        bandwidth = parse_bandwidth(cfg.bandwidth)
    except NetworkSpecError as e:
        raise ConfigError("--bandwidth", str(e)) from None
    try:
        latency = parse_duration(cfg.latency)
    except NetworkSpecError as e:
        raise ConfigError("--latency", str(e)) from None
    return Network(bandwidth, latency, TCP_EFFICIENCY)


def step_time_of(cfg: SimulateConfig, task, lr: float) -> tuple[float, bool, float, bool]:
    """(seconds per inner step, whether they were measured, the backward pass's
    share of them, whether it was measured). With ``--step-time auto`` both are
    measured (the share unless given); with a step time given, the share is
    the one given or `DEFAULT_BACKWARD_SHARE`."""
    share = backward_share_given(cfg.backward_share)
    if cfg.step_time == "auto":
        seconds, measured_share = measure_step_time(task, cfg.seed, lr)
        return seconds, True, measured_share if share is None else share, share is None
    try:
        value = parse_duration(cfg.step_time)
    except NetworkSpecError as e:
        raise ConfigError("--step-time", f"{e}; or 'auto'") from None
    if value <= 0:
        raise ConfigError("--step-time", "must be positive")
    return value, False, DEFAULT_BACKWARD_SHARE if share is None else share, False


def eval_records(run: AlgorithmRun) -> list[dict]:
    """The ``--log-to`` records of ``run``'s evaluations: ``event`` "eval",
    ``algorithm``, ``step``, ``tokens`` (all workers) and ``eval_loss`` (the mean
    over workers, as metrics.jsonl)."""
    return [{"event": "eval", "algorithm": r.algorithm, "step": r.step, "tokens": r.tokens, "eval_loss": r.eval_loss}
            for r in run.records]


def simulate(cfg: SimulateConfig, console: Console | None = None) -> Path:
    """Run every algorithm of ``cfg``; returns the run folder."""
    console = console or Console()
    validate(cfg)
    network = network_of(cfg)
    try:
        options = {"data": cfg.data} if cfg.data else {}
        if cfg.shards != "iid":
            options["shards"] = cfg.shards
        if cfg.batch_size:
            options["batch_size"] = cfg.batch_size
        task = load_task(cfg.task, **options)
    except TaskError as e:
        raise ConfigError("--data" if cfg.data and "--data" in str(e) else "--task", str(e)) from None
    lr = cfg.lr or task.default_lr
    steps = cfg.steps
    if cfg.tokens:
        steps = max(1, cfg.tokens // (cfg.workers * cfg.ranks_per_worker * task.tokens_per_batch))
    algorithms = cfg.algorithm_list()
    for a in algorithms:
        note_ignored(get_algorithm(a), cfg.outer_options(), console)
    settings = [settings_for(a, cfg.outer_options()) for a in algorithms]

    metrics = open_sinks(cfg.log_to, "--log-to")  # closed in the finally below, whatever fails
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        step_time, measured, backward_share, share_measured = step_time_of(cfg, task, lr)
        run_dir = Path(cfg.out) / (cfg.name or f"simulate-{cfg.seed}")
        run_dir.mkdir(parents=True, exist_ok=True)
        jitter = f" (jitter {cfg.step_time_jitter:.0%})" if cfg.step_time_jitter else ""
        step_note = (f"step time {step_time * 1e3:.1f} ms{' (measured)' if measured else ''}{jitter}, "
                     f"backward {backward_share:.0%} of it{' (measured)' if share_measured else ''}")
        ranks = f" of {cfg.ranks_per_worker} ranks" if cfg.ranks_per_worker > 1 else ""
        console.print(f"[bold]lowcomm simulate[/]: task {task.name}, {cfg.workers} workers{ranks}, {steps} steps each, "
                      f"{cfg.bandwidth} / {cfg.latency} links, {step_note} -> {run_dir}")
        runs, started = [], time.time()
        with Progress(TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, disable=not cfg.progress) as bar:
            for s in settings:
                job = bar.add_task(s.algorithm, total=steps * cfg.workers)
                runs.append(run_algorithm(cfg, task, s, steps, step_time, network,
                                          on_step=lambda k, job=job: bar.advance(job, k),
                                          on_round=lambda line: bar.console.print(line),
                                          backward_share=backward_share, on_record=metrics.write))
                for record in eval_records(runs[-1]):
                    metrics.write(record)
    finally:
        torch.set_num_threads(threads)
        metrics.close()

    bandwidth_95 = {}
    for run in runs:
        s = run.settings
        sched = get_algorithm(s.algorithm).schedule(s, run.params, cfg.workers, run.fragment_numels or None)
        bandwidth_95[s.algorithm] = plan.bandwidth_for(sched, step_time, network.latency, steps,
                                                       backward_share=backward_share, param_numels=run.param_numels)
    summary = report.summarize(runs, bandwidth_95)
    config = {"simulate": asdict(cfg), "steps": steps, "step_time_s": step_time, "step_time_measured": measured,
              "backward_share": backward_share, "backward_share_measured": share_measured,
              "bandwidth_bps": network.bandwidth, "latency_s": network.latency, "task": task.name,
              "measured_time_fields": list(report.MEASURED_FIELDS)}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    report.write_metrics(run_dir / "metrics.jsonl", runs)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    context = [f"# lowcomm simulate: {run_dir.name}", "",
               f"{datetime.date.today()} · {platform.machine()} · torch {torch.__version__} · task {task.name} · "
               f"{cfg.workers} workers · {steps} steps each · {cfg.bandwidth}, {cfg.latency} · "
               f"{step_note} · {time.time() - started:.0f} s to run"]
    report.write_markdown(run_dir / "summary.md", summary, context)
    report.plot(run_dir / "loss.png", runs)

    table = Table(*report.HEADER, title=f"{task.name}: {cfg.workers} workers, {cfg.bandwidth}, {cfg.latency}")
    for row in report.table_rows(summary):
        table.add_row(*row)
    console.print(table)
    console.print(f"wrote {run_dir}/: config.json metrics.jsonl summary.json summary.md loss.png")
    return run_dir
