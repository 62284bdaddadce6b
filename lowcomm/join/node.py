"""`lowcomm join`: a volunteer node that joins, catches up, trains, checkpoints, leaves.

    lowcomm join                                   # start a swarm; prints the line for others
    lowcomm join --peers /ip4/1.2.3.4/tcp/31337/p2p/12D3Koo...

A node builds the task's model, joins the swarm (`--backend`: hivemind or libp2p), checks
with its bootstrap peers that they run the same settings, then takes the
latest state: from a peer that is further along (global weights, outer
optimizer state, round and step), or from its own checkpoint, or fresh. It
trains, prints one status line per outer round, serves its state to later
joiners, and writes a checkpoint every few rounds and on exit. A round it was
left out of (late, or alone while others exist) makes it catch up again.
Ctrl+C or SIGTERM gives up the round in flight, writes a checkpoint, stops the
daemon and exits 0; a second Ctrl+C exits at once. ``--secret-file`` and
``--allow`` make the swarm private (`lowcomm.p2p.private`): strangers are
refused in one line. ``--log-to`` writes one record per outer round (and
one at start and at stop) to the sinks it names: ``jsonl:PATH`` for another
program to read, ``tensorboard:DIR``, ``wandb:PROJECT`` (`lowcomm.metrics`;
the keys are in `Node.round_record`).

The parts: `lowcomm.join.protocol` (handshake and state transfer),
`lowcomm.join.catchup` (when to catch up), `lowcomm.join.checkpoints` (the
folder lock and the checkpoint); this module checks the settings, builds the
model and runs the training loop.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import socket
import time
from dataclasses import fields
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.markup import escape

from lowcomm.compressors import wire_size
from lowcomm.config import ConfigError, JoinConfig, OuterConfig, check_aggregator
from lowcomm.join.catchup import CatchUp
from lowcomm.join.checkpoints import FolderLock, NodeCheckpoint, claim_folder
from lowcomm.join.group import RankGroup, rank_identity, with_port
from lowcomm.p2p.keys import derive_key_file
from lowcomm.join.protocol import JoinProtocol, Refused
from lowcomm.join.settings import run_settings, settings_hash
from lowcomm.metrics import Sinks, open_sinks, parse_sinks
from lowcomm.optimizers import OuterOptimizer
from lowcomm.optimizers.registry import ALGORITHMS, build_optimizer, settings_for
from lowcomm.optimizers.worker_group import broadcast_shared_state
from lowcomm.p2p.private import MIN_SECRET_BYTES
from lowcomm.sim.report import format_bytes
from lowcomm.tasks import TaskError, load_task

__all__ = ["Node", "Refused"]

PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{40,128}$")  # base58: Qm... or 12D3KooW...


def check_multiaddr(flag: str, text: str, need_peer_id: bool) -> dict[str, str]:
    from lowcomm.p2p.addrs import AddressError, parse_multiaddr

    try:
        return parse_multiaddr(text, need_peer_id)
    except AddressError as e:
        raise ConfigError(flag, str(e)) from None


def read_secret(path: str) -> bytes:
    """The shared secret in the file at ``path``; `ConfigError` if it is missing or too short."""
    try:
        secret = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError("--secret-file", f"cannot read {path}: {e.strerror}; make one with "
                                           f"`head -c 32 /dev/urandom > {path}` and copy it to every node") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError("--secret-file", f"{path} holds {len(secret)} bytes; a secret needs at least "
                                           f"{MIN_SECRET_BYTES} (`head -c 32 /dev/urandom > {path}`)")
    return secret


def check_port_free(listen: str) -> None:
    parts = check_multiaddr("--listen", listen, need_peer_id=False)
    port = int(parts.get("tcp", 0))
    if port == 0:
        return
    host = parts.get("ip4") or parts.get("ip6") or "0.0.0.0"
    family = socket.AF_INET6 if "ip6" in parts else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError("--listen", f"cannot listen on {host} port {port} ({e.strerror}); is another node "
                                          "running? pick another port, or 0 for any free one") from None


def phi_digest(opt: OuterOptimizer) -> str:
    """A short hash of the global weights: equal on every node that took part in a round."""
    h = hashlib.sha256()
    for t in opt.global_params:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class Node:
    """One volunteer node (see the module docstring)."""

    def __init__(self, cfg: JoinConfig, console: Console, group: RankGroup | None = None):
        self.cfg, self.console = cfg, console
        #: The node's ranks when it is one of G processes (``--nproc-per-node``; `lowcomm.join.group`), else None.
        self.group = group
        self.lead = group is None or group.lead  # rank 0 speaks for the node
        self.stop_requested = False
        self._stop_agreed = False  # with a group: every rank stops at the step some rank asked to
        self.swarm = None
        self.opt: OuterOptimizer | None = None
        self.folder: FolderLock | None = None
        self.metrics = Sinks([])

    # --- set-up ---
    def validate(self) -> list[str]:
        """Check the settings (`ConfigError` naming the flag); returns the bootstrap peers."""
        cfg = self.cfg
        if cfg.nproc_per_node < 1:
            raise ConfigError("--nproc-per-node", f"must be >= 1, got {cfg.nproc_per_node}")
        if cfg.nproc_per_node > 1 and cfg.allow:
            raise ConfigError("--allow", "is not supported with --nproc-per-node > 1 yet (ranks other than 0 "
                                         "have peer ids of their own); use --secret-file for a private swarm")
        if cfg.backend not in ("hivemind", "libp2p"):
            raise ConfigError("--backend", f"must be hivemind or libp2p, got {cfg.backend!r}")
        outer = [name for name, spec in ALGORITHMS.items() if spec.periodic]
        if cfg.algorithm not in outer:
            raise ConfigError("--algorithm", f"must be one of {', '.join(outer)}, got {cfg.algorithm!r}")
        cfg.check_outer()
        cfg.check_taken(cfg.algorithm)
        check_aggregator(cfg.aggregator)
        for flag, value in (("--max-steps", cfg.max_steps), ("--batch-size", cfg.batch_size),
                            ("--wait-for", cfg.wait_for)):
            if value < 0:
                raise ConfigError(flag, f"must be >= 0, got {value}")
        if cfg.checkpoint_every < 1:
            raise ConfigError("--checkpoint-every", f"must be >= 1, got {cfg.checkpoint_every}")
        peers = cfg.peer_list()
        for p in peers:
            check_multiaddr("--peers", p, need_peer_id=True)
        if cfg.announce:
            check_multiaddr("--announce", cfg.announce, need_peer_id=False)
        ranks = [self.group.rank] if self.group else range(cfg.nproc_per_node)
        for r in ranks:
            check_port_free(with_port(cfg.listen, r))
        self.secret = read_secret(cfg.secret_file) if cfg.secret_file else None
        for peer in cfg.allow_list() or []:
            if not PEER_ID.match(peer):
                raise ConfigError("--allow", f"{peer!r} is not a peer id (base58, like 12D3KooW...)")
        parse_sinks(cfg.log_to, "--log-to")
        return peers

    def _validate(self) -> list[str]:
        """`validate`, then open the ``--log-to`` sinks (rank 0's: it writes the node's records)."""
        peers = self.validate()
        if self.lead:
            self.metrics = open_sinks(self.cfg.log_to, "--log-to")  # last: nothing after it can fail
        return peers

    def _build(self) -> None:
        cfg = self.cfg
        options = {"data": cfg.data} if cfg.data else {}
        if cfg.batch_size:
            options["batch_size"] = cfg.batch_size
        try:
            self.task = load_task(cfg.task, **options)
        except TaskError as e:
            raise ConfigError("--data" if "--data" in str(e) else "--task", str(e)) from None
        self.settings = settings_for(cfg.algorithm, cfg.outer_options())
        self.model = self.task.make_model(cfg.seed)
        self.inner = self.task.make_inner(self.model, cfg.lr or self.task.default_lr)
        self.run_settings = run_settings(cfg.task, cfg.data, self.model, self.settings, cfg.aggregator,
                                         cfg.nproc_per_node)
        self.hash = settings_hash(self.run_settings)

    def _join_swarm(self, peers: list[str]) -> None:
        from lowcomm.p2p import BootstrapFailed, Swarm, TransportError
        from lowcomm.p2p.backends import BackendConflict

        cfg, group = self.cfg, self.group
        if group is None:
            self.folder = claim_folder(cfg.checkpoint_dir, cfg.checkpoint_dir == JoinConfig.checkpoint_dir,
                                       self.console)
            folder, rank, ranks = self.folder.folder, 0, 1
        else:  # the launcher holds the folder
            folder, rank, ranks = Path(cfg.checkpoint_dir), group.rank, group.size
        self.checkpoint = NodeCheckpoint(folder, self.hash, cfg.run_id, self.console, rank, ranks)
        identity = cfg.identity or str(folder / "identity.key")
        run_id, listen, announce = f"{cfg.run_id}/{self.hash}", cfg.listen, cfg.announce
        if group is not None:  # rank r: the swarm of slot r, bootstrapped from rank 0 (see lowcomm.join.group)
            run_id = f"{run_id}/part{rank}of{ranks}"
            listen, announce = with_port(listen, rank), with_port(announce, rank)
            if rank > 0:
                first = group.broadcast_json()  # rank 0's addresses, once its swarm is up
                if first is None:
                    raise ConfigError("--listen", "rank 0 of this node could not join the swarm")
                peers = first[:1] + peers
                identity = str(derive_key_file(Path(identity), rank_identity(Path(identity), rank), f"rank{rank}"))
        try:
            try:
                self.swarm = Swarm.join(peers, run_id=run_id, backend=cfg.backend, listen=[listen],
                                        announce=[announce] if announce else [], identity_path=identity,
                                        window=cfg.window, secret=self.secret, allow=cfg.allow_list(),
                                        aggregator=cfg.aggregator)
            finally:
                if group is not None and rank == 0:
                    group.broadcast_json(self.swarm.addrs() if self.swarm is not None else None)
        except BackendConflict as e:
            raise ConfigError("--backend", str(e)) from None
        except BootstrapFailed:
            raise ConfigError("--peers", f"could not reach {', '.join(peers)}; check the address and that the "
                                         "port is open") from None
        except TransportError as e:
            raise ConfigError("--listen", f"could not start the network: {e}") from None
        self.protocol = JoinProtocol(self.swarm, cfg.run_id, self.run_settings, self.hash, self.console)
        if self.lead:
            self.protocol.serve()
        self.console.print(f"peer id {self.swarm.peer_id} (its key: {identity})"
                           f"{f'; {ranks} ranks' if ranks > 1 else ''}", highlight=False)
        #: The node's peer id (rank 0's): it seeds the data order of every rank.
        self.node_id = self.swarm.peer_id if group is None else group.broadcast_json(self.swarm.peer_id)
        try:
            self.opt = build_optimizer(self.settings, self.model, self.inner, self.swarm,
                                       worker_group=group.pg if group else None)
        except ValueError as e:
            raise ConfigError(f"--{cfg.algorithm}", str(e)) from None
        load = None
        if group is not None:
            def load(state: dict) -> None:  # rank 0 adopts a state: every rank loads it (see _follow)
                group.broadcast_json(True)
                broadcast_shared_state(self.opt, state)
        self.catchup = CatchUp(self.opt, self.swarm, self.protocol, self.console,
                               stopping=lambda: self.stop_requested, load=load)

    def _catch_up(self, policy: Callable[[], None]) -> None:
        """Run the catch-up ``policy`` (a `CatchUp` method) for the node: alone, or on
        rank 0 while the other ranks follow (`_follow`): a collective of the ranks."""
        if self.group is None:
            policy()
        elif self.lead:
            try:
                policy()
            finally:
                self.group.broadcast_json(False)
        else:
            self._follow()

    def _follow(self) -> None:
        """Ranks other than 0: load each state rank 0 adopts, until it says it is done."""
        while self.group.broadcast_json():
            try:
                broadcast_shared_state(self.opt, None)
            except (ValueError, LookupError, TypeError, AttributeError):
                continue  # rank 0 failed to load it alike, and says why
            self.swarm.forget_rounds()

    def _snapshot(self) -> None:
        """Serve the current shared state to nodes that join or catch up (rank 0 serves the node's)."""
        if self.lead:
            self.protocol.publish(self.opt.shared_state_dict(), self.opt.step_count)

    def _stopping(self) -> bool:
        """Whether to leave the training loop: asked for here, or (ranks of a node) agreed by the ranks."""
        return self._stop_agreed if self.group is not None else self.stop_requested

    def _worker_bytes(self) -> tuple[int, int]:
        """Wire bytes sent and received by the worker: this node's, or summed over its ranks (a collective)."""
        s = self.opt.stats
        if self.group is None:
            return s.bytes_sent, s.bytes_received
        sent, received = self.group.sum([s.bytes_sent, s.bytes_received])
        return int(sent), int(received)

    # --- running ---
    def _on_signal(self, signum, frame) -> None:
        if self.stop_requested:
            self.console.print("[red]second interrupt: exiting now[/]")
            if self.swarm is not None:
                self.swarm.kill()
            os._exit(130)
        self.stop_requested = True
        self.console.print("stopping: leaving the current round, writing a checkpoint "
                           "(Ctrl+C again to quit at once)", highlight=False)
        if self.swarm is not None:
            self.swarm.abort_rounds()

    def run(self) -> None:
        peers = self._validate()
        try:
            self._build()
            signal.signal(signal.SIGINT, self._on_signal)
            signal.signal(signal.SIGTERM, self._on_signal)
            self._join_swarm(peers)
            try:
                if peers and self.lead:
                    self.protocol.greet(peers)
                step = self.checkpoint.load(self.model, self.opt)
                self._catch_up(lambda: self.catchup.at_start(step, have_peers=bool(peers)))
                self._snapshot()
                if not peers and self.lead:
                    self._print_join_line()
                if self.lead:
                    self._wait_for_nodes()
                if self.group is not None:
                    self._agree_to_start()
                if not self._stopping():
                    self._train()
            finally:
                if self.opt is not None:
                    self.checkpoint.save(self.model, self.opt)
                    self.console.print(f"checkpoint written to {self.checkpoint.path}.*", highlight=False)
                self.swarm.close()
        finally:
            if self.folder is not None:
                self.folder.release()
            self.metrics.close()

    def _wait_for_nodes(self) -> None:
        """Block until ``--wait-for`` nodes are live members (or a stop is asked for)."""
        want, shown = self.cfg.wait_for, -1
        while want > 1 and not self.stop_requested:
            have = len(self.swarm.members())
            if have >= want:
                self.console.print(f"{have} nodes in the swarm: starting", highlight=False)
                return
            if have != shown:
                self.console.print(f"waiting for {want} nodes: {have} in the swarm", highlight=False)
                shown = have
            time.sleep(0.2)

    def _agree_to_start(self) -> None:
        """Ranks of a node: take rank 0's word on whether to train, and let each slot's
        swarm see as many members as rank 0's does (30 s at most) before the first
        round: a rank whose membership view is older than the swarm (the node that
        was waiting when another joined) would average its slice alone."""
        stop, want = self.group.broadcast_json([self.stop_requested, len(self.swarm.members())] if self.lead
                                               else None)
        self._stop_agreed = stop
        if not self.lead and not stop and want > 1:
            try:
                self.swarm.wait_for_members(want, timeout=30)
            except TimeoutError:
                self.console.print(f"[yellow]the swarm of slot {self.group.rank} has fewer members than slot 0's[/]")

    def _print_join_line(self) -> None:
        cfg = self.cfg
        addr = self.swarm.addrs()[0]
        extra = [f"--run-id {shlex.quote(cfg.run_id)}"] if cfg.run_id != "lowcomm" else []
        shared = ["backend", "task", "data", "algorithm", "aggregator", *(f.name for f in fields(OuterConfig)),
                  "nproc_per_node", "secret_file", "allow"]  # what every node must set alike
        defaults = JoinConfig()
        for name in shared:
            flag, value = "--" + name.replace("_", "-"), getattr(cfg, name)
            if value == getattr(defaults, name):
                continue
            # pasted into a shell as printed
            extra.append(flag if value is True else f"{flag} {shlex.quote(str(value))}")
        line = " ".join(["lowcomm join --peers", addr, *extra])
        self.console.rule("[bold]swarm started")
        self.console.print("Other nodes join with:", highlight=False)
        self.console.print(f"[bold green]{escape(line)}[/]", highlight=False, soft_wrap=True)
        if cfg.secret_file:
            self.console.print(f"(a private swarm: copy {cfg.secret_file} to every node that joins)", highlight=False)
        if "/127.0.0.1/" in addr:
            self.console.print("(this node listens on 127.0.0.1 only; use --listen /ip4/0.0.0.0/tcp/PORT and "
                               "--announce with your public address for other machines)", highlight=False)
        self.console.rule()

    def _train(self) -> None:
        cfg, task, opt = self.cfg, self.task, self.opt
        # every node reads the whole training set in its own order, seeded by its peer id
        # (ranks of a node: rank r reads the task's batches of rank r of G, in the node's order)
        order = int(hashlib.sha256(f"{cfg.seed}/{self.node_id}".encode()).hexdigest()[:8], 16)
        group = self.group
        data = task.batches(group.rank, group.size, order) if group else task.batches(0, 1, order)
        ranks = group.size if group else 1
        numel = sum(p.numel() for p in self.model.parameters())
        ratio = numel * 4 / wire_size(opt.codec, numel) if opt.codec is not None else 1.0
        eval_loss = task.evaluate(self.model) if self.lead else float("nan")
        self.console.print(f"eval loss {eval_loss:.4f} at step {opt.step_count}", highlight=False)
        meter = Meter(opt, counters=self._worker_bytes)
        self.metrics.write({"event": "start", "t": 0.0, "step": opt.step_count, "round": opt.swarm_round,
                            "peer_id": self.swarm.peer_id, "eval_loss": eval_loss})
        rounds_seen, tokens, t_last = opt.stats.outer_rounds, 0, time.monotonic()
        since_ckpt = 0
        while not self._stopping() and (cfg.max_steps == 0 or opt.step_count < cfg.max_steps):
            t_start = time.monotonic()
            loss = task.loss(self.model, next(data))
            loss.backward()
            if group is not None and group.step(self.model, self.stop_requested):
                self._stop_agreed = True  # every rank leaves here, before the step
                break
            t_step, waited = time.monotonic(), opt.stats.wait_s
            opt.step()
            opt.zero_grad()
            now = time.monotonic()
            meter.computed(now - t_start - (opt.stats.wait_s - waited))
            tokens += task.tokens_per_batch * ranks
            if opt.stats.outer_rounds == rounds_seen:
                continue
            rounds_seen = opt.stats.outer_rounds
            members = len(self.swarm.known_members)
            excluded = len(self.swarm.exclusions.excluded())
            sent, received = self._worker_bytes()
            record = self.round_record(meter, now, loss.item(), tokens / max(now - t_last, 1e-9), now - t_step,
                                       members, excluded)
            self.console.print(
                f"round {opt.swarm_round:4d} | step {opt.step_count:6d} | peers {opt.stats.last_group_size}/{members}"
                f"{f' ({excluded} excluded)' if excluded else ''} | "
                f"loss {loss.item():.4f} | {tokens / max(now - t_last, 1e-9):,.0f} tok/s | "
                f"sent {format_bytes(sent)} recv {format_bytes(received)} | "
                f"x{ratio:.1f} compression | round {now - t_step:.2f} s | phi {phi_digest(opt)}", highlight=False,
                soft_wrap=True)
            self.metrics.write(record)
            tokens, t_last = 0, now
            self._catch_up(lambda: self.catchup.after_round(stopping=self.stop_requested))
            self._snapshot()
            since_ckpt += 1
            if since_ckpt >= cfg.checkpoint_every:
                self.checkpoint.save(self.model, opt)
                since_ckpt = 0
        eval_loss = task.evaluate(self.model) if self.lead else float("nan")
        self.console.print(f"eval loss {eval_loss:.4f} at step {opt.step_count}", highlight=False)
        totals = meter.totals(time.monotonic())
        self.metrics.write({"event": "stop", "t": totals["t"], "step": opt.step_count, "round": opt.swarm_round,
                            "eval_loss": eval_loss, **totals})

    def round_record(self, meter: Meter, now: float, loss: float, tokens_per_s: float, round_s: float,
                     members: int, excluded: int) -> dict:
        """The ``--log-to`` record of the round that just ended: ``t`` (s since training
        started), ``step``, ``round`` (the swarm round), ``participants`` (group size),
        ``members`` and ``excluded`` (peers), ``loss`` (of the last batch),
        ``tokens_per_s`` (since the last round), ``bytes_sent`` and
        ``bytes_received`` (wire bytes), ``round_s`` (the step that ended the round),
        ``compute_s`` (forward, backward and local optimizer work) and ``wait_s``
        (blocked on averaging results); counters since training started. A node of
        several ranks: the worker's bytes (summed over ranks; a collective), rank 0's
        times."""
        opt = self.opt
        totals = meter.totals(now)
        return {"t": totals["t"], "step": opt.step_count, "round": opt.swarm_round,
                "participants": opt.stats.last_group_size, "members": members, "excluded": excluded,
                "loss": loss, "tokens_per_s": tokens_per_s, "bytes_sent": totals["bytes_sent"],
                "bytes_received": totals["bytes_received"], "round_s": round_s, "compute_s": totals["compute_s"],
                "wait_s": totals["wait_s"]}


class Meter:
    """Counters of one training session of ``opt``: seconds since it started,
    seconds of compute, and the optimizer's wire bytes and waiting since it
    started (counters a checkpoint restored are not this session's).
    ``counters``: the wire bytes (sent, received) to count, if not ``opt.stats``'s
    (a node of several ranks counts the worker's)."""

    def __init__(self, opt: OuterOptimizer, start: float | None = None,
                 counters: Callable[[], tuple[int, int]] | None = None):
        self.opt, self.start = opt, time.monotonic() if start is None else start
        self._bytes = counters or (lambda: (opt.stats.bytes_sent, opt.stats.bytes_received))
        self._base = self._counters()
        self.compute_s = 0.0

    def _counters(self) -> tuple[int, int, float]:
        return (*self._bytes(), self.opt.stats.wait_s)

    def computed(self, seconds: float) -> None:
        """Add ``seconds`` of training compute (loop time less waiting)."""
        self.compute_s += seconds

    def totals(self, now: float) -> dict:
        """``t`` (seconds since the start to ``now``), ``bytes_sent``, ``bytes_received``,
        ``compute_s`` and ``wait_s``, all since the start."""
        (sent, received, wait), (sent0, received0, wait0) = self._counters(), self._base
        return {"t": now - self.start, "bytes_sent": sent - sent0, "bytes_received": received - received0,
                "compute_s": self.compute_s, "wait_s": wait - wait0}
