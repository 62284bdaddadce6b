"""One rank of a worker that is a torch.distributed process group, for
test_worker_group.py, run as a subprocess (4 of them: 2 workers x 2 ranks):

    python -m tests.optimizers.group_node --rank 0 --world 4 --store FILE --out DIR

Global ranks 0, 1 are worker 0 and 2, 3 worker 1 (gloo on CPU). Rank r of
each worker is a member of the real swarm of slot r (``run_id`` ".../part{r}of2",
on loopback): worker 0's rank r starts it and puts its addresses in the
store, worker 1's joins. Each rank runs every scenario in order, writes its
results to DIR/rank{N}.pt (plain tensors and numbers, for torch.load with
weights_only=True) and prints one JSON line per scenario.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from tests.optimizers.helpers import seeded

G = 2          # ranks per worker
WORKERS = 2
H = 5          # DiLoCo's sync_every in the scenarios


def make_model(seed: int = 0) -> nn.Module:
    """20,481 parameters: Linear(8, 2048), Tanh, Linear(2048, 1) (the swarm's
    message envelopes are then 1% of a round's bytes)."""
    return seeded(nn.Sequential(nn.Linear(8, 2048), nn.Tanh(), nn.Linear(2048, 1)), seed, 0.05)


def micro_batch(worker: int, rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank`` of worker ``worker``'s batch at ``step``; a single-process
    worker with the same global batch sees its ranks' batches concatenated."""
    g = torch.Generator().manual_seed(1000 * worker + 100 * rank + step)
    x = torch.randn(16, 8, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * worker


def global_batch(worker: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [micro_batch(worker, r, step) for r in range(G)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def train(model, opt, batch, steps: int, start: int = 0) -> None:
    """``steps`` steps on ``batch(step)``, mean-squared error (a mean, so DDP's
    gradient mean over ranks is the gradient of the concatenated batch)."""
    for t in range(start, start + steps):
        x, y = batch(t)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def dgc_codec():
    from lowcomm.compressors import get_compressor
    return get_compressor("topk", chunk_size=64, density=1 / 8)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


class Prefixed:
    """An averager that puts ``prefix/`` before every key (each scenario its own
    rounds on the same swarms)."""

    def __init__(self, averager, prefix: str):
        self.inner, self.prefix = averager, prefix

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    def average(self, key, tensors, **kw):
        return self.inner.average(f"{self.prefix}/{key}", tensors, **kw)


class Node:
    def __init__(self, args, swarm, pg):
        self.args, self.swarm, self.pg = args, swarm, pg
        self.worker, self.rank = args.rank // G, args.rank % G
        self.out: dict = {}

    def batch(self, t):
        return micro_batch(self.worker, self.rank, t)

    def ddp(self, model):
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, process_group=self.pg)

    def averager(self, prefix):
        return Prefixed(self.swarm, prefix)

    def record(self, name, opt, model, **extra):
        self.out[name] = {"phi": [full(t) for t in opt.global_params], "theta": [full(p) for p in model.parameters()],
                          "bytes_sent": opt.stats.bytes_sent, "bytes_received": opt.stats.bytes_received,
                          "rounds": opt.stats.outer_rounds, "not_averaged": opt.stats.rounds_not_averaged,
                          "group": opt.stats.last_group_size, **extra}

    # --- scenarios ---
    def split(self):
        """DiLoCo, none, DDP inside, 3 rounds."""
        from lowcomm.optimizers import DiLoCo
        model = make_model(0)
        wrapped = self.ddp(model)
        opt = DiLoCo(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-2), self.averager("split"),
                     sync_every=H, worker_group=self.pg)
        train(wrapped, opt, self.batch, 3 * H)
        self.record("split", opt, model)
        self.split_opt, self.split_model, self.split_ddp = opt, model, wrapped

    def noloco(self):
        """NoLoCo (phi and theta - phi, sliced alike), none, 2 rounds."""
        from lowcomm.optimizers import NoLoCo
        model = make_model(0)
        opt = NoLoCo(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-2), self.averager("noloco"),
                     sync_every=H, worker_group=self.pg)
        train(self.ddp(model), opt, self.batch, 2 * H)
        self.record("noloco", opt, model)

    def ddp_baseline(self):
        """lowcomm's DataParallel across workers, DDP inside, 3 steps."""
        from lowcomm.optimizers import DataParallel
        model = make_model(0)
        opt = DataParallel(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-2),
                           self.averager("ddp"), worker_group=self.pg)
        train(self.ddp(model), opt, self.batch, 3)
        self.record("ddp", opt, model)

    def dgc(self):
        """Deep Gradient Compression (top-k in 64-value chunks, local accumulation
        cleared where sent: needs what was sent, gathered from both slices), 3 steps."""
        from lowcomm.optimizers import CompressedDataParallel
        model = make_model(0)
        opt = CompressedDataParallel(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-2),
                                     self.averager("dgc"), dgc_codec(), momentum_correction=True, momentum=0.0,
                                     worker_group=self.pg)
        train(self.ddp(model), opt, self.batch, 3)
        self.record("dgc", opt, model, u=[t.clone() for t in opt.u], v=[t.clone() for t in opt.v])

    def sparseloco(self, steps: int, prefix: str, state: bytes | None = None, stop: int | None = None):
        """SparseLoCo with 64-value top-k chunks (slices of 10,304 and 10,177 values),
        error feedback per slice; ``state``: resume from it; ``stop``: save there."""
        from lowcomm.optimizers import SparseLoCo
        model = make_model(0)
        opt = SparseLoCo(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-2),
                         self.averager(prefix), sync_every=3, chunk_size=64, density=1 / 8, worker_group=self.pg)
        start = 0
        if state is not None:
            saved = torch.load(io.BytesIO(state), weights_only=True)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
            start = opt.step_count
        train(self.ddp(model), opt, self.batch, (stop or steps) - start, start)
        if stop is not None:
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            return buf.getvalue()
        return opt, model

    def resume(self):
        """The same 12 steps (4 rounds) uninterrupted, and stopped at step 7 (a
        fresh model and optimizer load the saved state and go on)."""
        opt, model = self.sparseloco(12, "resume-full")
        self.record("resume_full", opt, model, residuals=opt.compression.state_dict())
        state = self.sparseloco(12, "resume-cut", stop=7)
        opt, model = self.sparseloco(12, "resume-cut", state=state)
        self.record("resume_cut", opt, model, residuals=opt.compression.state_dict())

    def catchup(self):
        """Worker 1 starts anew (another initialisation, step 0); its rank 0 is given
        worker 0's shared state (after `split`) and broadcasts it; then both
        workers train one more round together."""
        from lowcomm.optimizers import DiLoCo, broadcast_shared_state
        if self.worker == 0:
            opt, model, wrapped = self.split_opt, self.split_model, self.split_ddp
            if self.rank == 0:
                torch.save(opt.shared_state_dict(), os.path.join(self.args.out, "shared_w0.pt"))
        else:
            model = make_model(7)
            wrapped = self.ddp(model)
            opt = DiLoCo(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-2),
                         self.averager("split"), sync_every=H, worker_group=self.pg)
        dist.barrier()  # the source state is on disk
        if self.worker == 1:
            state = None
            if self.rank == 0:
                state = torch.load(os.path.join(self.args.out, "shared_w0.pt"), weights_only=True)
            broadcast_shared_state(opt, state, src=0)
            self.out["catchup_loaded"] = copy.deepcopy(opt.shared_state_dict())  # its outer state is live
            self.out["catchup_theta"] = [full(p) for p in model.parameters()]
        train(wrapped, opt, self.batch, H, start=opt.step_count)
        self.record("catchup_after", opt, model)

    def rank0(self):
        """DiLoCo, none, rank 0 alone in the swarm (rank 1 passes no averager)."""
        from lowcomm.optimizers import DiLoCo
        model = make_model(0)
        averager = self.averager("rank0") if self.rank == 0 else None
        opt = DiLoCo(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-2), averager,
                     sync_every=H, worker_group=self.pg, worker_group_mode="rank0")
        train(self.ddp(model), opt, self.batch, 3 * H)
        self.record("rank0", opt, model)

    def sharded(self):
        """DiLoCo, none, FSDP2 (fully_shard on the worker's mesh), 3 rounds."""
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        from lowcomm.optimizers import DiLoCo
        model = make_model(0)
        fully_shard(model, mesh=DeviceMesh.from_group(self.pg, "cpu"))
        opt = DiLoCo(model.parameters(), torch.optim.AdamW(model.parameters(), lr=1e-2), self.averager("sharded"),
                     sync_every=H, worker_group=self.pg)
        train(model, opt, self.batch, 3 * H)
        self.record("sharded", opt, model, local=[p.to_local().numel() for p in model.parameters()])

    def tiny(self):
        """10 values through int8 (4096-value blocks): rank 1's slice is empty."""
        from lowcomm.compressors import get_compressor
        from lowcomm.optimizers import WorkerGroupAverager
        wg = WorkerGroupAverager(self.averager("tiny"), self.pg)
        x = torch.arange(10, dtype=torch.float32) * (1 + self.worker)
        r = wg.average("t", [x], round=0, compressor=get_compressor("int8")).result()
        self.out["tiny"] = {"value": r.tensors[0].clone(), "averaged": r.averaged, "bytes_sent": r.bytes_sent,
                            "participants": len(r.participants), "shards_averaged": r.shards_averaged}

    def mismatch(self):
        """Worker 0's rank 1 builds a wider model: both ranks refuse, alike."""
        from lowcomm.optimizers import DiLoCo
        model = make_model(0) if self.rank == 0 else nn.Linear(8, 2)
        try:
            DiLoCo(model.parameters(), torch.optim.AdamW(model.parameters()), self.averager("mismatch"),
                   worker_group=self.pg)
            self.out["mismatch"] = "built"
        except ValueError as e:
            self.out["mismatch"] = str(e)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, default=WORKERS * G)
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--backend", default="hivemind")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from lowcomm.logs import configure_from_env
    configure_from_env()
    store = dist.FileStore(args.store, args.world)
    dist.init_process_group("gloo", store=store, rank=args.rank, world_size=args.world,
                            timeout=timedelta(seconds=120))
    groups = [dist.new_group(list(range(w * G, (w + 1) * G))) for w in range(WORKERS)]
    worker, rank = divmod(args.rank, G)
    from lowcomm.p2p import Swarm

    t0 = time.monotonic()
    run = f"wg-test/part{rank}of{G}"
    if worker == 0:
        swarm = Swarm.create(run_id=run, backend=args.backend, window=10.0, base_timeout=5.0)
        store.set(f"addrs{rank}", json.dumps(swarm.addrs()))
    else:
        swarm = Swarm.join(json.loads(store.get(f"addrs{rank}")), run_id=run, backend=args.backend, window=10.0,
                           base_timeout=5.0)
    try:
        swarm.wait_for_members(WORKERS, timeout=60)
        node = Node(args, swarm, groups[worker])
        times = {"swarm": time.monotonic() - t0}
        for name in ("split", "catchup", "resume", "noloco", "ddp_baseline", "dgc", "rank0", "sharded", "tiny"):
            t = time.monotonic()
            getattr(node, name)()
            times[name] = round(time.monotonic() - t, 2)
        if worker == 0:
            node.mismatch()
        dist.barrier()
        torch.save(node.out, os.path.join(args.out, f"rank{args.rank}.pt"))
        print(json.dumps({"rank": args.rank, "times": times}), flush=True)
        dist.barrier()  # nobody leaves its swarm while another still averages
    finally:
        swarm.close()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
