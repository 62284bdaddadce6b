"""Configuration dataclasses with documented fields, and the merge rule.

Precedence is explicit: command-line flag > config file (TOML) > default.
Every value that differs from its default is reported once, with where it
came from. The CLI builds its options from these fields (`lowcomm.cli`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ConfigError(ValueError):
    """A setting is invalid; ``flag`` names the option to change."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def opt(default: Any, help: str, **kw) -> Any:
    """A dataclass field with its CLI help text."""
    return field(default=default, metadata={"help": help, **kw})


ALGORITHMS = ("ddp", "diloco", "streaming", "noloco")


@dataclass
class SimulateConfig:
    """Settings of `lowcomm simulate` (see each field's help)."""

    workers: int = opt(4, "Number of simulated workers.")
    algorithms: str = opt("ddp,diloco,streaming,noloco", "Comma-separated algorithms to compare: "
                          "ddp, diloco, streaming, noloco.")
    steps: int = opt(400, "Inner steps per worker (every algorithm sees the same tokens).")
    tokens: int = opt(0, "Total training tokens over all workers; if set, overrides --steps.")
    lr: float = opt(0.0, "Inner AdamW learning rate (0: the task's default).")
    batch_size: int = opt(0, "Sequences per worker per step (0: the task's default; tinylm 16).")
    schedule: str = opt("constant", "Inner learning-rate schedule, the same for every algorithm: constant, or "
                        "cosine (5% linear warm-up, then cosine decay to 10%).")
    outer_lr: float = opt(0.0, "Outer learning rate (0: the algorithm's default, 0.7).")
    outer_momentum: float = opt(-1.0, "Outer momentum (-1: the algorithm's default, diloco 0.9, noloco 0.5).")
    sync_every: int = opt(0, "H, inner steps between outer syncs (0: per algorithm, diloco/streaming 100, noloco 50).")
    fragments: int = opt(2, "Streaming DiLoCo: parameter fragments P (H must be divisible by P).")
    delay: int = opt(5, "Streaming DiLoCo: tau, steps of compute that overlap a fragment's exchange (< H/P).")
    alpha: float = opt(0.5, "Streaming DiLoCo: weight of the local weights when a fragment's mean arrives.")
    compressor: str = opt("", "Codec for the outer algorithms' traffic (empty: none for diloco/noloco, fp4 for "
                          "streaming; DDP always sends fp32).")
    error_feedback: bool = opt(False, "Keep compression residuals (error feedback) in the outer algorithms.")
    group_size: int = opt(0, "Group size for partial averaging (0: everyone; NoLoCo defaults to 2).")
    bandwidth: str = opt("100Mbit", "Per-worker link bandwidth each way, e.g. 100Mbit, 1Gbit, 12.5MB/s.")
    latency: str = opt("50ms", "Latency per message hop, e.g. 50ms.")
    step_time: str = opt("auto", "Compute time of one inner step, e.g. 200ms; 'auto' measures it here on one core.")
    eval_every: int = opt(50, "Inner steps between evaluations of the held-out loss.")
    seed: int = opt(0, "Seed for weights, data order and group draws.")
    task: str = opt("tinylm", "Task: tinylm or module:function returning a lowcomm.tasks.Task.")
    data: str = opt("", "Folder of text files for tinylm (empty: the Python standard library's sources).")
    name: str = opt("", "Run name; results go to <out>/<name> (empty: simulate-<seed>).")
    out: str = opt("runs", "Folder for run outputs.")
    progress: bool = opt(True, "Show a progress bar.")

    def algorithm_list(self) -> list[str]:
        algs = [a.strip() for a in self.algorithms.split(",") if a.strip()]
        for a in algs:
            if a not in ALGORITHMS:
                raise ConfigError("--algorithms", f"unknown algorithm {a!r}; choose from {', '.join(ALGORITHMS)}")
        if not algs:
            raise ConfigError("--algorithms", "name at least one algorithm")
        return algs


@dataclass
class PlanConfig:
    """Settings of `lowcomm plan` (no training; see each field's help)."""

    params: str = opt("100M", "Model parameter count, e.g. 125M, 1.3B, 350000.")
    step_time: str = opt("1s", "Compute time of one inner step on one worker, e.g. 800ms.")
    workers: int = opt(4, "Number of workers.")
    bandwidth: str = opt("100Mbit", "Per-worker link bandwidth each way, e.g. 100Mbit, 1Gbit.")
    latency: str = opt("50ms", "Latency per message hop.")
    algorithms: str = opt("ddp,diloco,streaming,noloco", "Comma-separated algorithms.")
    sync_every: int = opt(0, "H (0: diloco/streaming 100, noloco 50).")
    fragments: int = opt(2, "Streaming DiLoCo fragments P.")
    delay: int = opt(5, "Streaming DiLoCo overlap tau, in steps.")
    compressor: str = opt("", "Codec of the outer algorithms (empty: none, fp4 for streaming).")
    group_size: int = opt(0, "Group size (0: everyone; NoLoCo defaults to 2).")
    steps: int = opt(0, "Horizon in inner steps (0: 20 sync periods).")

    def algorithm_list(self) -> list[str]:
        return SimulateConfig(algorithms=self.algorithms).algorithm_list()


@dataclass
class JoinConfig:
    """Settings of `lowcomm join` (see each field's help)."""

    peers: str = opt("", "Multiaddrs of peers already in the swarm, comma- or space-separated "
                     "(empty: start a new swarm and print the line others should run).")
    run_id: str = opt("lowcomm", "Name of the training run; nodes of other runs are refused.")
    task: str = opt("tinylm", "Task: tinylm or module:function returning a lowcomm.tasks.Task.")
    data: str = opt("", "Folder of text files for tinylm (empty: the Python standard library's sources).")
    algorithm: str = opt("diloco", "Outer algorithm: diloco, streaming or noloco.")
    compressor: str = opt("", "Codec for outer traffic (empty: none; fp4 for streaming).")
    error_feedback: bool = opt(False, "Keep compression residuals (error feedback).")
    sync_every: int = opt(0, "H, inner steps between outer syncs (0: diloco/streaming 100, noloco 50).")
    fragments: int = opt(2, "Streaming DiLoCo fragments P.")
    delay: int = opt(5, "Streaming DiLoCo overlap tau, in steps.")
    alpha: float = opt(0.5, "Streaming DiLoCo merge weight of local weights.")
    group_size: int = opt(0, "Group size (0: everyone; NoLoCo defaults to 2).")
    lr: float = opt(0.0, "Inner learning rate (0: the task's default).")
    batch_size: int = opt(0, "Sequences per step (0: the task's default).")
    seed: int = opt(0, "Seed of the initial weights (the same on every node) and of this node's data order.")
    backend: str = opt("hivemind", "Network backend: hivemind (go-libp2p daemon) or libp2p (py-libp2p, pure "
                       "Python). Every node of a swarm uses the same one.")
    listen: str = opt("/ip4/127.0.0.1/tcp/0", "Multiaddr to listen on; /ip4/0.0.0.0/tcp/PORT to accept other "
                      "machines (open that port).")
    announce: str = opt("", "Multiaddr to tell peers, if they must dial another address (NAT, port forwarding).")
    identity: str = opt("", "Private key file that fixes this node's peer id (default: <checkpoint-dir>/identity.key).")
    checkpoint_dir: str = opt("checkpoints", "Folder for this node's checkpoints.")
    checkpoint_every: int = opt(10, "Outer rounds between checkpoints (and one on exit).")
    max_steps: int = opt(0, "Stop after this many inner steps (0: run until stopped).")
    window: float = opt(5.0, "Seconds a round waits for missing peers.")
    secret_file: str = opt("", "File whose bytes (16 or more) are the swarm's shared secret, e.g. from "
                           "`head -c 32 /dev/urandom > swarm.secret`: every message is authenticated with it, "
                           "so nodes without it can neither join nor download the model. Copy it to every node.")
    allow: str = opt("", "Peer ids allowed in the swarm, comma- or space-separated (empty: any peer); "
                     "requests from other peers are refused. A node's peer id is printed when it starts.")

    def peer_list(self) -> list[str]:
        return _words(self.peers)

    def allow_list(self) -> list[str] | None:
        return _words(self.allow) or None


def _words(text: str) -> list[str]:
    """The comma- or space-separated items of a flag's value."""
    return text.replace(",", " ").split()


def parse_count(flag: str, text: str) -> int:
    """``"125M"`` -> 125000000 (suffixes K, M, B or G)."""
    t = str(text).strip().upper()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale != 1 else t) * scale
    except ValueError:
        raise ConfigError(flag, f"could not read {text!r}; write e.g. 125M, 1.3B or 350000") from None
    if value < 1:
        raise ConfigError(flag, f"must be at least 1, got {text!r}")
    return int(value)


def load_toml(path: str | Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", f"no such file: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None


def merge(cls, file_values: dict, flag_values: dict) -> tuple[Any, list[str]]:
    """Build ``cls`` from defaults, then the config file, then flags (None = not
    given). Returns the config and one line per value that is not the default."""
    known = {f.name: f for f in fields(cls)}
    values, notes = {}, []
    for source, given in (("config file", file_values), ("flag", flag_values)):
        for k, v in given.items():
            key = k.replace("-", "_")
            if key not in known:
                raise ConfigError("--config", f"unknown setting {k!r}; known: {', '.join(sorted(known))}")
            if v is None:
                continue
            expected = type(known[key].default)
            if expected is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            if not isinstance(v, expected) or (expected is int and isinstance(v, bool)):
                raise ConfigError(f"--{key.replace('_', '-')}", f"expected {expected.__name__}, got {v!r}")
            values[key] = (v, source)
    config = cls(**{k: v for k, (v, _) in values.items()})
    for k, (v, source) in values.items():
        if v != known[k].default:
            notes.append(f"{k} = {v!r} (from {source})")
    return config, notes


def as_dict(config) -> dict:
    return dataclasses.asdict(config)
