"""Codec benchmark: wire size, speed against memcpy, and accuracy.

    python scripts/bench_compressors.py              # 16M-element fp32 tensor
    python scripts/bench_compressors.py --numel 1000000 --repeats 3

For every codec it prints the bits per value actually on the wire
(``len(encode(payload)) * 8 / numel``), compress and decompress throughput in
MB/s of fp32 input, each as a ratio to ``tensor.clone()`` timed in the same
run, the relative L2 error and the cosine similarity. Best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch

from lowcomm.compressors import codec_names, decode, encode, get_compressor

DEFAULT_OPTIONS = {"topk": {"density": 0.01}, "randk": {"density": 0.01}}


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(numel: int, repeats: int, seed: int = 0) -> list[dict]:
    """One row per codec, plus the clone reference in each row's ratios."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    mb = numel * 4 / 1e6
    rows = []
    for name in codec_names():
        codec = get_compressor(name, **DEFAULT_OPTIONS.get(name, {}))
        payload = codec.compress(x)
        blob = encode(payload)
        y = codec.decompress(decode(blob))
        t_clone_c = best_time(lambda: x.clone(), repeats)
        t_c = best_time(lambda: codec.compress(x), repeats)
        t_clone_d = best_time(lambda: x.clone(), repeats)
        t_d = best_time(lambda: codec.decompress(payload), repeats)
        rows.append({
            "codec": name,
            "bits_per_value": len(blob) * 8 / numel,
            "compress_MBps": mb / t_c, "compress_vs_clone": t_clone_c / t_c,
            "decompress_MBps": mb / t_d, "decompress_vs_clone": t_clone_d / t_d,
            "rel_l2_error": float((y.double() - x.double()).norm() / x.double().norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=0)),
            "clone_MBps": mb / min(t_clone_c, t_clone_d),
        })
    return rows


def table(rows: list[dict]) -> str:
    head = ("| codec | bits/value | compress MB/s | x clone | decompress MB/s | x clone | rel. L2 error | cosine |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head] + [
        f"| {r['codec']} | {r['bits_per_value']:.4f} | {r['compress_MBps']:.0f} | {r['compress_vs_clone']:.2f} | "
        f"{r['decompress_MBps']:.0f} | {r['decompress_vs_clone']:.2f} | {r['rel_l2_error']:.4f} | {r['cosine']:.4f} |"
        for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=16 * 1024 * 1024, help="values in the test tensor [16M]")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions, best kept [5]")
    args = ap.parse_args()
    rows = measure(args.numel, args.repeats)
    print(f"# {datetime.date.today()} · {platform.machine()} · {torch.get_num_threads()} threads · "
          f"torch {torch.__version__} · {args.numel} fp32 values · clone {rows[0]['clone_MBps']:.0f} MB/s")
    print(table(rows))


if __name__ == "__main__":
    main()
