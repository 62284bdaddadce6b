"""`lowcomm join --nproc-per-node G`: start a node's G rank processes, torchrun-style.

    lowcomm join --nproc-per-node 2                     # one worker of 2 processes
    lowcomm join --nproc-per-node 2 --peers /ip4/.../p2p/12D3Koo...

The launcher (the process the user started) checks the settings, claims the
checkpoint folder, picks a free port on 127.0.0.1 for the ranks' gloo group
and starts G processes, ``python -m lowcomm.join.launch --rank r ...``, each
a `lowcomm.join.node.Node` with a `lowcomm.join.group.RankGroup` (what the
ranks do: that module's docstring). Their output is its output: rank 0 prints
the node's lines, the others only errors.

Signals: the ranks run in sessions of their own, so a terminal's Ctrl+C (or a
``kill -TERM`` of the launcher's process group) reaches the launcher only,
which forwards every SIGINT and SIGTERM it gets to each rank, once: the ranks
agree on the step to stop at, write their checkpoints, stop their daemons and
exit 0; a second Ctrl+C makes each rank quit at once. A rank whose launcher
dies gets SIGTERM from the kernel (Linux ``PR_SET_PDEATHSIG``). When a rank
fails, the launcher stops the others (SIGTERM, then SIGKILL after
``GRACE_S``); it exits with rank 0's code if that is not 0, else the worst
(highest) of the others'.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, fields

from rich.console import Console
from rich.markup import escape

from lowcomm.config import ConfigError, JoinConfig

#: Seconds the launcher gives the other ranks to stop after one failed, before SIGKILL.
GRACE_S = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_code(codes: list[int]) -> int:
    """The launcher's exit status from its ranks' (negative: killed by that signal,
    reported as 128 + the signal, as a shell does): rank 0's if not 0, else the highest."""
    codes = [128 - c if c < 0 else c for c in codes]
    return codes[0] if codes[0] else max(codes)


class Launcher:
    """The parent of a node's G ranks (see the module docstring)."""

    def __init__(self, cfg: JoinConfig, console: Console):
        self.cfg, self.console = cfg, console
        self.procs: list[subprocess.Popen] = []

    def _forward(self, signum, frame) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signum)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        from lowcomm.join.checkpoints import claim_folder
        from lowcomm.join.node import Node

        cfg = self.cfg
        Node(cfg, self.console).validate()
        folder = claim_folder(cfg.checkpoint_dir, cfg.checkpoint_dir == JoinConfig.checkpoint_dir, self.console)
        try:
            port = free_port()
            config = json.dumps({**asdict(cfg), "checkpoint_dir": str(folder.folder)})
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            signal.signal(signal.SIGINT, self._forward)
            signal.signal(signal.SIGTERM, self._forward)
            for r in range(cfg.nproc_per_node):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "lowcomm.join.launch", "--rank", str(r), "--port", str(port),
                     "--parent", str(os.getpid()), "--config", config], env=env, start_new_session=True))
            return exit_code(self._wait())
        finally:
            for p in self.procs:  # only if the launcher itself failed
                if p.poll() is None:
                    p.kill()
                    p.wait()
            folder.release()

    def _wait(self) -> list[int]:
        failed_at = None
        while any(p.poll() is None for p in self.procs):
            if failed_at is None and any(p.poll() not in (None, 0) for p in self.procs):
                failed_at = time.monotonic()
                self._forward(signal.SIGTERM, None)
            if failed_at is not None and time.monotonic() - failed_at > GRACE_S:
                for p in self.procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
        return [p.returncode for p in self.procs]


def _die_with_parent(parent: int) -> None:
    """SIGTERM this process when ``parent`` dies (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def rank_main(argv: list[str] | None = None) -> int:
    """One rank: ``--rank r --port P --parent PID --config JSON`` (JoinConfig fields)."""
    from lowcomm.join.group import RankGroup
    from lowcomm.join.node import Node, Refused

    parser = argparse.ArgumentParser(prog="python -m lowcomm.join.launch")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    from lowcomm.logs import configure_from_env

    configure_from_env()  # LOWCOMM_LOG, checked by the launcher already
    known = {f.name for f in fields(JoinConfig)}
    cfg = JoinConfig(**{k: v for k, v in json.loads(args.config).items() if k in known})
    console = Console(quiet=args.rank != 0)
    err = Console(stderr=True)
    prefix = "" if args.rank == 0 else f"rank {args.rank}: "
    group = RankGroup(args.rank, cfg.nproc_per_node, args.port)
    try:
        Node(cfg, console, group=group).run()
    except (ConfigError, Refused) as e:
        err.print(f"[bold red]error[/]: {escape(prefix + str(e))}", highlight=False, soft_wrap=True)
        return 2
    except RuntimeError as e:  # a collective failed: another rank is gone (and says why, if it can)
        err.print(f"[red]{escape(prefix)}stopped: another rank of this node is gone ({escape(str(e)[:200])})[/]",
                  highlight=False)
        return 1
    finally:
        try:
            group.close()
        except RuntimeError:
            pass  # a broken group: nothing left to close
    return 0


if __name__ == "__main__":
    sys.exit(rank_main())
