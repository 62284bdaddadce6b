"""Swarm averaging throughput over real daemons on loopback.

    python scripts/bench_swarm.py                    # 4 peers, 25M floats each, hivemind
    python scripts/bench_swarm.py --numel 5000000 --rounds 5 --codecs none int8
    python scripts/bench_swarm.py --backend libp2p
    python scripts/bench_swarm.py --codecs none --aggregators mean,trimmed_mean,centered_clip

Starts one process per peer (torch gets cores / peers threads in each, as if
every peer had its own machine). Each round averages ``numel`` fp32 values per
peer with `none`, `int8`, `fp4` and `sign`. Two references are measured in
the same run over raw streams of the same transport (length-prefixed bytes,
no swarm protocol): peer 0 alone sending 4 * numel bytes to peer 1, and every
peer at once sending 1.5 * 4 * numel bytes split over the others (the bytes a
4-peer butterfly of fp32 moves); each reference is the best of ``rounds``.
Every codec runs one untimed warm-up round, then ``rounds`` timed ones.
Prints seconds per round (best and median), the bytes each peer sent,
goodput (those bytes per second, best round), goodput as a ratio to each
reference, and fp32 values averaged per second. On loopback every peer shares
the same cores, so the concurrent reference is the fair one for the protocol's
overhead; the single stream shows what one link carries, and the ratio of the
two references is the most any protocol could reach against the single stream
on this machine. With ``--aggregators``, the peers are started once per
aggregator (the swarm's reducer) and the table adds each round's time as a
ratio to ``mean``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

CODECS = ("none", "int8", "fp4", "sign")
ROOT = Path(__file__).resolve().parents[1]


def node(args) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.count))  # each peer its share of the cores
    from lowcomm.compressors import get_compressor
    from lowcomm.p2p import Swarm

    import logging
    if args.rank == 0 and args.verbose:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
        logging.getLogger("hivemind").setLevel(logging.WARNING)
    swarm = Swarm.join(args.peers, run_id="bench", backend=args.backend, window=30.0, aggregator=args.aggregator)
    try:
        if args.rank == 0:
            print(json.dumps({"addrs": swarm.addrs()}), flush=True)
        swarm.wait_for_members(args.count, timeout=120)
        members = sorted(swarm.members())
        blob = bytes(4 * args.numel)

        async def serve_raw():
            async def sink(sender, data):
                return b"ok"
            await swarm.transport.serve("/lowcomm-bench/raw/1", sink)

        swarm.call(serve_raw(), 30)
        # everyone is serving before anyone measures: a round of averaging as a barrier
        swarm.average("barrier", [torch.zeros(1)], round=0).result()
        if args.rank == 0:
            target = next(m for m in members if m != swarm.peer_id)
            times = []
            for _ in range(args.rounds):
                t0 = time.perf_counter()
                swarm.call(swarm.transport.request(target, "/lowcomm-bench/raw/1", blob, timeout=600), 700)
                times.append(time.perf_counter() - t0)
            print(json.dumps({"raw_s": min(times), "raw_bytes": len(blob)}), flush=True)
        swarm.average("barrier", [torch.zeros(1)], round=1).result()
        share = bytes(int(4 * args.numel * 2 * (args.count - 1) / args.count) // (args.count - 1))

        async def all_to_all():
            others = [m for m in members if m != swarm.peer_id]
            await asyncio.gather(*(swarm.transport.request(m, "/lowcomm-bench/raw/1", share, timeout=600)
                                   for m in others))

        times = []
        for r in range(args.rounds):
            swarm.average("barrier", [torch.zeros(1)], round=2 + r).result()
            t0 = time.perf_counter()
            swarm.call(all_to_all(), 700)
            times.append(time.perf_counter() - t0)
        if args.rank == 0:
            print(json.dumps({"concurrent_s": min(times), "concurrent_bytes": len(share) * (args.count - 1)}),
                  flush=True)
        swarm.average("barrier", [torch.zeros(1)], round=99).result()
        x = torch.randn(args.numel, generator=torch.Generator().manual_seed(args.rank))
        for codec in args.codecs:
            times, best = [], None
            for r in range(1 + args.rounds):  # round 0 warms up (first use of the buffers) and is not timed
                t0 = time.perf_counter()
                res = swarm.average(f"bench-{codec}", [x], round=r, compressor=get_compressor(codec)).result()
                dt = time.perf_counter() - t0
                if args.verbose:
                    print(f"round {codec}/{r}: {dt:.3f} s", file=sys.stderr)
                if r == 0:
                    continue
                times.append(dt)
                if best is None or dt < best[0]:
                    best = (dt, res.bytes_sent, res.averaged, res.group_size)
            print(json.dumps({"codec": codec, "seconds": best[0], "median": statistics.median(times),
                              "bytes_sent": best[1], "averaged": best[2], "group": best[3]}), flush=True)
    finally:
        swarm.close()


def run_peers(args, aggregator: str) -> list[dict]:
    """Start ``args.count`` peers with ``aggregator``; the records peer 0 printed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    base = [sys.executable, __file__, "--backend", args.backend, "--peers-count", str(args.count),
            "--numel", str(args.numel), "--rounds", str(args.rounds), "--codecs", *args.codecs,
            "--aggregator", aggregator]
    base += ["--verbose"] if args.verbose else []
    procs = [subprocess.Popen([*base, "--rank", "0"], stdout=subprocess.PIPE, text=True, env=env)]  # stderr shown
    try:
        addrs = json.loads(procs[0].stdout.readline())["addrs"]
        procs += [subprocess.Popen([*base, "--rank", str(r), "--peers", *addrs], stdout=subprocess.PIPE, text=True,
                                   env=env, stderr=subprocess.DEVNULL) for r in range(1, args.count)]
        lines = [json.loads(line) for line in procs[0].communicate(timeout=3600)[0].splitlines() if line]
        for p in procs[1:]:
            p.communicate(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="hivemind", choices=("hivemind", "libp2p"))
    ap.add_argument("--peers-count", dest="count", type=int, default=4)
    ap.add_argument("--numel", type=int, default=25_000_000)
    ap.add_argument("--rounds", type=int, default=3,
                    help="timed rounds per codec, after one warm-up round; the best is reported [3]")
    ap.add_argument("--codecs", nargs="+", default=list(CODECS), help=f"codecs to time [{' '.join(CODECS)}]")
    ap.add_argument("--aggregators", default="mean",
                    help="comma-separated swarm reducers to time, e.g. mean,trimmed_mean,centered_clip [mean]")
    ap.add_argument("--verbose", action="store_true", help="peer 0 logs each phase of each round to stderr")
    ap.add_argument("--aggregator", default="mean", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--peers", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank is not None:
        return node(args)

    by_aggregator = {agg: run_peers(args, agg) for agg in args.aggregators.split(",")}
    lines = by_aggregator[args.aggregators.split(",")[0]]
    raw = next(rec for rec in lines if "raw_s" in rec)
    raw_rate = raw["raw_bytes"] / raw["raw_s"]
    conc = next(rec for rec in lines if "concurrent_s" in rec)
    conc_rate = conc["concurrent_bytes"] / conc["concurrent_s"]
    print(f"# {datetime.date.today()} · {platform.machine()} · {os.cpu_count()} cores · backend {args.backend} · "
          f"{args.count} peers on loopback · {args.numel:,} fp32 values per peer · best of {args.rounds} "
          "after a warm-up round")
    print(f"raw stream, peer 0 -> peer 1: {raw['raw_bytes'] / 1e6:.1f} MB in {raw['raw_s']:.3f} s = "
          f"{raw_rate / 1e6:.1f} MB/s")
    print(f"raw streams, all peers at once: {conc['concurrent_bytes'] / 1e6:.1f} MB sent per peer in "
          f"{conc['concurrent_s']:.3f} s = {conc_rate / 1e6:.1f} MB/s per peer "
          f"({conc_rate / raw_rate:.2f}x the single stream: the ceiling for any protocol's ratio to it here)")
    print("| codec | s / round | median s | MB sent / peer | goodput MB/s | / single stream | / concurrent streams "
          "| values averaged / s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for rec in lines:
        if "codec" not in rec:
            continue
        rate = rec["bytes_sent"] / rec["seconds"]
        print(f"| {rec['codec']} | {rec['seconds']:.3f} | {rec['median']:.3f} | {rec['bytes_sent'] / 1e6:.1f} | {rate / 1e6:.1f} | "
              f"{rate / raw_rate:.2f} | {rate / conc_rate:.2f} | {args.numel / rec['seconds'] / 1e6:.1f}M |"
              + ("" if rec["averaged"] and rec["group"] == args.count else " (not all averaged)"))
    if len(by_aggregator) > 1:
        print("| aggregator | codec | s / round | median s | / mean's s / round |")
        print("|---|---|---:|---:|---:|")
        base = {rec["codec"]: rec["seconds"] for rec in by_aggregator.get("mean", lines) if "codec" in rec}
        for agg, recs in by_aggregator.items():
            for rec in (r for r in recs if "codec" in r):
                print(f"| {agg} | {rec['codec']} | {rec['seconds']:.3f} | {rec['median']:.3f} | "
                      f"{rec['seconds'] / base[rec['codec']]:.2f} |")


if __name__ == "__main__":
    main()
