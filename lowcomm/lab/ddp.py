"""Data-parallel training on a lowcomm task, one process per lab node: the network lab's reference.

    python -m lowcomm.lab.ddp --rank 0 --world 4 --master 198.18.0.1:29500 --steps 40 --out rank0.json
    python -m lowcomm.lab.ddp --impl lowcomm --rank 1 --world 4 --master 198.18.0.1:31337 ...

``--impl torch`` (the default): torch's own DistributedDataParallel, gloo
over TCP (``--ifname``, the lab's ``eth0``). DDP buckets the gradients and
all-reduces each bucket while the backward pass still runs: what users of
data-parallel training actually run. ``--impl lowcomm``: lowcomm's
`DataParallel` over a real swarm (``--backend``): rank 0 listens at
``--master`` and writes its multiaddr to ``--rendezvous``, the others join it;
the gradient mean after the backward pass, every step.

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
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lowcomm.sim.runner import measure_step_time
from lowcomm.tasks import load_task


def measure_compute(task, seed: int, lr: float, data, steps: int) -> tuple[float, float]:
    """(median wall seconds of one step, median backward share) on a plain model copy."""
    return measure_step_time(task, seed, lr, steps, clock=time.perf_counter, data=data)


def train(task, forward, opt, data, steps: int) -> tuple[float, list[float], float]:
    """``steps`` steps (``forward`` the module the loss calls, ``opt`` stepped
    after each backward pass): (wall seconds, seconds per step, last loss)."""
    times, loss = [], None
    start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = task.loss(forward, next(data))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return time.perf_counter() - start, times, float(loss.item())


def result_of(args, wall: float, times: list[float], loss: float, compute_s: float, backward_share: float,
              **extra) -> dict:
    return {"rank": args.rank, "world": args.world, "task": args.task, "steps": args.steps, "wall_s": wall,
            "step_s": times, "compute_step_s": compute_s, "backward_share": backward_share, "final_loss": loss,
            **extra}


def run_lowcomm(args) -> None:
    """lowcomm's DataParallel over a real swarm (see the module docstring)."""
    from lowcomm.optimizers import DataParallel
    from lowcomm.p2p import Swarm

    host, port = args.master.rsplit(":", 1)
    if args.rank == 0:
        swarm = Swarm.create(run_id="lab-ddp", backend=args.backend, listen=[f"/ip4/{host}/tcp/{port}"])
        tmp = Path(args.rendezvous).with_suffix(".tmp")
        tmp.write_text(swarm.addrs()[0])
        tmp.rename(args.rendezvous)
    else:
        deadline = time.monotonic() + 120
        while not Path(args.rendezvous).exists():
            if time.monotonic() > deadline:
                raise SystemExit(f"rank 0 wrote no address to {args.rendezvous} within 120 s")
            time.sleep(0.1)
        swarm = Swarm.join([Path(args.rendezvous).read_text()], run_id="lab-ddp", backend=args.backend,
                           listen=[f"/ip4/{args.ifaddr}/tcp/0"])
    try:
        task = load_task(args.task)
        lr = args.lr or task.default_lr
        data = task.batches(args.rank, args.world, args.seed)
        swarm.wait_for_members(args.world, timeout=120)
        compute_s, backward_share = measure_compute(task, args.seed, lr, data, args.measure_steps)
        model = task.make_model(args.seed)
        opt = DataParallel(model.parameters(), task.make_inner(model, lr), swarm)
        wall, times, loss = train(task, model, opt, data, args.steps)
        result = result_of(args, wall, times, loss, compute_s, backward_share, bytes_sent=opt.stats.bytes_sent,
                           participants=opt.stats.last_group_size,
                           rounds_not_averaged=opt.stats.rounds_not_averaged)
        with open(args.out, "w") as f:
            json.dump(result, f)
        # nobody leaves while another still averages: wait until every rank wrote its result
        outs = [Path(args.out).with_name(Path(args.out).name.replace(f"rank{args.rank}", f"rank{r}"))
                for r in range(args.world)]
        deadline = time.monotonic() + 120
        while not all(o.exists() for o in outs) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        swarm.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lowcomm.lab.ddp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--master", required=True, help="HOST:PORT of rank 0's rendezvous")
    parser.add_argument("--ifname", default="eth0", help="network interface gloo uses")
    parser.add_argument("--ifaddr", default="127.0.0.1", help="this node's address (--impl lowcomm, ranks > 0)")
    parser.add_argument("--task", default="tinylm")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--measure-steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=0.0, help="inner learning rate (0: the task's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--impl", default="torch", choices=["torch", "lowcomm"])
    parser.add_argument("--backend", default="hivemind", choices=["hivemind", "libp2p"], help="(--impl lowcomm)")
    parser.add_argument("--rendezvous", default="", help="file rank 0 writes its multiaddr to (--impl lowcomm)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    from lowcomm.logs import configure_from_env

    configure_from_env()
    if args.impl == "lowcomm":
        return run_lowcomm(args)
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
        wall, times, loss = train(task, ddp, inner, data, args.steps)
        result = result_of(args, wall, times, loss, compute_s, backward_share,
                           param_numels=[p.numel() for p in model.parameters()])
        with open(args.out, "w") as f:
            json.dump(result, f)
        dist.barrier()  # nobody leaves while another still all-reduces
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
