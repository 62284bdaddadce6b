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
refused in one line.
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

import msgpack
import torch
from rich.console import Console
from rich.markup import escape

from lowcomm.checkpoint import CheckpointError, load_state, save_state, state_from_bytes, state_to_bytes
from lowcomm.compressors import wire_size
from lowcomm.config import ConfigError, JoinConfig, OuterConfig, check_aggregator
from lowcomm.join.settings import differences, run_settings, settings_hash
from lowcomm.sim.report import format_bytes
from lowcomm.optimizers.registry import ALGORITHMS, build_optimizer, settings_for
from lowcomm.p2p.private import MIN_SECRET_BYTES, REFUSED, Unauthorized
from lowcomm.tasks import TaskError, load_task

PROTOCOL_HELLO = "/lowcomm/hello/1"
PEER_ID = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{40,128}$")  # base58: Qm... or 12D3KooW...
PROTOCOL_STATE = "/lowcomm/state/1"
CHECKPOINT = "node"


class Refused(Exception):
    """A peer runs other settings; the message names what differs."""


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


def phi_digest(opt) -> str:
    h = hashlib.sha256()
    phis = opt.phi if isinstance(opt.phi[0], torch.Tensor) else [t for frag in opt.phi for t in frag]
    for t in phis:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


class Node:
    """One volunteer node (see the module docstring)."""

    def __init__(self, cfg: JoinConfig, console: Console):
        self.cfg, self.console = cfg, console
        self.stop_requested = False
        self.swarm = None
        self._state_blob = b""
        self._missed = 0

    # --- set-up ---
    def _validate(self) -> list[str]:
        cfg = self.cfg
        if cfg.backend not in ("hivemind", "libp2p"):
            raise ConfigError("--backend", f"must be hivemind or libp2p, got {cfg.backend!r}")
        outer = [name for name, spec in ALGORITHMS.items() if spec.periodic]
        if cfg.algorithm not in outer:
            raise ConfigError("--algorithm", f"must be one of {', '.join(outer)}, got {cfg.algorithm!r}")
        cfg.check_outer()
        cfg.check_taken(cfg.algorithm)
        check_aggregator(cfg.aggregator)
        for flag, value in (("--max-steps", cfg.max_steps), ("--batch-size", cfg.batch_size)):
            if value < 0:
                raise ConfigError(flag, f"must be >= 0, got {value}")
        if cfg.checkpoint_every < 1:
            raise ConfigError("--checkpoint-every", f"must be >= 1, got {cfg.checkpoint_every}")
        peers = cfg.peer_list()
        for p in peers:
            check_multiaddr("--peers", p, need_peer_id=True)
        if cfg.announce:
            check_multiaddr("--announce", cfg.announce, need_peer_id=False)
        check_port_free(cfg.listen)
        self.secret = read_secret(cfg.secret_file) if cfg.secret_file else None
        for peer in cfg.allow_list() or []:
            if not PEER_ID.match(peer):
                raise ConfigError("--allow", f"{peer!r} is not a peer id (base58, like 12D3KooW...)")
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
        self.run_settings = run_settings(cfg.task, cfg.data, self.model, self.settings, cfg.aggregator)
        self.hash = settings_hash(self.run_settings)

    def _claim_checkpoint_dir(self) -> Path:
        """Take the checkpoint folder (with a lock file holding our pid). With the
        default folder, a folder in use by a running node on this machine is
        skipped for ``checkpoints-2``, ``-3`` ...; a lock left by a dead process is taken over."""
        base = Path(self.cfg.checkpoint_dir)
        default = self.cfg.checkpoint_dir == JoinConfig.checkpoint_dir
        for i in range(1, 1000):
            folder = base if i == 1 else base.with_name(f"{base.name}-{i}")
            folder.mkdir(parents=True, exist_ok=True)
            lock = folder / ".lock"
            try:
                holder = int(lock.read_text().strip())
                os.kill(holder, 0)
                alive = holder != os.getpid()
            except (FileNotFoundError, ValueError, ProcessLookupError):
                alive = False
            except PermissionError:
                alive = True
            if not alive:
                lock.write_text(str(os.getpid()))
                if folder != base:
                    self.console.print(f"using checkpoint folder {folder} ({base} is in use by a running node)",
                                       highlight=False)
                self._lock = lock
                return folder
            if not default:
                raise ConfigError("--checkpoint-dir", f"{folder} is in use by a running node (pid {holder}); "
                                                      "give this node a folder of its own")
        raise ConfigError("--checkpoint-dir", "no free checkpoint folder")

    def _join_swarm(self, peers: list[str]) -> None:
        from lowcomm.p2p import BootstrapFailed, Swarm, TransportError
        from lowcomm.p2p.backends import BackendConflict

        cfg = self.cfg
        ckpt_dir = self.checkpoint_dir = self._claim_checkpoint_dir()
        identity = cfg.identity or str(ckpt_dir / "identity.key")
        try:
            self.swarm = Swarm.join(peers, run_id=f"{cfg.run_id}/{self.hash}", backend=cfg.backend,
                                    listen=[cfg.listen], announce=[cfg.announce] if cfg.announce else [],
                                    identity_path=identity, window=cfg.window, secret=self.secret,
                                    allow=cfg.allow_list(), aggregator=cfg.aggregator)
        except BackendConflict as e:
            raise ConfigError("--backend", str(e)) from None
        except BootstrapFailed:
            raise ConfigError("--peers", f"could not reach {', '.join(peers)}; check the address and that the "
                                         "port is open") from None
        except TransportError as e:
            raise ConfigError("--listen", f"could not start the network: {e}") from None
        self.swarm.call(self._serve(), timeout=30)
        self.console.print(f"peer id {self.swarm.peer_id} (its key: {identity})", highlight=False)
        try:
            self.opt = build_optimizer(self.settings, self.model, self.inner, self.swarm)
        except ValueError as e:
            raise ConfigError(f"--{cfg.algorithm}", str(e)) from None

    async def _serve(self) -> None:
        async def hello(sender: str, data: bytes) -> bytes:
            msg = msgpack.unpackb(data, raw=False)
            ok = isinstance(msg, dict) and msg.get("run_id") == self.cfg.run_id and msg.get("hash") == self.hash
            if not ok:
                self.console.print(f"[yellow]refused {sender[:16]}…: it runs other settings[/]", highlight=False)
            return msgpack.packb({"ok": ok, "run_id": self.cfg.run_id, "hash": self.hash,
                                  "settings": self.run_settings})

        async def state(sender: str, data: bytes) -> bytes:
            msg = msgpack.unpackb(data, raw=False)
            if not isinstance(msg, dict) or msg.get("hash") != self.hash or not self._state_blob:
                return b""
            return self._state_blob

        await self.swarm.transport.serve(PROTOCOL_HELLO, hello)
        await self.swarm.transport.serve(PROTOCOL_STATE, state)

    def _handshake(self, peers: list[str]) -> None:
        """Ask each bootstrap peer whether it runs our settings; refuse on a mismatch."""
        request = msgpack.packb({"run_id": self.cfg.run_id, "hash": self.hash})
        for addr in peers:
            peer = addr.split("/p2p/")[-1].split("/")[0]
            try:
                raw = self.swarm.call(self.swarm.transport.request(peer, PROTOCOL_HELLO, request, timeout=30), 40)
                if raw == REFUSED:  # only a node outside a private swarm sees the refusal itself
                    raise Unauthorized(f"{addr} runs a private swarm; join it with its --secret-file "
                                       "(and be on its --allow list if it has one)")
                reply = msgpack.unpackb(raw, raw=False)
            except Unauthorized as e:
                raise Refused(f"refused by {addr}: {e}") from None
            except Exception as e:  # an unreachable bootstrap peer is reported, the next one tried
                self.console.print(f"[yellow]could not greet {escape(addr)}: {escape(str(e))}[/]", highlight=False)
                continue
            if not reply.get("ok"):
                what = differences(self.run_settings, reply.get("settings") or {})
                if reply.get("run_id") != self.cfg.run_id:
                    what.insert(0, f"run id ({self.cfg.run_id!r} here, {reply.get('run_id')!r} there)")
                raise Refused(f"refused by {addr}: run {reply.get('run_id')!r} settings {reply.get('hash')} differ from "
                              f"run {self.cfg.run_id!r} settings {self.hash} here: {'; '.join(what) or 'settings'}")
            return

    # --- state ---
    def _snapshot(self) -> None:
        self._state_blob = state_to_bytes(self.opt.shared_state_dict(),
                                          {"hash": self.hash, "step": self.opt.step_count})

    def _fetch_state(self) -> tuple[str, dict, dict] | None:
        """(peer, shared state, meta) from the first live peer that serves a valid one."""
        request = msgpack.packb({"hash": self.hash})
        for peer in [m for m in self.swarm.members() if m != self.swarm.peer_id]:
            try:
                blob = self.swarm.call(self.swarm.transport.request(peer, PROTOCOL_STATE, request, timeout=120),
                                        timeout=130)
                if not blob:
                    continue
                state, meta = state_from_bytes(blob)
                if meta.get("hash") != self.hash:
                    raise CheckpointError("settings hash differs")
                return peer, state, meta
            except Exception as e:  # try the next peer: this one is gone or sent something unusable
                self.console.print(f"[yellow]could not catch up from {peer[:16]}…: {escape(str(e))}[/]", highlight=False)
        return None

    def catch_up(self, fetched: tuple[str, dict, dict] | None = None) -> bool:
        """Adopt a peer's shared state (``fetched``, or fetched now from the first peer that serves one)."""
        fetched = fetched or self._fetch_state()
        if fetched is None:
            return False
        peer, state, _ = fetched
        try:
            self.opt.load_shared_state_dict(state)
        except ValueError as e:
            self.console.print(f"[yellow]could not catch up from {peer[:16]}…: {escape(str(e))}[/]", highlight=False)
            return False
        self.swarm.forget_rounds()
        self.console.print(f"caught up from {peer[:16]}… at step {self.opt.step_count}", highlight=False)
        return True

    def _checkpoint_path(self) -> Path:
        return self.checkpoint_dir / CHECKPOINT

    def save(self) -> None:
        save_state(self._checkpoint_path(), {"model": self.model.state_dict(), "opt": self.opt.state_dict()},
                   {"hash": self.hash, "step": self.opt.step_count, "run_id": self.cfg.run_id})

    def load_checkpoint(self) -> int | None:
        """Resume from this node's checkpoint if it is valid; returns its step."""
        path = self._checkpoint_path()
        if not path.with_suffix(".json").exists() and not path.with_suffix(".safetensors").exists():
            return None
        try:
            state, meta = load_state(path)
            if meta.get("hash") != self.hash:
                raise CheckpointError(f"it was written for other settings ({meta.get('hash')})")
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
        except (CheckpointError, KeyError, ValueError, RuntimeError) as e:
            self.console.print(f"[yellow]skipping checkpoint {escape(str(path))}: {escape(str(e))}[/]",
                               highlight=False)
            return None
        self.console.print(f"resumed from checkpoint at step {meta['step']}", highlight=False)
        return int(meta["step"])

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
        self._build()
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        self._join_swarm(peers)
        try:
            if peers:
                self._handshake(peers)
            self._start_state(peers)
            self._snapshot()
            if not peers:
                self._print_join_line()
            self._train()
        finally:
            if getattr(self, "opt", None) is not None:
                self.save()
                self.console.print(f"checkpoint written to {self._checkpoint_path()}.*", highlight=False)
            self.swarm.close()
            lock = getattr(self, "_lock", None)
            if lock is not None:
                lock.unlink(missing_ok=True)

    def _start_state(self, peers: list[str]) -> None:
        ckpt_step = self.load_checkpoint()
        if peers:
            try:
                self.swarm.wait_for_members(2, timeout=30)
            except TimeoutError:
                self.console.print("[yellow]no other member visible yet; starting on my own[/]")
                return
            fetched = self._fetch_state()  # one download: its step decides, and it is what we load
            if fetched is not None and (ckpt_step is None or int(fetched[2]["step"]) > ckpt_step):
                self.catch_up(fetched)

    def _print_join_line(self) -> None:
        cfg = self.cfg
        addr = self.swarm.addrs()[0]
        extra = [f"--run-id {shlex.quote(cfg.run_id)}"] if cfg.run_id != "lowcomm" else []
        shared = ["backend", "task", "data", "algorithm", "aggregator", *(f.name for f in fields(OuterConfig)),
                  "secret_file", "allow"]  # what every node must set alike
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
        order = int(hashlib.sha256(f"{cfg.seed}/{self.swarm.peer_id}".encode()).hexdigest()[:8], 16)
        data = task.batches(0, 1, order)
        numel = sum(p.numel() for p in self.model.parameters())
        codec = opt.compression.compressor if hasattr(opt.compression, "compressor") else opt.compression
        ratio = numel * 4 / wire_size(codec, numel) if codec is not None else 1.0
        self.console.print(f"eval loss {task.evaluate(self.model):.4f} at step {opt.step_count}", highlight=False)
        rounds_seen, tokens, t_last = opt.stats.outer_rounds, 0, time.monotonic()
        since_ckpt = 0
        while not self.stop_requested and (cfg.max_steps == 0 or opt.step_count < cfg.max_steps):
            loss = task.loss(self.model, next(data))
            loss.backward()
            t_step = time.monotonic()
            opt.step()
            opt.zero_grad()
            tokens += task.tokens_per_batch
            if opt.stats.outer_rounds == rounds_seen:
                continue
            rounds_seen = opt.stats.outer_rounds
            now = time.monotonic()
            members = len(self.swarm.known_members)
            excluded = len(self.swarm.exclusions.excluded())
            swarm_round = sum(opt.rounds) if hasattr(opt, "rounds") else opt.round  # the same on every node
            self.console.print(
                f"round {swarm_round:4d} | step {opt.step_count:6d} | peers {opt.stats.last_group_size}/{members}"
                f"{f' ({excluded} excluded)' if excluded else ''} | "
                f"loss {loss.item():.4f} | {tokens / max(now - t_last, 1e-9):,.0f} tok/s | "
                f"sent {format_bytes(opt.stats.bytes_sent)} recv {format_bytes(opt.stats.bytes_received)} | "
                f"x{ratio:.1f} compression | round {now - t_step:.2f} s | phi {phi_digest(opt)}", highlight=False,
                soft_wrap=True)
            tokens, t_last = 0, now
            out_of_sync = opt.stats.rounds_not_averaged > self._missed or (
                opt.stats.last_group_size < 2 and members > 1)
            self._missed = opt.stats.rounds_not_averaged
            if out_of_sync and members > 1 and not self.stop_requested:
                self.catch_up()
            self._snapshot()
            since_ckpt += 1
            if since_ckpt >= cfg.checkpoint_every:
                self.save()
                since_ckpt = 0
        self.console.print(f"eval loss {task.evaluate(self.model):.4f} at step {opt.step_count}", highlight=False)
