"""Churn soak: real `lowcomm join` nodes in the network lab, one killed and restarted every round.

    sudo .venv/bin/python scripts/churn_soak.py --nodes 4 --rounds 8 --baseline   # a small run, 2 minutes
    sudo .venv/bin/python scripts/churn_soak.py --baseline          # 8 nodes at 50Mbit, 30 rounds of H=100

N nodes (``--nodes``, default 8), each in a network namespace of its own on a
tbf-shaped link (`lowcomm.lab.NetLab`, ``--bandwidth`` each way), train
``--task`` with ``--algorithm`` over ``--backend`` for ``--rounds`` outer
rounds of H inner steps (``--sync-every``; ``--max-steps`` is rounds*H).
Node 0 starts first; the others bootstrap from it and all start together
(``--wait-for N``). H defaults to 100 so that a round outlasts a restart:
on the 2-core build machine a restart takes 5-20 s until the node averages
with the others again (start, state download, then a round), while 8 nodes
do 20 steps of tinylm in about 2 s; with H = 20 most rounds would pass with
no kill (see ``--max-down``).

Churn. The soak reads the nodes' metrics files (``--log-to jsonl:...``) and
watches the highest swarm round any node has reached. Each time it rises, it
waits a random part (seeded) of the last round's duration, so kills land in
compute and in exchanges alike, then stops one random training node: by
SIGKILL (the process dies on the spot; its daemon's watchdog must take the
daemon down) or by SIGTERM (it leaves cleanly and writes a checkpoint),
alternating (``--signals alternate``) or at random (``random``). Once the
node's process and everything it started in its namespace are gone, it is
started again with the same checkpoint folder, hence the same identity (peer
id) and checkpoint, and with ``--peers`` naming up to three live nodes chosen
at random: any node may be killed, node 0 included, since no restart depends
on one bootstrap node. Victims are drawn from the nodes back in the swarm
(training, and averaged with others since their last start), so every
restart's catch-up is measured. A kill waits while ``--max-down`` nodes
(default a quarter of them) are out (stopping, starting or catching up); a
round whose kill could not happen before the next round began goes without
one. With 8 nodes, one kill a round turns a quarter of the swarm over every
two rounds; where a restart takes longer than two rounds, kills follow the
restarts instead, and the report counts the rounds without a kill (a
larger ``--max-down`` kills more often). No node is killed in the
last ``--calm-rounds`` rounds, nor once the rounds left (at the quickest
round so far) take less than 1.5 times the slowest return so far (restart to
averaging with others; before the first, the nodes' first start), so the
last restarted nodes take part again before the run ends; a node whose
restart finds every other node finished is "stranded".

Report (printed, and ``results.json`` in the run folder under ``--out``):

- rounds completed: the highest swarm round any node's records reached;
- rounds with a full roster: rounds r whose largest group (``participants``
  in the records of r) is as large as the number of nodes alive at r, i.e.
  training (started and not stopped) when the first record of r appeared;
  a node that is up but stuck, or behind and training alone, makes a round
  short;
- global weights: every round line of a node's log ends with a digest of its
  global weights (``phi``); all members that averaged round r (peers >= 2)
  must show the same digest, and all nodes the same one at the end (not
  checked for noloco, whose workers each keep their own);
- catch-up times, median and max over restarts: restart to the node's
  "caught up from ..." line, and restart to its first round averaged with
  others (participants >= 2) after that line (or after its start if it never
  needed to catch up); restarts that never got there are counted;
- non-finite values: every tensor of every node's final checkpoint
  (`lowcomm.checkpoint.load_state`) and every round record's loss (must be 0);
- final eval loss: the mean of the stop records of the nodes that finished
  (all of them, unless one was stranded); with ``--baseline`` the same run
  without kills follows in a new lab, its nodes with the churn run's
  identities (so the same peer ids and data orders), and the ratio churn /
  baseline is reported (target <= 1.03);
- processes and namespaces left behind after the lab is closed: every process
  the soak started carries ``LOWCOMM_CHURN_SOAK=<its pid>`` in its
  environment, found in /proc (must be 0), and this lab's namespaces (must be
  0); ``pgrep -x p2pd`` and ``pgrep -f 'lowcomm join'`` machine-wide are
  printed too (they include anyone else's nodes).

Progress: one line per swarm round (round, nodes alive, kills, restarts and
catch-ups in that round, seconds). Logs: ``<run>/<churn|baseline>/node<i>.log``
(all lives of a node, each restart marked by a ``=== churn_soak:`` line) and
``node<i>.jsonl``. Exit status 0 if every target is met, 1 if one is missed or
a run failed, 2 without root or namespaces, 130 on Ctrl+C; the lab is removed
on every exit path.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lowcomm.checkpoint import CheckpointError, load_state  # noqa: E402
from lowcomm.lab import LabError, NetLab, support_problem  # noqa: E402
from lowcomm.lab.netns import lab_namespaces, ns_pids  # noqa: E402
from lowcomm.sim.network import NetworkSpecError, format_bandwidth, parse_bandwidth  # noqa: E402

PORT = 31337
MARK = "LOWCOMM_CHURN_SOAK"  # in the environment of every process the soak starts
POLL_S = 0.25
TERM_GRACE_S = 60.0  # a SIGTERMed node must have left by then
DAEMON_GRACE_S = 10.0  # a dead node's daemon (and watchdog) must be gone by then
PEER_ID = re.compile(r"^peer id (\w+)", re.M)
CAUGHT_UP = re.compile(r"caught up from \S+ at step (\d+)")
RESUMED = re.compile(r"resumed from checkpoint at step (\d+)")
ROUND_LINE = re.compile(r"^round\s+(\d+) \| step\s+\d+ \| peers (\d+)/.*\| phi (\w+)\s*$", re.M)


def node_env() -> dict:
    # one thread per node: the nodes share this machine's cores
    return {"LOWCOMM_LOG": "info", **os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "400",
            "PYTHONPATH": str(ROOT), MARK: str(os.getpid())}


@dataclass
class Life:
    """One run of one node's process, from (re)start to exit. Times are seconds since the run began."""

    number: int
    started: float
    after: str | None  # the signal that ended the previous life; None for the first
    records: list[tuple[float, dict]] = field(default_factory=list)  # (seen at, record)
    training: float | None = None  # its start record appeared
    caught_up: list[tuple[float, int]] = field(default_factory=list)  # (seen at, step)
    phis: list[tuple[int, int, str]] = field(default_factory=list)  # (round, participants, phi digest) per round
    resumed_step: int | None = None
    synced: float | None = None  # first round averaged with others after catching up
    peer_id: str | None = None
    exit_code: int | None = None
    killed: bool = False  # the soak ended it


class SoakNode:
    """One node of the lab: its process, files and lives."""

    def __init__(self, i: int, folder: Path):
        self.i = i
        self.log = folder / f"node{i}.log"
        self.metrics = folder / f"node{i}.jsonl"
        self.ckpt = folder / f"ckpt{i}"
        self.proc: subprocess.Popen | None = None
        self.lives: list[Life] = []
        self.state = "new"  # starting, training, stopping, done, stranded
        self.stop_signal: str | None = None
        self.stopped_at = 0.0
        self.exited_at: float | None = None
        self._metrics_pos = 0
        self._partial = b""
        self._log_pos = 0

    @property
    def life(self) -> Life:
        return self.lives[-1]

    @property
    def peer_id(self) -> str | None:
        return self.lives[0].peer_id if self.lives else None

    def new_records(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        with open(self.metrics, "rb") as f:
            f.seek(self._metrics_pos)
            data = self._partial + f.read()
            self._metrics_pos = f.tell()
        *lines, self._partial = data.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def new_log(self) -> str:
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as f:
            f.seek(self._log_pos)
            data = f.read()
        cut = data.rfind(b"\n") + 1  # whole lines only
        self._log_pos += cut
        return data[:cut].decode(errors="replace")


class Soak:
    """One run of N nodes in ``lab``, with churn or without."""

    def __init__(self, lab: NetLab, args, folder: Path, churn: bool, identities: list[Path] | None = None):
        self.lab, self.args, self.folder, self.churn = lab, args, folder, churn
        self.identities = identities  # key files to run the nodes as (peer ids, hence data orders)
        self.n = len(lab.bandwidths)
        self.nodes = [SoakNode(i, folder) for i in range(self.n)]
        self.rng = random.Random(args.seed)
        self.t0 = time.monotonic()
        self.highest = 0  # highest swarm round in any record
        self.round_seen: dict[int, float] = {}  # round -> when it first appeared
        self.events: list[str] = []  # since the last progress line
        self.kills: list[dict] = []
        self.problems: list[str] = []  # things that look like bugs, with where to look
        self.rounds: list[tuple[int, int, dict]] = []  # (node, life, record) of every round record
        self.alive: dict[int, int] = {}  # round -> nodes training when its first record appeared
        self.behind = 0  # round records written after another node had written a later round
        self.next_kill: float | None = None  # when the kill of the current round is due
        self.unplanned = 0
        self.skipped: list[int] = []  # rounds whose kill never came: --max-down nodes were out all along

    def now(self) -> float:
        return time.monotonic() - self.t0

    # --- processes ---
    def argv(self, node: SoakNode, peers: list[str], first: bool) -> list[str]:
        a = self.args
        argv = [sys.executable, "-m", "lowcomm", "join", "--backend", a.backend, "--task", a.task,
                "--algorithm", a.algorithm, "--run-id", "churnsoak", "--sync-every", str(a.sync_every),
                "--max-steps", str(a.rounds * a.sync_every), "--checkpoint-every", str(a.checkpoint_every),
                "--listen", f"/ip4/{self.lab.addr(node.i)}/tcp/{PORT}", "--log-to", f"jsonl:{node.metrics}",
                "--checkpoint-dir", str(node.ckpt)]
        if first:
            argv += ["--wait-for", str(self.n)]
        if self.identities:
            argv += ["--identity", str(self.identities[node.i])]
        if peers:
            argv += ["--peers", ",".join(peers)]
        return argv

    def address(self, node: SoakNode) -> str:
        return f"/ip4/{self.lab.addr(node.i)}/tcp/{PORT}/p2p/{node.peer_id}"

    def start(self, node: SoakNode, peers: list[str], after: str | None) -> None:
        life = Life(len(node.lives), self.now(), after)
        with open(node.log, "a") as log:
            if node.lives:
                log.write(f"\n=== churn_soak: life {life.number} of node {node.i} at {life.started:.2f} s "
                          f"(after {after}), --peers {','.join(peers)}\n")
            log.flush()
            node.proc = self.lab.popen(node.i, self.argv(node, peers, not node.lives), stdout=log,
                                       stderr=subprocess.STDOUT, env=node_env(), start_new_session=True)
        node.lives.append(life)
        node.state = "starting"

    def start_all(self) -> None:
        first = self.nodes[0]
        self.start(first, [], None)
        deadline = time.monotonic() + 180
        while first.peer_id is None:
            self.poll_logs(first)
            if first.proc.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"node 0 did not start; see {first.log}")
            time.sleep(POLL_S)
        for node in self.nodes[1:]:
            self.start(node, [self.address(first)], None)

    def kill(self, node: SoakNode, sig: str) -> None:
        os.kill(node.proc.pid, getattr(signal, sig))  # `ip netns exec` execs: this is the node's python
        node.life.killed = True
        node.state, node.stop_signal, node.stopped_at = "stopping", sig, self.now()
        self.kills.append({"node": node.i, "signal": sig, "round": self.highest, "at": node.stopped_at,
                           "life": node.life.number})
        self.events.append(f"{sig} node {node.i}")

    def restart(self, node: SoakNode) -> None:
        live = [m for m in self.nodes if m is not node and m.state == "training"]
        others = live or [m for m in self.nodes if m is not node]
        peers = [self.address(m) for m in self.rng.sample(others, min(3, len(others)))]
        self.start(node, peers, node.stop_signal)
        self.events.append(f"restart {node.i}")

    def finish_stopping(self, node: SoakNode) -> None:
        """A stopped node whose process and daemon are gone is started again."""
        code = node.proc.poll()
        if code is None:
            if self.now() - node.stopped_at > TERM_GRACE_S:
                self.problems.append(f"node {node.i} (life {node.life.number}) still ran {TERM_GRACE_S:.0f} s after "
                                     f"{node.stop_signal}; SIGKILLed it; see {node.log}")
                node.proc.kill()
            return
        if node.exited_at is None:
            node.exited_at, node.life.exit_code = self.now(), code
            if node.stop_signal == "SIGTERM" and code != 0:
                self.problems.append(f"node {node.i} (life {node.life.number}) exited {code} after SIGTERM "
                                     f"(expected 0); see {node.log}")
        left = ns_pids(self.lab.ns(node.i))
        if left:  # its daemon and the daemon's watchdog should follow it within seconds
            if self.now() - node.exited_at < DAEMON_GRACE_S:
                return
            self.problems.append(f"node {node.i} (life {node.life.number}) left {[_comm(p) for p in left]} running "
                                 f"{DAEMON_GRACE_S:.0f} s after its process exited ({node.stop_signal}); killed them")
            for p in left:
                _signal(p, signal.SIGKILL)
            return
        node.exited_at = None
        self.drain(node)  # the last lines of the life that ended
        if all(m.state == "done" for m in self.nodes if m is not node):
            node.state = "stranded"  # nobody left to rejoin
            self.problems.append(f"node {node.i} could not rejoin (life {node.life.number} ended by "
                                 f"{node.stop_signal}): every other node had finished")
            return
        self.restart(node)

    # --- reading the nodes' files ---
    def poll_logs(self, node: SoakNode) -> None:
        text = node.new_log()
        if not text:
            return
        life = node.life
        if life.peer_id is None and (m := PEER_ID.search(text)):
            life.peer_id = m.group(1)
            if node.peer_id != life.peer_id:
                self.problems.append(f"node {node.i} came back as {life.peer_id}, not {node.peer_id}")
        for m in ROUND_LINE.finditer(text):
            life.phis.append((int(m.group(1)), int(m.group(2)), m.group(3)))
        for m in CAUGHT_UP.finditer(text):
            life.caught_up.append((self.now(), int(m.group(1))))
            self.events.append(f"node {node.i} caught up at step {m.group(1)}")
        if life.resumed_step is None and (m := RESUMED.search(text)):
            life.resumed_step = int(m.group(1))

    def drain(self, node: SoakNode) -> None:
        """Read what ``node`` wrote since the last call: log lines and metrics records."""
        self.poll_logs(node)
        life = node.life
        for rec in node.new_records():
            seen = self.now()
            life.records.append((seen, rec))
            if rec.get("event") == "start":
                life.training = seen
                if node.state == "starting":
                    node.state = "training"
                continue
            if "event" in rec:
                continue
            r = rec["round"]
            self.rounds.append((node.i, life.number, rec))
            self.behind += r < self.highest
            if life.synced is None and rec["participants"] >= 2 and (
                    not life.caught_up or life.caught_up[0][0] <= seen):
                life.synced = seen
            if r > self.highest:
                self.new_round(r)

    def poll(self) -> None:
        for node in self.nodes:
            if not node.lives:
                continue
            self.drain(node)
            if node.state in ("starting", "training"):
                code = node.proc.poll()
                if code is not None:
                    self.drain(node)  # what it wrote before it exited
                    life = node.life
                    life.exit_code = code
                    stopped = any(rec.get("event") == "stop" for _, rec in life.records)
                    if code == 0 and stopped:
                        node.state = "done"
                    else:
                        self.unplanned += 1
                        self.problems.append(f"node {node.i} (life {life.number}) exited {code} on its own; "
                                             f"see {node.log}")
                        if self.unplanned > 3 * self.n:
                            raise LabError(f"{self.unplanned} nodes died on their own; see {self.folder}")
                        node.stop_signal, node.stopped_at = f"exit {code}", self.now()
                        node.state = "stopping"
            if node.state == "stopping":
                self.finish_stopping(node)

    # --- the run ---
    def new_round(self, r: int) -> None:
        if self.next_kill is not None:  # the last round's kill is still due: now, or never
            self.next_kill = 0.0
            if not self.maybe_kill():
                self.skipped.append(self.highest)
                self.events.append(f"no kill ({self.args.max_down} down)")
                self.next_kill = None
        now = self.now()
        last = self.round_seen.get(self.highest, 0.0)
        alive = sum(1 for m in self.nodes if m.state == "training")
        for k in range(self.highest + 1, r + 1):
            self.round_seen[k], self.alive[k] = now, alive
        what = "; ".join(self.events) or "-"
        self.events = []
        print(f"  round {r:3d} | alive {alive}/{self.n} | {what} | {now:7.1f} s (+{now - last:.1f} s)", flush=True)
        self.highest = r
        times = sorted(self.round_seen.values())
        gaps = [b - a for a, b in zip(times, times[1:])]
        if self.churn and r <= self.args.rounds - self.args.calm_rounds:
            # a victim must have time to come back before the run ends: the rounds left, at the
            # quickest round so far, must take 1.5 times the slowest return so far (before the
            # first return, the nodes' first start to their first round with others)
            back = [life.synced - life.started for m in self.nodes for life in m.lives[1:] if life.synced]
            first = [m.lives[0].synced - m.lives[0].started for m in self.nodes if m.lives[0].synced]
            back = back or ([median(first)] if first else [])
            if not gaps or not back or (self.args.rounds - r) * min(gaps) > 1.5 * max(back):
                self.next_kill = now + self.rng.random() * (median(gaps) if gaps else 0.0)

    def maybe_kill(self) -> bool:
        """Kill a node if one is due and fewer than ``--max-down`` are out; whether one was killed."""
        if self.next_kill is None or self.now() < self.next_kill:
            return False
        # in the swarm: training, and it has averaged with others since it (re)started
        candidates = [m for m in self.nodes if m.state == "training" and m.life.synced is not None]
        out = sum(1 for m in self.nodes if m.state != "done" and m not in candidates)
        if not candidates or out >= self.args.max_down:
            return False  # still due
        self.next_kill = None
        victim = self.rng.choice(candidates)
        if self.args.signals == "alternate":
            sig = ("SIGKILL", "SIGTERM")[len(self.kills) % 2]
        else:
            sig = self.rng.choice(("SIGKILL", "SIGTERM"))
        self.kill(victim, sig)
        return True

    def run(self) -> dict:
        label = "churn" if self.churn else "baseline"
        print(f"{label}: {self.n} nodes, {self.args.rounds} rounds of H={self.args.sync_every}; logs in {self.folder}",
              flush=True)
        self.start_all()
        last_progress = time.monotonic()
        highest = 0
        while not all(m.state in ("done", "stranded") for m in self.nodes):
            self.poll()
            self.maybe_kill()
            if self.highest != highest:
                highest, last_progress = self.highest, time.monotonic()
            stalled = time.monotonic() - last_progress
            if stalled > self.args.stall:
                states = ", ".join(f"{m.i}: {m.state}" for m in self.nodes)
                raise LabError(f"{label}: no new round for {stalled:.0f} s at round {self.highest} ({states}); "
                               f"see {self.folder}")
            if self.now() > self.args.timeout:
                raise LabError(f"{label}: not done after {self.args.timeout:.0f} s; see {self.folder}")
            time.sleep(POLL_S)
        if self.events:
            print(f"  end       | {'; '.join(self.events)} | {self.now():7.1f} s", flush=True)
        return self.summary()

    # --- the report ---
    def summary(self) -> dict:
        participants: dict[int, int] = {}
        for _, _, rec in self.rounds:
            participants[rec["round"]] = max(participants.get(rec["round"], 0), rec["participants"])
        full = [r for r in participants if participants[r] >= self.alive.get(r, self.n)]
        # every member that averaged round r (participants >= 2) holds the same global weights, bit for bit
        phis: dict[int, set[str]] = {}
        for m in self.nodes:
            for life in m.lives:
                for r, k, phi in life.phis:
                    if k >= 2:
                        phis.setdefault(r, set()).add(phi)
        split = sorted(r for r, seen in phis.items() if len(seen) > 1)
        final_phis = {m.life.phis[-1][2] for m in self.nodes if m.life.phis}
        nonfinite_records = [(i, n, rec["round"]) for i, n, rec in self.rounds
                             if rec.get("loss") is None or not math.isfinite(rec["loss"])]
        nonfinite_records += [(m.i, life.number, "stop") for m in self.nodes for life in m.lives
                              for _, rec in life.records if rec.get("event") == "stop" and rec.get("eval_loss") is None]
        restarts = [life for m in self.nodes for life in m.lives[1:]]
        to_caught = [life.caught_up[0][0] - life.started for life in restarts if life.caught_up]
        to_synced = [life.synced - life.started for life in restarts if life.synced is not None]
        mid_run = [(m.i, life.number, step) for m in self.nodes for life in m.lives
                   for t, step in life.caught_up if any(rec.get("event") is None and seen < t
                                                        for seen, rec in life.records)]
        finals = [next((rec for _, rec in reversed(m.life.records) if rec.get("event") == "stop"), None)
                  for m in self.nodes if m.state == "done"]
        eval_losses = [rec["eval_loss"] for rec in finals if rec is not None and rec["eval_loss"] is not None]
        finished = len(eval_losses)
        checkpoints = {m.i: nonfinite_tensors(m.ckpt / "node") for m in self.nodes}
        return {
            "rounds_completed": self.highest,
            "rounds_recorded": len(participants),
            "rounds_full_roster": len(full),
            "rounds_not_full": {r: [participants[r], self.alive.get(r)] for r in sorted(set(participants) - set(full))},
            "alive_per_round": self.alive,
            "records_behind": self.behind,
            "rounds_phi_split": split,
            "final_phi_distinct": len(final_phis),
            "kills": self.kills,
            "rounds_without_kill": self.skipped,
            "restarts": len(restarts),
            "restart_to_caught_up_s": _spread(to_caught),
            "restart_to_synced_s": _spread(to_synced),
            "restarts_never_caught_up": sum(1 for life in restarts if not life.caught_up),
            "restarts_never_synced": sum(1 for life in restarts if life.synced is None and not life.killed),
            "lives": [{"node": m.i, "life": life.number, "after": life.after, "started": life.started,
                       "resumed_step": life.resumed_step,
                       "training_s": None if life.training is None else life.training - life.started,
                       "caught_up": [[t - life.started, s] for t, s in life.caught_up],
                       "synced_s": None if life.synced is None else life.synced - life.started,
                       "exit_code": life.exit_code} for m in self.nodes for life in m.lives[1:]],
            "catchups_mid_run": mid_run,
            "nonfinite_records": nonfinite_records,
            "checkpoints": checkpoints,
            "nonfinite_checkpoints": sum(1 for v in checkpoints.values() if v != 0),
            "eval_losses": eval_losses,
            "eval_loss": mean(eval_losses) if eval_losses else None,  # of the nodes that finished
            "finished": finished,
            "stranded": [m.i for m in self.nodes if m.state == "stranded"],
            "problems": self.problems,
            "wall_s": self.now(),
        }


def nonfinite_tensors(path: Path) -> int | str:
    """How many tensors of the checkpoint at ``path`` hold a NaN or an inf (a string if it cannot be read)."""
    try:
        state, _ = load_state(path)
    except (CheckpointError, OSError) as e:
        return f"unreadable: {e}"
    bad, stack = 0, [state]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            bad += int(obj.is_floating_point() and not bool(torch.isfinite(obj).all()))
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return bad


def _spread(values: list[float]) -> dict:
    return {"n": len(values), "median": median(values) if values else None, "max": max(values) if values else None}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def leftovers() -> dict:
    """Processes the soak started (by the mark in their environment) and lab namespaces still there."""
    mark = f"{MARK}={os.getpid()}".encode()
    ours = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                ours.append(f"{entry.name} {_comm(int(entry.name))}")
        except OSError:
            pass

    def pgrep(*a: str) -> int:
        return len(subprocess.run(["pgrep", *a], capture_output=True, text=True).stdout.split())

    return {"processes": ours, "namespaces": lab_namespaces(os.getpid()),
            "machine_p2pd": pgrep("-x", "p2pd"), "machine_lowcomm_join": pgrep("-f", "lowcomm join")}


def run_one(args, rates: list[float], folder: Path, churn: bool, identities: list[Path] | None = None) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    with NetLab(rates) as lab:
        result = Soak(lab, args, folder, churn, identities).run()
    result["left_behind"] = leftovers()
    return result


def report(results: dict) -> list[tuple[str, bool]]:
    """Print the table; return (target, met) pairs."""
    a, runs = results["args"], results["runs"]
    print(f"\nchurn soak: {a['nodes']} nodes at {a['bandwidth']}, {a['task']} {a['algorithm']} ({a['backend']}), "
          f"{a['rounds']} rounds of H={a['sync_every']}, seed {a['seed']}; {results['date']}, {results['machine']}\n")
    names = list(runs)
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))

    def row(label: str, fmt) -> None:
        print(f"| {label} | " + " | ".join(fmt(runs[n]) for n in names) + " |")

    def spread(key: str):
        return lambda r: ("-" if not r[key]["n"] else
                          f"{r[key]['median']:.1f} / {r[key]['max']:.1f} s ({r[key]['n']})")

    row("rounds completed", lambda r: f"{r['rounds_completed']} / {a['rounds']}")
    row("rounds with a full roster", lambda r: f"{r['rounds_full_roster']} / {r['rounds_recorded']}")
    row("kills (SIGKILL / SIGTERM; rounds without)", lambda r: f"{sum(k['signal'] == 'SIGKILL' for k in r['kills'])}"
        f" / {sum(k['signal'] == 'SIGTERM' for k in r['kills'])}; {len(r['rounds_without_kill'])}")
    row("restart -> caught up, median / max", spread("restart_to_caught_up_s"))
    row("restart -> first round with others", spread("restart_to_synced_s"))
    row("restarts with no catch-up / never back", lambda r: f"{r['restarts_never_caught_up']} / "
                                                           f"{r['restarts_never_synced']}")
    row("records of nodes behind the swarm", lambda r: str(r["records_behind"]))
    row("catch-ups after a node's first round", lambda r: str(len(r["catchups_mid_run"])))
    row("rounds whose members' weights differ", lambda r: str(len(r["rounds_phi_split"])))
    row("distinct final global weights", lambda r: str(r["final_phi_distinct"]))
    row("non-finite: checkpoints / round losses", lambda r: f"{r['nonfinite_checkpoints']} / "
                                                            f"{len(r['nonfinite_records'])}")
    row("final eval loss (mean of the nodes that finished)",
        lambda r: "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f} ({r['finished']})")
    row("wall clock", lambda r: f"{r['wall_s']:.0f} s")
    row("left behind: processes / namespaces", lambda r: f"{len(r['left_behind']['processes'])} / "
                                                         f"{len(r['left_behind']['namespaces'])}")
    row("machine-wide p2pd / lowcomm join", lambda r: f"{r['left_behind']['machine_p2pd']} / "
                                                      f"{r['left_behind']['machine_lowcomm_join']}")
    churn = runs.get("churn")
    targets: list[tuple[str, bool]] = []
    if churn:
        targets += [(f"rounds completed = {a['rounds']}", churn["rounds_completed"] >= a["rounds"]),
                    ("non-finite weights or losses = 0",
                     churn["nonfinite_checkpoints"] == 0 and not churn["nonfinite_records"]),
                    ("every restarted node averaged with the others again and finished",
                     churn["restarts_never_synced"] == 0 and churn["finished"] == a["nodes"])]
    if churn and a["algorithm"] != "noloco":  # noloco's workers each keep global weights of their own
        targets += [("members of every round hold the same global weights", not churn["rounds_phi_split"]),
                    ("every node ends with the same global weights", churn["final_phi_distinct"] == 1)]
    base = runs.get("baseline")
    if churn and base and churn["eval_loss"] is not None and base["eval_loss"] is not None:
        ratio = churn["eval_loss"] / base["eval_loss"]
        results["eval_loss_ratio"] = ratio
        print(f"\neval loss with churn / without: {churn['eval_loss']:.4f} / {base['eval_loss']:.4f} = {ratio:.4f}")
        targets.append(("eval loss ratio <= 1.03", ratio <= 1.03))
    for name, r in runs.items():
        targets.append((f"{name}: nothing left behind", not r["left_behind"]["processes"] and
                        not r["left_behind"]["namespaces"]))
        for p in r["problems"]:
            print(f"  {name} problem: {p}")
    print()
    for name, met in targets:
        print(f"  {'met   ' if met else 'MISSED'}  {name}")
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    parser.add_argument("--nodes", type=int, default=8, help="number of nodes (default 8)")
    parser.add_argument("--bandwidth", default="50Mbit", help="every node's link, each way (default 50Mbit)")
    parser.add_argument("--rounds", type=int, default=30, help="outer rounds (default 30); --max-steps is rounds*H")
    parser.add_argument("--sync-every", type=int, default=100,
                        help="H, inner steps per round (default 100: see the rounds and restarts above)")
    parser.add_argument("--task", default="tinylm", help="a built-in task (default tinylm)")
    parser.add_argument("--algorithm", default="diloco", help="outer algorithm (default diloco)")
    parser.add_argument("--backend", default="hivemind", choices=["hivemind", "libp2p"])
    parser.add_argument("--seed", type=int, default=0, help="seed of the choice of victims, signals and delays")
    parser.add_argument("--signals", default="alternate", choices=["alternate", "random"],
                        help="SIGKILL and SIGTERM in turn (default) or at random")
    parser.add_argument("--max-down", type=int, default=0,
                        help="kill only while fewer nodes than this are out (stopping, starting or catching up; "
                             "default 0: a quarter of --nodes, at least 1)")
    parser.add_argument("--calm-rounds", type=int, default=2,
                        help="no kills in the last this many rounds (default 2)")
    parser.add_argument("--checkpoint-every", type=int, default=5,
                        help="rounds between a node's checkpoints (default 5)")
    parser.add_argument("--baseline", action="store_true", help="then run the same nodes and rounds without kills")
    parser.add_argument("--stall", type=float, default=300, help="fail if no new round for this many seconds")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one run may take (default 3600)")
    parser.add_argument("--out", default="runs/churn_soak", help="folder for logs and results.json")
    args = parser.parse_args()

    problem = support_problem()
    if problem:
        print(f"churn_soak: {problem}", file=sys.stderr)
        raise SystemExit(2)
    if args.nodes < 2 or args.rounds < 1 or args.sync_every < 1:
        raise SystemExit("churn_soak: --nodes must be >= 2, --rounds and --sync-every >= 1")
    args.max_down = args.max_down or max(1, args.nodes // 4)
    try:
        rate = parse_bandwidth(args.bandwidth)
    except NetworkSpecError as e:
        raise SystemExit(f"churn_soak: --bandwidth: {e}") from None
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = (Path(args.out) / f"{args.nodes}x{args.bandwidth}-{args.rounds}r-{stamp}").resolve()

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    results = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "args": vars(args), "runs": {}}
    print(f"churn_soak: {args.nodes} nodes on {format_bandwidth(rate)} links each way; results in {run_dir}",
          flush=True)
    try:
        results["runs"]["churn"] = run_one(args, [rate] * args.nodes, run_dir / "churn", churn=True)
        if args.baseline:
            # the same peer ids as the churn run, hence the same data order on every node
            keys = [run_dir / "churn" / f"ckpt{i}" / "identity.key" for i in range(args.nodes)]
            results["runs"]["baseline"] = run_one(args, [rate] * args.nodes, run_dir / "baseline", churn=False,
                                                  identities=keys)
    except KeyboardInterrupt:
        print("churn_soak: interrupted; the lab is removed", file=sys.stderr)
        raise SystemExit(130)
    except LabError as e:
        print(f"churn_soak: {e}", file=sys.stderr)
        raise SystemExit(1)
    targets = report(results)
    results["targets"] = [{"target": name, "met": met} for name, met in targets]
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {run_dir / 'results.json'}")
    raise SystemExit(0 if all(met for _, met in targets) else 1)


if __name__ == "__main__":
    main()
