"""Metric sinks: where a run's records go, one flat dict at a time.

    sinks = open_sinks("jsonl:metrics.jsonl,tensorboard:tb")   # the value of --log-to; "" opens none
    sinks.write({"step": 20, "loss": 2.31})
    sinks.close()

A spec is comma-separated ``KIND:ARG`` items (a bare ``KIND`` is ``KIND:``);
`SINKS` maps each kind to the class that takes ARG:

- ``jsonl:PATH`` appends one JSON object per line to PATH (made if missing),
  flushed after every line, so a reader tailing the file, or a process killed
  with SIGKILL, loses no complete record. Non-finite floats are written as
  null (JSON has no NaN).
- ``tensorboard:DIR`` writes the numbers of each record as TensorBoard
  scalars in DIR (``tensorboard --logdir DIR``), flushed after every record.
  Needs ``pip install 'lowcomm[tensorboard]'``.
- ``wandb:PROJECT`` (``wandb`` alone: project ``lowcomm``) logs them to a
  Weights & Biases run, offline (under ``$WANDB_DIR/wandb/``, by default
  ``./wandb/``; upload later with ``wandb sync``) unless the environment sets
  ``WANDB_MODE`` (e.g. ``online``), W&B's own switch. Needs
  ``pip install 'lowcomm[wandb]'``.

TensorBoard and W&B take each record at its ``step`` (the x-axis; 0 if the
record has none), with every number (ints and floats, NaN included; not
bools) under the name `TAGS` gives it:

| record key | tag | what |
|---|---|---|
| ``loss`` | ``train/loss`` | loss of the last training batch |
| ``tokens_per_s`` | ``train/tokens_per_s`` | training tokens per second |
| ``eval_loss`` | ``eval/loss`` | held-out loss |
| ``bytes_sent``, ``bytes_received`` | ``net/bytes_sent``, ``net/bytes_received`` | wire bytes so far |
| ``round`` | ``swarm/round`` | outer round |
| ``participants`` | ``swarm/participants`` | members of the last round's group |
| ``members``, ``excluded`` | ``swarm/members``, ``swarm/excluded`` | peers in the swarm, peers left out as outliers |
| ``t`` | ``time/t`` | seconds since training started (simulate: virtual) |
| ``round_s``, ``compute_s``, ``wait_s`` | ``time/round_s``, ``time/compute_s``, ``time/wait_s`` | seconds |
| any other number ``KEY`` | ``other/KEY`` | |

Strings are not written, with one use: a record's ``algorithm`` (simulate's
records carry one) names a run of its own, so that the algorithms' curves
lie side by side under the same tags: TensorBoard writes it to
``DIR/<algorithm>/``, W&B to a run named after it (the runs of one sink share
a group). An event record (one with an ``event`` key, e.g. join's start and
stop) gives only its ``eval/`` tags: its counters repeat the rounds'.

Another sink is a class with ``write`` and ``close`` added to `SINKS`; every
command that takes a spec then offers it.
"""

from __future__ import annotations

import json
import math
import os
import time
from numbers import Real
from typing import Any, Callable, Protocol

from lowcomm.config import ConfigError


class MetricSink(Protocol):
    def write(self, record: dict[str, Any]) -> None:
        """Record one dict of metrics (names to numbers, strings or None)."""

    def close(self) -> None:
        """Flush and release what the sink holds; ``write`` is not called after."""


class JsonlSink:
    """One JSON object per line, appended to ``path`` and flushed at once."""

    def __init__(self, path: str):
        if not path:
            raise ValueError("needs a file: jsonl:PATH")
        try:
            self._file = open(path, "a", encoding="utf-8")
        except OSError as e:
            raise ValueError(f"cannot open {path} ({e.strerror})") from None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(_finite(record), allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


#: TensorBoard and W&B names of record keys (see the module docstring); a number
#: under another key goes to ``other/KEY``, ``step`` is the x-axis.
TAGS = {"loss": "train/loss", "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss",
        "bytes_sent": "net/bytes_sent", "bytes_received": "net/bytes_received", "round": "swarm/round",
        "participants": "swarm/participants", "members": "swarm/members", "excluded": "swarm/excluded",
        "t": "time/t", "round_s": "time/round_s", "compute_s": "time/compute_s", "wait_s": "time/wait_s"}

#: The record key whose value names a run of its own (simulate's algorithms).
RUN_KEY = "algorithm"


def scalars(record: dict[str, Any]) -> tuple[str, int, dict[str, float]]:
    """``(run, step, {tag: value})`` of a record for TensorBoard and W&B: ``run`` is
    the record's ``algorithm`` ("" if none), ``step`` its step (0 if none), and the
    tags those `TAGS` gives its numbers (of an event record: its ``eval/`` tags only)."""
    run = record.get(RUN_KEY)
    step = record.get("step")
    values = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, Real):
            continue
        tag = TAGS.get(key, f"other/{key}")
        if "event" in record and not tag.startswith("eval/"):
            continue
        values[tag] = float(value)
    return (run if isinstance(run, str) else "", int(step) if isinstance(step, Real) else 0, values)


class TensorBoardSink:
    """TensorBoard scalars in ``logdir`` (a record with an ``algorithm``: in
    ``logdir/<algorithm>``), written with torch's `SummaryWriter` and flushed
    after every record."""

    def __init__(self, logdir: str):
        if not logdir:
            raise ValueError("needs a folder: tensorboard:DIR")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("needs the tensorboard package: pip install 'lowcomm[tensorboard]'") from None
        try:
            os.makedirs(logdir, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot make folder {logdir} ({e.strerror})") from None
        self.logdir, self._make = logdir, SummaryWriter
        self._writers: dict[str, Any] = {}  # run name -> SummaryWriter, made at its first record

    def write(self, record: dict[str, Any]) -> None:
        run, step, values = scalars(record)
        if not values:
            return
        writer = self._writers.get(run)
        if writer is None:
            writer = self._writers[run] = self._make(os.path.join(self.logdir, run) if run else self.logdir)
        for tag, value in values.items():
            writer.add_scalar(tag, value, global_step=step)
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


#: W&B project of ``wandb`` with no PROJECT.
WANDB_PROJECT = "lowcomm"


class WandbSink:
    """A Weights & Biases run of ``project`` (empty: "lowcomm") per run name,
    offline unless ``WANDB_MODE`` is set. Records go in with their ``step`` as
    the x-axis metric (W&B's own step counts calls, so records whose steps are
    out of order, as simulate's evaluations after its rounds, are all kept)."""

    def __init__(self, project: str):
        try:
            import wandb
        except ImportError:
            raise ValueError("needs the wandb package: pip install 'lowcomm[wandb]'") from None
        self._wandb, self.project = wandb, project or WANDB_PROJECT
        self.group = time.strftime("lowcomm-%Y%m%d-%H%M%S")  # the algorithms of one simulate
        self._runs: dict[str, Any] = {}

    def _run(self, name: str):
        run = self._runs.get(name)
        if run is None:
            mode = None if os.environ.get("WANDB_MODE") else "offline"  # None: W&B reads WANDB_MODE
            run = self._wandb.init(project=self.project, name=name or None, group=self.group if name else None,
                                   mode=mode, reinit="create_new", settings=self._wandb.Settings(console="off"))
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
            self._runs[name] = run
        return run

    def write(self, record: dict[str, Any]) -> None:
        run, step, values = scalars(record)
        if values:
            self._run(run).log({"step": step, **values})

    def close(self) -> None:
        for run in self._runs.values():
            run.finish()


#: Sink kinds by name: a spec item ``KIND:ARG`` is ``SINKS[KIND](ARG)``, a bare
#: ``KIND`` is ``SINKS[KIND]("")`` (a sink that needs ARG says so).
SINKS: dict[str, Callable[[str], MetricSink]] = {"jsonl": JsonlSink, "tensorboard": TensorBoardSink,
                                                 "wandb": WandbSink}


class Sinks:
    """Several sinks as one (what `open_sinks` returns; none at all for an empty spec)."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def parse_sinks(spec: str, flag: str = "--log-to") -> list[tuple[str, str]]:
    """The ``(kind, arg)`` items of ``spec`` (a bare ``KIND`` gives ``(KIND, "")``);
    `ConfigError` (naming ``flag``) for an item that is not ``KIND:ARG`` or names
    no kind in `SINKS`."""
    items = []
    for item in (i.strip() for i in spec.split(",")):
        if not item:
            continue
        kind, sep, arg = item.partition(":")
        if not sep and kind not in SINKS:
            raise ConfigError(flag, f"{item!r} is not KIND:ARG; write e.g. jsonl:metrics.jsonl "
                                    f"(kinds: {', '.join(SINKS)})")
        if kind not in SINKS:
            raise ConfigError(flag, f"unknown sink kind {kind!r} in {item!r}; kinds: {', '.join(SINKS)}")
        items.append((kind, arg))
    return items


def open_sinks(spec: str, flag: str = "--log-to") -> Sinks:
    """Open every sink of ``spec`` (see the module docstring); `ConfigError` naming
    ``flag`` for a bad spec or a sink that cannot open (those opened are closed)."""
    opened: list[MetricSink] = []
    for kind, arg in parse_sinks(spec, flag):
        try:
            opened.append(SINKS[kind](arg))
        except ValueError as e:
            Sinks(opened).close()
            raise ConfigError(flag, f"{kind}: {e}") from None
    return Sinks(opened)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (in dicts and lists too) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
