"""Metric sinks: where a run's records go, one flat dict at a time.

    sinks = open_sinks("jsonl:metrics.jsonl")     # the value of --log-to; "" opens none
    sinks.write({"step": 20, "loss": 2.31})
    sinks.close()

A spec is comma-separated ``KIND:ARG`` items; `SINKS` maps each kind to the
class that takes ARG. Today there is one kind:

- ``jsonl:PATH`` appends one JSON object per line to PATH (made if missing),
  flushed after every line, so a reader tailing the file, or a process killed
  with SIGKILL, loses no complete record. Non-finite floats are written as
  null (JSON has no NaN).

Another sink (TensorBoard, W&B) is a class with ``write`` and ``close`` added
to `SINKS`; every command that takes a spec then offers it.
"""

from __future__ import annotations

import json
import math
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


#: Sink kinds by name: a spec item ``KIND:ARG`` is ``SINKS[KIND](ARG)``.
SINKS: dict[str, Callable[[str], MetricSink]] = {"jsonl": JsonlSink}


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
    """The ``(kind, arg)`` items of ``spec``; `ConfigError` (naming ``flag``) for
    an item that is not ``KIND:ARG`` or names no kind in `SINKS`."""
    items = []
    for item in (i.strip() for i in spec.split(",")):
        if not item:
            continue
        kind, sep, arg = item.partition(":")
        if not sep:
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
