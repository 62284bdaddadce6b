"""A network lab: processes in Linux network namespaces on kernel-shaped links.

    with NetLab([mbit(10)] * 4) as lab:         # 4 nodes, 10 Mbit/s each way
        proc = lab.popen(0, ["lowcomm", "join", "--listen", f"/ip4/{lab.addr(0)}/tcp/31337"])

Every node gets a namespace of its own with one interface (``eth0``,
``198.18.0.<i+1>/16``) joined to a bridge that lives in one more namespace, so
nothing of the host's own networking is touched. Each node's link is shaped
in both directions by a token bucket (``tc qdisc ... tbf``): on the node's
side of its link for what it sends, on the bridge's side for what it
receives. Addresses come from 198.18.0.0/15, the range set aside for network
benchmarks (RFC 2544).

This kernel has no ``netem`` qdisc, so the lab adds no latency: a link is a
bandwidth and the few microseconds of the kernel's own path.

`close` (also on context exit) kills every process in the lab's namespaces,
which removes what they started there too, and deletes the namespaces, which
removes the links. Namespaces left by a lab that was SIGKILLed are named
``lcl-<pid>-...``; `remove_stale` deletes those of dead pids.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

PREFIX = "lcl-"
SUBNET = "198.18.0.{}/16"
NETNS_DIR = Path("/var/run/netns")


class LabError(RuntimeError):
    """The lab cannot run here (no root, no namespaces, no tc), or a command failed."""


def mbit(value: float) -> float:
    return value * 1e6


def _ip(*args: str) -> None:
    _run(["ip", *args])


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {done.stderr.strip() or done.stdout.strip()}")


def support_problem() -> str | None:
    """Why the lab cannot run on this machine, in one line, or None if it can."""
    if os.geteuid() != 0:
        return "the network lab needs root (network namespaces and tc); run it with sudo"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the network lab needs `{tool}` (package iproute2)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode != 0:
        return f"this machine cannot make network namespaces: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def tbf_args(rate: float) -> list[str]:
    """A token bucket for ``rate`` bits/s: a burst of at least 4 ms of traffic
    (the kernel needs rate / HZ) and a queue of 100 ms, so TCP keeps the link full."""
    burst = max(32 * 1024, int(rate / 8 * 0.004))
    return ["tbf", "rate", f"{int(rate)}bit", "burst", str(burst), "latency", "100ms"]


def ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _kill_all(namespaces: list[str], grace: float) -> None:
    """SIGTERM every process in ``namespaces``, SIGKILL what is left after ``grace`` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        pids = [p for ns in namespaces for p in ns_pids(ns)]
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = [p for ns in namespaces for p in ns_pids(ns)]
            if pids:
                time.sleep(0.05)


def _delete(namespaces: list[str]) -> None:
    for ns in namespaces:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def lab_namespaces(pid: int | None = None) -> list[str]:
    """The lab namespaces on this machine (of the lab of ``pid`` if given)."""
    if not NETNS_DIR.exists():
        return []
    owner = str(pid) if pid is not None else r"\d+"
    pattern = re.compile(f"^{PREFIX}{owner}-")
    return sorted(p.name for p in NETNS_DIR.iterdir() if pattern.match(p.name))


def remove_stale() -> list[str]:
    """Delete the namespaces (and kill the processes) of labs whose process is gone."""
    stale = []
    for ns in lab_namespaces():
        pid = int(ns[len(PREFIX):].split("-")[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            stale.append(ns)
        except PermissionError:
            pass
    _kill_all(stale, grace=1.0)
    _delete(stale)
    return stale


class NetLab:
    """``len(bandwidths)`` nodes, node ``i`` on a link of ``bandwidths[i]`` bits/s each way."""

    def __init__(self, bandwidths: list[float]):
        if not bandwidths:
            raise ValueError("a lab needs at least one node")
        if len(bandwidths) > 250:
            raise ValueError(f"a lab has at most 250 nodes, got {len(bandwidths)}")
        if any(not b > 0 for b in bandwidths):
            raise ValueError(f"bandwidths must be positive, got {bandwidths}")
        self.bandwidths = list(bandwidths)
        self.tag = f"{PREFIX}{os.getpid()}"
        self.bridge = f"{self.tag}-br"
        self.procs: list[subprocess.Popen] = []
        self._made: list[str] = []
        self._closed = False

    def ns(self, i: int) -> str:
        return f"{self.tag}-{i}"

    def addr(self, i: int) -> str:
        return SUBNET.format(i + 1).split("/")[0]

    def start(self) -> NetLab:
        problem = support_problem()
        if problem:
            raise LabError(problem)
        try:
            self._make(self.bridge)
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
            for i, rate in enumerate(self.bandwidths):
                ns, port = self.ns(i), f"p{i}"
                self._make(ns)
                _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", self.bridge)
                _ip("-n", ns, "addr", "add", SUBNET.format(i + 1), "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", self.bridge, "link", "set", port, "master", "br0")
                _ip("-n", self.bridge, "link", "set", port, "up")
                self.shape(i, rate)
        except BaseException:
            self.close()
            raise
        return self

    def _make(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def shape(self, i: int, rate: float) -> None:
        """Set node ``i``'s link to ``rate`` bits/s each way (now, also while it runs)."""
        _run(["tc", "-n", self.ns(i), "qdisc", "replace", "dev", "eth0", "root", *tbf_args(rate)])
        _run(["tc", "-n", self.bridge, "qdisc", "replace", "dev", f"p{i}", "root", *tbf_args(rate)])
        self.bandwidths[i] = rate

    def popen(self, i: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in node ``i``'s namespace (arguments as for `subprocess.Popen`)."""
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(i), *argv], **kwargs)
        self.procs.append(proc)
        return proc

    def close(self, grace: float = 10.0) -> None:
        """Stop every process in the lab (SIGTERM, then SIGKILL after ``grace`` s) and remove it."""
        if self._closed:
            return
        self._closed = True
        _kill_all(self._made, grace)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        _delete(self._made)

    def __enter__(self) -> NetLab:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
