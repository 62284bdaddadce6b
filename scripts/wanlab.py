"""The network lab: real nodes on kernel-shaped links, measured against `lowcomm simulate`.

    sudo python scripts/wanlab.py --nodes 4 --bandwidth 10Mbit --algorithms ddp,diloco,streaming
    sudo python scripts/wanlab.py --nodes 4 --bandwidth 100Mbit --slow 3=10Mbit --algorithms diloco

Each node is a network namespace on a bridge (`lowcomm.lab`), its link shaped
both ways by a token bucket at ``--bandwidth`` (``--slow I=RATE`` gives node I
another rate). Addresses are 198.18.0.0/15. This kernel has no ``netem``, so
links add no latency: the simulator is given the transport's own latency
per message hop, half the median round trip of a 1-byte request that the
script measures first (with one 5 MB transfer: the goodput of one flow).

Per algorithm:

- ``ddp``: torch's own DistributedDataParallel over gloo (`lowcomm.lab.ddp`),
  one rank per node: bucketed all-reduce overlapping the backward pass.
- ``lowcomm-ddp``: lowcomm's `DataParallel` over the real swarm, beside it
  (predicted as ``ddp``, whose model is torch's).
- ``diloco``, ``streaming``, ``noloco``, ``sparseloco``: N real ``lowcomm join``
  nodes (``--backend``), started together (``--wait-for N``), each writing its
  per-round metrics (``--log-to jsonl:...``).

Measured per node: wall clock from the first step to the end of the last,
compute time, time blocked waiting for averaging, bytes sent and received
(lowcomm's count and the interface's), seconds per round and participants
per round. Then ``lowcomm simulate`` with the same task, workers, steps, H,
codec and bandwidth, and the step time (and backward share) the lab
measured, predicts the wall clock and compute utilisation; the script prints
both and their ratio. The lab's nodes share this machine's cores and compute
at somewhat different speeds, while the simulator's workers are alike: a
synchronous swarm goes at the pace of its slowest member, so the simulator
gets the slowest node's step time, and its predicted utilisation is set
beside that node's. Their compute per step also varies from round to round,
and a round waits for whichever member is slow in it: the simulator gets the
spread the lab measured between the nodes' rounds as ``--step-time-jitter``
(`step_jitter`; torch DDP times no rounds, so its prediction has none).
Results go to ``--out`` as JSON.

Needs root and network namespaces; without them it says so in one line and
exits 2. Everything it makes is removed on exit, on Ctrl+C and on failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, median, pstdev

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lowcomm.lab import LabError, NetLab, support_problem  # noqa: E402
from lowcomm.sim.network import NetworkSpecError, format_bandwidth, parse_bandwidth  # noqa: E402

JOIN_ALGORITHMS = ("diloco", "streaming", "noloco", "sparseloco")
PORT = 31337


def interface_bytes(lab: NetLab, i: int) -> tuple[int, int]:
    """(bytes sent, bytes received) so far on node ``i``'s interface."""
    out = subprocess.run(["ip", "-n", lab.ns(i), "-s", "-j", "link", "show", "eth0"], capture_output=True,
                         text=True, check=True).stdout
    stats = json.loads(out)[0]["stats64"]
    return stats["tx"]["bytes"], stats["rx"]["bytes"]


def node_env() -> dict:
    # one core's worth of threads per process: the lab's nodes share this machine's cores
    return {"LOWCOMM_LOG": "info", **os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "400",
            "PYTHONPATH": str(ROOT)}


def wait_all(procs: list[subprocess.Popen], timeout: float, what: str) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            raise LabError(f"{what} did not finish within {timeout:.0f} s") from None
    return codes


def probe_link(lab: NetLab, args) -> dict:
    """One 5 MB request from node 1 to node 0 through the real transport, and
    the median of 50 one-byte round trips: the link's goodput for one flow and
    the transport's own latency per message hop (half a round trip)."""
    probe = [sys.executable, "-m", "lowcomm.lab.probe"]
    server = lab.popen(0, [*probe, "serve", "--backend", args.backend, "--listen", f"/ip4/{lab.addr(0)}/tcp/0"],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=node_env())
    try:
        addr = json.loads(server.stdout.readline())["addr"]
        sender = lab.popen(1, [*probe, "send", "--backend", args.backend, "--peer", addr, "--bytes", "5000000",
                               "--pings", "50", "--listen", f"/ip4/{lab.addr(1)}/tcp/0"],
                           stdout=subprocess.PIPE, text=True, env=node_env())
        out, _ = sender.communicate(timeout=300)
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        server.stdin.close()
        server.wait(60)
    return {"goodput_bps": result["bytes"] * 8 / result["seconds"], "round_trip_s": result["round_trip_s"]}


def run_ddp(lab: NetLab, args, run_dir: Path, impl: str = "torch") -> dict:
    """Data-parallel training, one rank per node: torch DDP over gloo, or
    lowcomm's DataParallel over the swarm (``impl="lowcomm"``)."""
    n = len(lab.bandwidths)
    name = "ddp" if impl == "torch" else "lowcomm-ddp"
    rendezvous = run_dir / f"{name}.addr"
    rendezvous.unlink(missing_ok=True)
    before = [interface_bytes(lab, i) for i in range(n)]
    procs = []
    for r in range(n):
        log = open(run_dir / f"{name}-rank{r}.log", "w")
        port = 29500 if impl == "torch" else PORT
        procs.append(lab.popen(r, [sys.executable, "-m", "lowcomm.lab.ddp", "--rank", str(r), "--world", str(n),
                                   "--master", f"{lab.addr(0)}:{port}", "--task", args.task, "--impl", impl,
                                   "--backend", args.backend, "--rendezvous", str(rendezvous),
                                   "--ifaddr", lab.addr(r), "--steps", str(args.steps),
                                   "--out", str(run_dir / f"{name}-rank{r}.json")],
                               stdout=log, stderr=subprocess.STDOUT, env=node_env()))
    codes = wait_all(procs, args.timeout, name)
    if any(codes):
        raise LabError(f"a {name} rank failed (exit codes {codes}); see {run_dir}/{name}-rank*.log")
    after = [interface_bytes(lab, i) for i in range(n)]
    nodes = []
    for r in range(n):
        d = json.loads((run_dir / f"{name}-rank{r}.json").read_text())
        compute = d["compute_step_s"] * d["steps"]
        nodes.append({"node": r, "wall_s": d["wall_s"], "compute_s": compute, "wait_s": d["wall_s"] - compute,
                      "compute_step_s": d["compute_step_s"], "backward_share": d["backward_share"],
                      "wire_sent": after[r][0] - before[r][0], "wire_received": after[r][1] - before[r][1],
                      "bytes_sent": d.get("bytes_sent"), "round_s": median(d["step_s"]),
                      "participants": d.get("participants", n),
                      "final_loss": d["final_loss"]})
    return {"nodes": nodes}


def run_join(lab: NetLab, algorithm: str, args, run_dir: Path) -> dict:
    """N `lowcomm join` nodes started together; their per-round metrics."""
    n = len(lab.bandwidths)
    common = ["--backend", args.backend, "--task", args.task, "--algorithm", algorithm, "--run-id", "wanlab",
              "--max-steps", str(args.steps), "--wait-for", str(n), "--checkpoint-every", "1000000"]
    if args.sync_every:
        common += ["--sync-every", str(args.sync_every)]
    before = [interface_bytes(lab, i) for i in range(n)]
    procs, logs = [], []

    def start(i: int, extra: list[str]) -> None:
        log_path = run_dir / f"{algorithm}-node{i}.log"
        logs.append(log_path)
        metrics = run_dir / f"{algorithm}-node{i}.jsonl"
        metrics.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "lowcomm", "join", *common, *extra,
                "--listen", f"/ip4/{lab.addr(i)}/tcp/{PORT}", "--log-to", f"jsonl:{metrics}",
                "--checkpoint-dir", str(run_dir / f"{algorithm}-ckpt{i}")]
        procs.append(lab.popen(i, argv, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, env=node_env()))

    start(0, [])
    deadline = time.monotonic() + 120
    peer_id = None
    while peer_id is None:
        m = re.search(r"peer id (\w+)", logs[0].read_text())
        if m:
            peer_id = m.group(1)
        elif procs[0].poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the first node did not start; see {logs[0]}")
        else:
            time.sleep(0.2)
    bootstrap = f"/ip4/{lab.addr(0)}/tcp/{PORT}/p2p/{peer_id}"
    for i in range(1, n):
        start(i, ["--peers", bootstrap])
    codes = wait_all(procs, args.timeout, f"{algorithm} nodes")
    if any(codes):
        raise LabError(f"a {algorithm} node failed (exit codes {codes}); see {run_dir}/{algorithm}-node*.log")
    after = [interface_bytes(lab, i) for i in range(n)]
    nodes = []
    for i in range(n):
        records = [json.loads(line) for line in (run_dir / f"{algorithm}-node{i}.jsonl").read_text().splitlines()]
        rounds = [r for r in records if "event" not in r]
        start_rec = next(r for r in records if r.get("event") == "start")
        last = rounds[-1]
        steps = last["step"] - start_rec["step"]
        times = [b["t"] - a["t"] for a, b in zip([start_rec, *rounds], rounds)]
        # compute seconds per step in each round (the spread across nodes is what makes rounds wait)
        per_step = [(b["compute_s"] - a.get("compute_s", 0.0)) / max(b["step"] - a["step"], 1)
                    for a, b in zip([start_rec, *rounds], rounds)]
        nodes.append({"node": i, "wall_s": last["t"] - start_rec["t"], "compute_s": last["compute_s"],
                      "wait_s": last["wait_s"], "compute_step_s": last["compute_s"] / max(steps, 1),
                      "steps": steps, "wire_sent": after[i][0] - before[i][0],
                      "wire_received": after[i][1] - before[i][1], "bytes_sent": last["bytes_sent"],
                      "bytes_received": last["bytes_received"], "round_s": median(times),
                      "participants": mean(r["participants"] for r in rounds), "rounds": len(rounds),
                      "round_step_s": per_step, "round_steps": [b["step"] - a["step"] for a, b
                                                                in zip([start_rec, *rounds], rounds)],
                      "final_loss": last["loss"]})
    return {"nodes": nodes}


def step_jitter(nodes: list[dict]) -> float:
    """The simulator's ``--step-time-jitter`` for a run of `run_join`: how far the
    nodes' compute per step spreads across nodes within a round, as a coefficient
    of variation per step.

    A synchronous round waits for its slowest member, so what costs wall clock
    is the spread between nodes in the same round, not a slowdown all share
    (the lab's nodes share cores: contention slows them together). So: for each
    round (the first, with start-up, left out), each node's compute per step
    relative to the round's mean over nodes; their standard deviation (n / (n-1)
    corrected) is the spread of a round of k steps, and times sqrt(k) that of
    one step (the simulator draws steps independently). 0 when there are too
    few rounds or nodes to tell."""
    rounds = min(len(n["round_step_s"]) for n in nodes)
    if len(nodes) < 2 or rounds < 3:
        return 0.0
    devs = []
    for r in range(1, rounds):
        col = [n["round_step_s"][r] for n in nodes]
        m = mean(col)
        devs += [(x - m) / m for x in col if m > 0]
    cv = pstdev(devs) * math.sqrt(len(nodes) / (len(nodes) - 1))
    k = mean(n["round_steps"][r] for n in nodes for r in range(1, rounds))
    return cv * math.sqrt(k)


def simulate(algorithm: str, args, step_time: float, backward_share: float | None, latency: float,
             run_dir: Path, name: str, jitter: float = 0.0) -> dict:
    """`lowcomm simulate`'s prediction for the lab's run, at the lab's measured step time."""
    argv = [sys.executable, "-m", "lowcomm", "simulate", "--task", args.task, "--workers", str(args.nodes),
            "--steps", str(args.steps), "--algorithms", algorithm, "--bandwidth", args.bandwidth,
            "--latency", f"{latency * 1e3:.3f}ms", "--step-time", f"{step_time * 1e3:.3f}ms", "--out", str(run_dir),
            "--name", name, "--no-progress", "--step-time-jitter", f"{jitter:.4f}"]
    if args.sync_every:
        argv += ["--sync-every", str(args.sync_every)]
    if backward_share is not None:
        argv += ["--backward-share", f"{backward_share:.4f}"]
    done = subprocess.run(argv, capture_output=True, text=True, env=node_env(), cwd=ROOT)
    if done.returncode != 0:
        raise LabError(f"lowcomm simulate failed: {done.stderr.strip()[-2000:]}")
    summary = json.loads((run_dir / name / "summary.json").read_text())
    return summary[algorithm] if algorithm in summary else summary["algorithms"][algorithm]


def parse_slow(items: list[str], n: int) -> dict[int, float]:
    out = {}
    for item in items:
        m = re.fullmatch(r"(\d+)=(.+)", item)
        if not m or not int(m.group(1)) < n:
            raise SystemExit(f"--slow takes NODE=RATE with NODE below --nodes ({n}), e.g. 3=10Mbit; got {item!r}")
        out[int(m.group(1))] = parse_bandwidth(m.group(2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    parser.add_argument("--nodes", type=int, default=4, help="number of nodes (default 4)")
    parser.add_argument("--bandwidth", default="10Mbit", help="every node's link, each way (default 10Mbit)")
    parser.add_argument("--slow", action="append", default=[], metavar="I=RATE",
                        help="node I gets RATE instead (repeatable), e.g. --slow 3=2Mbit")
    parser.add_argument("--algorithms", default="ddp,diloco,streaming",
                        help=f"comma-separated: ddp (torch DDP over gloo), lowcomm-ddp (lowcomm's DataParallel over "
                        f"the swarm), {', '.join(JOIN_ALGORITHMS)}")
    parser.add_argument("--backend", default="hivemind", choices=["hivemind", "libp2p"])
    parser.add_argument("--task", default="tinylm", help="a built-in task or module:function (default tinylm)")
    parser.add_argument("--steps", type=int, default=100, help="inner steps per node (default 100)")
    parser.add_argument("--sync-every", type=int, default=0, help="H (0: each algorithm's default)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one algorithm's run may take")
    parser.add_argument("--out", default="runs/wanlab", help="folder for logs and the JSON results")
    args = parser.parse_args()

    problem = support_problem()
    if problem:
        print(f"wanlab: {problem}", file=sys.stderr)
        raise SystemExit(2)
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in ("ddp", "lowcomm-ddp", *JOIN_ALGORITHMS)]
    if unknown:
        raise SystemExit(f"unknown algorithm {unknown[0]!r}; choose from ddp, lowcomm-ddp, "
                         f"{', '.join(JOIN_ALGORITHMS)}")
    try:
        rate = parse_bandwidth(args.bandwidth)
    except NetworkSpecError as e:
        raise SystemExit(f"--bandwidth: {e}") from None
    rates = [rate] * args.nodes
    for i, r in parse_slow(args.slow, args.nodes).items():
        rates[i] = r
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = (Path(args.out) / f"{args.nodes}x{args.bandwidth}-{stamp}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)

    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)

    results = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "nodes": args.nodes, "bandwidth": args.bandwidth, "rates": rates, "backend": args.backend,
               "task": args.task, "steps": args.steps, "sync_every": args.sync_every, "algorithms": {}}
    print(f"wanlab: {args.nodes} nodes, links {', '.join(format_bandwidth(r) for r in rates)} each way, no added "
          f"latency; {args.task}, {args.steps} steps; logs in {run_dir}", flush=True)
    try:
        with NetLab(rates) as lab:
            link = probe_link(lab, args)
            results["link"] = link
            print(f"  link check: one flow moves {link['goodput_bps'] / 1e6:.2f} Mbit/s of payload from node 1 to "
                  f"node 0; a 1-byte request takes {link['round_trip_s'] * 1e3:.2f} ms there and back", flush=True)
            for algorithm in algorithms:
                t0 = time.monotonic()
                print(f"  {algorithm}: running {args.nodes} nodes ...", flush=True)
                if algorithm in ("ddp", "lowcomm-ddp"):
                    run = run_ddp(lab, args, run_dir, "torch" if algorithm == "ddp" else "lowcomm")
                else:
                    run = run_join(lab, algorithm, args, run_dir)
                print(f"  {algorithm}: done in {time.monotonic() - t0:.0f} s", flush=True)
                results["algorithms"][algorithm] = run
    except KeyboardInterrupt:
        print("wanlab: interrupted; the lab is removed", file=sys.stderr)
        raise SystemExit(130)
    except LabError as e:
        print(f"wanlab: {e}", file=sys.stderr)
        raise SystemExit(1)

    homogeneous = len(set(rates)) == 1
    for algorithm, run in results["algorithms"].items():
        nodes = run["nodes"]
        # the simulator's workers are alike; the lab's share two cores and are not: a synchronous swarm goes
        # at its slowest member's pace, so the simulator gets that node's step time, and its utilisation is
        # compared with that node's
        pacer = max(nodes, key=lambda n: n["compute_step_s"])
        step_time = pacer["compute_step_s"]
        share = median(n["backward_share"] for n in nodes) if algorithm == "ddp" else None
        sim_algorithm = "ddp" if algorithm == "lowcomm-ddp" else algorithm
        run["measured"] = {"wall_s": mean(n["wall_s"] for n in nodes),
                           "compute_utilization": pacer["compute_s"] / pacer["wall_s"],
                           "mean_compute_utilization": mean(n["compute_s"] / n["wall_s"] for n in nodes),
                           "step_time_s": step_time, "step_time_spread": step_time / min(n["compute_step_s"]
                                                                                        for n in nodes)}
        # torch DDP's ranks time no rounds of their own: its prediction has no jitter
        jitter = step_jitter(nodes) if "round_step_s" in nodes[0] else 0.0
        run["measured"]["step_jitter"] = jitter
        if homogeneous:
            sim = simulate(sim_algorithm, args, step_time, share, results["link"]["round_trip_s"] / 2, run_dir,
                           f"sim-{algorithm}", jitter)
            run["predicted"] = {"wall_s": sim["predicted_wall_clock_s"],
                                "compute_utilization": sim["compute_utilization"]}
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    print(f"\nresults: {run_dir / 'results.json'}")


def print_tables(results: dict) -> None:
    print(f"\n{results['nodes']} nodes at {results['bandwidth']} ({results['backend']}, {results['task']}, "
          f"{results['steps']} steps; {results['date']}, {results['machine']})\n")
    print("| algorithm | measured wall | predicted wall | predicted / measured | measured util (slowest node) "
          "| predicted util | step time (slowest node) | step jitter |")
    print("|---|---|---|---|---|---|---|---|")
    for algorithm, run in results["algorithms"].items():
        m, p = run["measured"], run.get("predicted")
        pred = (f"{p['wall_s']:.1f} s | {p['wall_s'] / m['wall_s']:.3f} | {m['compute_utilization']:.3f} | "
                f"{p['compute_utilization']:.3f}") if p else "n/a | n/a | " + f"{m['compute_utilization']:.3f} | n/a"
        name = {"ddp": "ddp (torch DDP, gloo)", "lowcomm-ddp": "ddp (lowcomm DataParallel, swarm)"}.get(
            algorithm, algorithm)
        print(f"| {name} | {m['wall_s']:.1f} s | {pred} | {m['step_time_s'] * 1e3:.0f} ms "
              f"| {m.get('step_jitter', 0.0):.2f} |")
    print("\nper node:\n")
    print("| algorithm | node | wall | compute | waiting | sent (lowcomm) | sent (wire) | received (wire) "
          "| s / round | participants |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for algorithm, run in results["algorithms"].items():
        for n in run["nodes"]:
            counted = f"{n['bytes_sent'] / 1e6:.2f} MB" if n["bytes_sent"] is not None else "-"
            print(f"| {algorithm} | {n['node']} | {n['wall_s']:.1f} s | {n['compute_s']:.1f} s | {n['wait_s']:.1f} s "
                  f"| {counted} | {n['wire_sent'] / 1e6:.2f} MB | {n['wire_received'] / 1e6:.2f} MB "
                  f"| {n['round_s']:.2f} | {n['participants']:.1f} |")


if __name__ == "__main__":
    main()
