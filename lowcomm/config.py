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


@dataclass
class OuterConfig:
    """Settings of the outer algorithms, shared by `simulate`, `plan` and `join`.
    A zero (or -1, or empty) value means the algorithm's own default, from
    `lowcomm.optimizers.registry` (the optimizer classes' constructors)."""

    sync_every: int = opt(0, "H, inner steps between outer syncs of a fragment (0: the algorithm's default, 20).")
    outer_lr: float = opt(0.0, "Outer learning rate of diloco, streaming, noloco and sparseloco (0: the "
                          "algorithm's default: 0.7; sparseloco 2.0).")
    outer_momentum: float = opt(-1.0, "Outer (Nesterov) momentum of diloco, streaming and noloco (-1: the default, "
                                "0.5; sparseloco has none).")
    compressor: str = opt("", "Codec on the wire for diloco, streaming, noloco and dgc (empty: the algorithm's "
                          "default: none for diloco/noloco, fp4 for streaming, topk for dgc). ddp always sends "
                          "fp32, sparseloco always top-k with 2-bit values.")
    error_feedback: bool = opt(False, "Keep compression residuals (error feedback) in diloco, streaming and noloco "
                               "(sparseloco and dgc always do).")
    group_size: int = opt(0, "Group size for partial averaging (0: the algorithm's default: everyone; noloco 2).")
    fragments: int = opt(0, "Streaming DiLoCo: parameter fragments P (0: the largest P <= 4 dividing H).")
    delay: int = opt(-1, "Streaming DiLoCo: tau, steps of compute that overlap a fragment's exchange, < H/P "
                     "(-1: the default, 1).")
    alpha: float = opt(-1.0, "Streaming DiLoCo: weight of the local weights when a fragment's mean arrives "
                       "(-1: the default, 0).")

    def outer_options(self) -> dict[str, Any]:
        """The outer settings given, as constructor arguments (None: the algorithm's default)."""
        return {"sync_every": self.sync_every or None, "outer_lr": self.outer_lr or None,
                "outer_momentum": None if self.outer_momentum < 0 else self.outer_momentum,
                "compressor": self.compressor or None, "error_feedback": self.error_feedback or None,
                "group_size": self.group_size or None, "fragments": self.fragments or None,
                "delay": None if self.delay < 0 else self.delay, "alpha": None if self.alpha < 0 else self.alpha}

    def check_taken(self, algorithm: str) -> None:
        """A `ConfigError` for a flag set here that ``algorithm`` does not take
        (for commands that run one algorithm: a flag must not be silently ignored)."""
        from lowcomm.optimizers.registry import get_algorithm

        ignored = get_algorithm(algorithm).ignored(self.outer_options())
        if ignored:
            flag = "--" + ignored[0].replace("_", "-")
            raise ConfigError(flag, f"{algorithm} does not take it; leave it unset (see `{algorithm}` in "
                                    "lowcomm.optimizers.registry for what it takes)")

    def check_outer(self) -> None:
        """Range checks of the outer settings (each algorithm's constructor checks the rest)."""
        for flag, value, lo in (("--sync-every", self.sync_every, 0), ("--group-size", self.group_size, 0),
                                ("--fragments", self.fragments, 0), ("--delay", self.delay, -1)):
            if value < lo:
                raise ConfigError(flag, f"must be >= {lo}, got {value}")
        if self.group_size == 1:
            raise ConfigError("--group-size", "must be 0 (the algorithm's default) or >= 2")
        if self.alpha != -1.0 and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("--alpha", f"must be in [0, 1] (or -1 for the default), got {self.alpha}")
        if self.outer_lr < 0:
            raise ConfigError("--outer-lr", f"must be positive (or 0 for the default), got {self.outer_lr}")
        if self.outer_momentum >= 1 or (self.outer_momentum < 0 and self.outer_momentum != -1.0):
            raise ConfigError("--outer-momentum", f"must be in [0, 1) (or -1 for the default), got {self.outer_momentum}")
        if self.compressor:
            from lowcomm.compressors import codec_names
            if self.compressor not in codec_names():
                raise ConfigError("--compressor", f"unknown codec {self.compressor!r}; choose from "
                                                  f"{', '.join(codec_names())}")


AGGREGATOR_HELP = ("How each group combines its members' contributions, the same on every member: mean, or a "
                   "robust rule against hostile peers: trimmed_mean, median, centered_clip, each optionally after "
                   "norm_clip (e.g. norm_clip+trimmed_mean). Claimed weights are capped at 2x the group median.")


def check_aggregator(spec: str) -> None:
    from lowcomm.averaging.reduce import get_reducer

    try:
        get_reducer(spec)
    except ValueError as e:
        raise ConfigError("--aggregator", str(e)) from None


def algorithm_names(text: str) -> list[str]:
    """The algorithms of a comma-separated ``--algorithms`` value, checked against the registry."""
    from lowcomm.optimizers.registry import ALGORITHMS

    algs = [a.strip() for a in text.split(",") if a.strip()]
    for a in algs:
        if a not in ALGORITHMS:
            raise ConfigError("--algorithms", f"unknown algorithm {a!r}; choose from {', '.join(ALGORITHMS)}")
    if not algs:
        raise ConfigError("--algorithms", "name at least one algorithm")
    return algs


@dataclass
class SimulateConfig(OuterConfig):
    """Settings of `lowcomm simulate` (see each field's help)."""

    workers: int = opt(4, "Number of simulated workers.")
    ranks_per_worker: int = opt(1, "G, processes (GPUs) of each worker, as lowcomm join --nproc-per-node G: a "
                                "worker trains on G micro-batches of --batch-size per step (one model, G times the "
                                "batch), takes --step-time per step (ranks compute in parallel), and each rank "
                                "sends its 1/G slice of every outer exchange, all G over the worker machine's one "
                                "--bandwidth link; traffic inside the worker is not modelled (lowcomm.sim.ranks).")
    algorithms: str = opt("ddp,diloco,streaming,noloco,sparseloco", "Comma-separated algorithms to compare: "
                          "ddp, dgc, diloco, streaming, noloco, sparseloco.")
    steps: int = opt(420, "Inner steps per worker (every algorithm sees the same tokens; the default gives every "
                     "algorithm 20 completed outer rounds per fragment at H = 20).")
    tokens: int = opt(0, "Total training tokens over all workers; if set, overrides --steps.")
    lr: float = opt(0.0, "Inner AdamW learning rate (0: the task's default).")
    batch_size: int = opt(0, "Examples (tinylm: sequences) per worker per step (0: the task's default: tinylm 16, "
                          "codeclass 32, terrain 64).")
    schedule: str = opt("cosine", "Inner learning-rate schedule, the same for every algorithm: cosine (5% linear "
                        "warm-up, then cosine decay to 10%), or constant.")
    shards: str = opt("iid", "How the task's data is split over workers: iid (every worker samples the whole "
                      "training set) or noniid (each worker a part of its own; the task's docstring says which).")
    aggregator: str = opt("mean", AGGREGATOR_HELP)
    bandwidth: str = opt("100Mbit", "Per-worker link bandwidth each way, e.g. 100Mbit, 1Gbit, 12.5MB/s.")
    latency: str = opt("50ms", "Latency per message hop, e.g. 50ms.")
    step_time: str = opt("auto", "Compute time of one inner step, e.g. 200ms; 'auto' measures it here on one core.")
    step_time_jitter: float = opt(0.0, "Spread of the step time: each worker's every step takes --step-time times a "
                                  "factor drawn from a lognormal of mean 1 with this coefficient of variation "
                                  "(seeded). Synchronous rounds wait for the slowest member, so jitter costs wall "
                                  "clock that a fixed step time hides; machines shared with other work, or of "
                                  "uneven speed, jitter. 0: every step takes --step-time.")
    backward_share: str = opt("auto", "Share of a step's compute that is the backward pass, during which ddp's "
                              "bucketed gradient all-reduce already runs (as torch DDP's does), in [0, 1]; 'auto' "
                              "measures it with the step time, or takes 2/3 (backward = twice forward's FLOPs) when "
                              "--step-time is given.")
    eval_every: int = opt(50, "Inner steps between evaluations of the held-out loss.")
    seed: int = opt(0, "Seed for weights, data order and group draws.")
    task: str = opt("tinylm", "Task: tinylm, codeclass, terrain, or module:function returning a lowcomm.tasks.Task.")
    data: str = opt("", "Folder of text files for tinylm (empty: the Python standard library's sources).")
    name: str = opt("", "Run name; results go to <out>/<name> (empty: simulate-<seed>).")
    out: str = opt("runs", "Folder for run outputs.")
    progress: bool = opt(True, "Show a progress bar.")
    log_to: str = opt("", "Metrics for another program, to comma-separated KIND:ARG (empty: nowhere): "
                      "jsonl:PATH appends JSON lines to PATH; tensorboard:DIR writes TensorBoard scalars, each "
                      "algorithm in DIR/<algorithm> (pip install 'lowcomm[tensorboard]'); wandb:PROJECT (bare "
                      "wandb: project lowcomm) logs to an offline Weights & Biases run per algorithm unless "
                      "WANDB_MODE says otherwise (pip install 'lowcomm[wandb]'); lowcomm.metrics has the tags. "
                      "Records: worker 0's, one per outer round (ddp, dgc: per step), with algorithm, t (virtual "
                      "seconds), step, round, participants, loss, bytes_sent, bytes_received, compute_s, wait_s; "
                      "after each algorithm, per evaluation, an 'eval' event with eval_loss, the mean over "
                      "workers (as in metrics.jsonl). PATH and DIR are relative to the working directory, not "
                      "the run folder.")

    def algorithm_list(self) -> list[str]:
        return algorithm_names(self.algorithms)


@dataclass
class PlanConfig(OuterConfig):
    """Settings of `lowcomm plan` (no training; see each field's help)."""

    params: str = opt("100M", "Model parameter count, e.g. 125M, 1.3B, 350000.")
    step_time: str = opt("1s", "Compute time of one inner step on one worker, e.g. 800ms.")
    backward_share: str = opt("auto", "Share of a step's compute that is the backward pass, during which ddp's "
                              "bucketed gradient all-reduce already runs (as torch DDP's does), in [0, 1]; 'auto': 2/3 "
                              "(backward = twice forward's FLOPs).")
    workers: int = opt(4, "Number of workers.")
    bandwidth: str = opt("100Mbit", "Per-worker link bandwidth each way, e.g. 100Mbit, 1Gbit.")
    latency: str = opt("50ms", "Latency per message hop.")
    algorithms: str = opt("ddp,diloco,streaming,noloco,sparseloco", "Comma-separated algorithms (ddp, dgc, "
                          "diloco, streaming, noloco, sparseloco).")
    steps: int = opt(0, "Horizon in inner steps (0: 20 sync periods).")

    def algorithm_list(self) -> list[str]:
        return algorithm_names(self.algorithms)


@dataclass
class JoinConfig(OuterConfig):
    """Settings of `lowcomm join` (see each field's help)."""

    peers: str = opt("", "Multiaddrs of peers already in the swarm, comma- or space-separated "
                     "(empty: start a new swarm and print the line others should run).")
    run_id: str = opt("lowcomm", "Name of the training run; nodes of other runs are refused.")
    task: str = opt("tinylm", "Task: tinylm, codeclass, terrain, or module:function returning a lowcomm.tasks.Task.")
    data: str = opt("", "Folder of text files for tinylm (empty: the Python standard library's sources).")
    algorithm: str = opt("diloco", "Outer algorithm: diloco, streaming, noloco or sparseloco.")
    aggregator: str = opt("mean", AGGREGATOR_HELP + " Members of a swarm with a robust rule leave out a peer "
                          "flagged as an outlier in 3 consecutive rounds, for 20 rounds.")
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
    wait_for: int = opt(0, "Before the first step, wait until this many nodes (this one included) are in the "
                        "swarm, to start a planned run together (0: start at once).")
    window: float = opt(5.0, "Seconds a round waits for missing peers.")
    nproc_per_node: int = opt(1, "Processes (ranks; e.g. one per GPU) of this node, one worker of the swarm, "
                              "torchrun-style: rank r trains on its own batches, the ranks average gradients every "
                              "step, and each syncs 1/G of every outer exchange in a swarm of its slot, listening on "
                              "--listen's port + r. Every node of a swarm sets the same value; rank 0 is the node "
                              "(its peer id, its status line, the worker's bytes summed over the ranks).")
    secret_file: str = opt("", "File whose bytes (16 or more) are the swarm's shared secret, e.g. from "
                           "`head -c 32 /dev/urandom > swarm.secret`: every message is authenticated with it, "
                           "so nodes without it can neither join nor download the model. Copy it to every node.")
    allow: str = opt("", "Peer ids allowed in the swarm, comma- or space-separated (empty: any peer); "
                     "requests from other peers are refused. A node's peer id is printed when it starts.")
    log_to: str = opt("", "Metrics for another program, one record per outer round plus a start and a stop "
                      "record, to comma-separated KIND:ARG (empty: nowhere): jsonl:PATH appends them to PATH as "
                      "JSON lines, flushed each line; tensorboard:DIR writes TensorBoard scalars (pip install "
                      "'lowcomm[tensorboard]'); wandb:PROJECT (bare wandb: project lowcomm) logs to an offline "
                      "Weights & Biases run unless WANDB_MODE says otherwise (pip install 'lowcomm[wandb]'). "
                      "Keys: t, step, round, participants, members, excluded, loss, tokens_per_s, bytes_sent, "
                      "bytes_received, round_s, compute_s, wait_s (seconds and bytes since this node started "
                      "training); start and stop add eval_loss.")

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
