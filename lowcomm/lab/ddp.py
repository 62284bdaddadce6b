"""torch's own DistributedDataParallel on a lowcomm task: the network lab's reference.

    python -m lowcomm.lab.ddp --rank 0 --world 4 --master 198.18.0.1:29500 --steps 40 --out rank0.json

One process per rank, gloo over TCP (``--ifname``, the lab's ``eth0``). DDP
buckets the gradients and all-reduces each bucket while the backward pass
still runs: what users of data-parallel training actually run.

First, every rank times ``--measure-steps`` steps of a plain copy of the model
(same architecture, same batches, no communication), all ranks at once so the
cores are shared as in the run: the step's compute time and the share of it
the backward pass takes, as the lab measured them. Then, after a barrier, it
runs ``--steps`` DDP steps and writes to ``--out`` (JSON): ``wall_s`` (first
step to the end of the last), ``step_s`` per step, ``compute_step_s``,
``backward_share``, ``final_loss`` and the settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from statistics import median

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lowcomm.tasks import load_task


def measure_compute(task, seed: int, lr: float, data, steps: int) -> tuple[float, float]:
    """(median wall seconds of one step, median backward share) on a plain model copy."""
    model = task.make_model(seed)
    inner = task.make_inner(model, lr)
    totals, shares = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = task.loss(model, next(data))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        inner.step()
        inner.zero_grad()
        total = time.perf_counter() - t0
        totals.append(total)
        shares.append((t2 - t1) / total)
    warm = 2 if steps > 4 else 0
    return median(totals[warm:]), median(shares[warm:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowcomm.lab.ddp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--master", required=True, help="HOST:PORT of rank 0's rendezvous")
    parser.add_argument("--ifname", default="eth0", help="network interface gloo uses")
    parser.add_argument("--task", default="tinylm")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--measure-steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.0, help="inner learning rate (0: the task's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file for the results")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", args.ifname)
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.world,
                            timeout=datetime.timedelta(minutes=10))
    try:
        task = load_task(args.task)
        lr = args.lr or task.default_lr
        data = task.batches(args.rank, args.world, args.seed)
        dist.barrier()
        compute_s, backward_share = measure_compute(task, args.seed, lr, data, args.measure_steps)

        model = task.make_model(args.seed)
        ddp = DistributedDataParallel(model)
        inner = task.make_inner(model, lr)
        dist.barrier()
        steps, loss = [], None
        start = time.perf_counter()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = task.loss(ddp, next(data))
            loss.backward()
            inner.step()
            inner.zero_grad()
            steps.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
        numel = sum(p.numel() for p in model.parameters())
        result = {"rank": args.rank, "world": args.world, "task": args.task, "steps": args.steps, "wall_s": wall,
                  "step_s": steps, "compute_step_s": compute_s, "backward_share": backward_share,
                  "final_loss": float(loss.item()), "params": numel,
                  "param_numels": [p.numel() for p in model.parameters()]}
        with open(args.out, "w") as f:
            json.dump(result, f)
        dist.barrier()  # nobody leaves while another still all-reduces
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
