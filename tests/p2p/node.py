"""A swarm node for the real-backend tests, run as a subprocess:

    python -m tests.p2p.node --backend hivemind --rank 0 --count 4 --job average
    python -m tests.p2p.node --backend hivemind --rank 1 --count 4 --job average --peers MULTIADDR

Rank 0 prints {"addrs": [...]} first; every node then prints one JSON line
per check and exits 0. Jobs: ``average`` (exact mean with none, int8, pairs)
``diloco`` (DiLoCo training of a small model), ``crash`` (a member dies
mid-round) and ``hostile`` (DiLoCo with one member sending scaled updates).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def contribution(rank: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(100 + rank))


def job_average(swarm, args) -> None:
    from lowcomm.compressors import get_compressor

    numel = args.numel
    mine = contribution(args.rank, numel)
    everyone = torch.stack([contribution(r, numel) for r in range(args.count)])
    want = everyone.double().mean(0)
    absmax = everyone.abs().max().item()
    for round_, codec in enumerate((None, get_compressor("int8"))):
        r = swarm.average("avg", [mine], round=round_, compressor=codec).result()
        emit(check="mean", codec=codec.name if codec else "none", averaged=r.averaged,
             participants=len(r.participants), max_err=(r.tensors[0].double() - want).abs().max().item(),
             absmax=absmax, digest=digest(r.tensors), bytes_sent=r.bytes_sent)
    r = swarm.average("pairs", [mine], round=0, group_size=2).result()
    emit(check="pairs", me=swarm.peer_id, participants=sorted(r.participants), averaged=r.averaged,
         digest=digest(r.tensors))


def job_crash(swarm, args) -> None:
    """The peer with the largest id (never the leader) dies, without cleanup, after
    the roster closed and before sending any part; the others must end with the
    exact mean of their own contributions."""
    import os

    numel = 100_000
    members = sorted(swarm.members())
    me = members.index(swarm.peer_id)
    mine = contribution(me, numel)
    if me == len(members) - 1:
        async def die(*a, **k):
            os._exit(0)
        swarm.exchange.butterfly = die
    r = swarm.average("crash", [mine], round=0).result()
    want = torch.stack([contribution(i, numel) for i in range(len(members) - 1)]).double().mean(0)
    emit(check="crash", averaged=r.averaged, all_shards=all(r.shards_averaged), participants=len(r.participants),
         max_err=(r.tensors[0].double() - want).abs().max().item(), digest=digest(r.tensors))


def job_diloco(swarm, args) -> None:
    from lowcomm.optimizers import DiLoCo
    from tests.sim.tinytask import task

    t = task()
    model = t.make_model(0)
    opt = DiLoCo(model.parameters(), t.make_inner(model, 1e-2), swarm, sync_every=10)
    before = t.evaluate(model)
    data = t.batches(args.rank, args.count, 0)
    for _ in range(30):
        t.loss(model, next(data)).backward()
        opt.step()
        opt.zero_grad()
    emit(check="diloco", before=before, after=t.evaluate(model), rounds=opt.stats.outer_rounds,
         group=opt.stats.last_group_size, not_averaged=opt.stats.rounds_not_averaged,
         phi=digest(opt.global_params), theta=digest(list(model.parameters())))


def job_hostile(swarm, args) -> None:
    """DiLoCo on codeclass, the swarm's aggregator from --aggregator; the node with
    the largest peer id (never the leader) sends its updates scaled x100. The loop
    is `lowcomm.sim.attacks.train_under_attack`'s, so a LocalSwarm run is the
    clean reference."""
    from lowcomm.optimizers import DiLoCo
    from lowcomm.sim.attacks import ATTACKS, HostileAverager
    from lowcomm.sim.runner import lr_lambda
    from lowcomm.tasks import load_task

    torch.set_num_threads(1)
    task = load_task("codeclass")
    members = sorted(swarm.members())
    me = members.index(swarm.peer_id)
    hostile = me == len(members) - 1
    model = task.make_model(0)
    averager = HostileAverager(swarm, ATTACKS["scale100"], seed=me) if hostile else swarm
    opt = DiLoCo(model.named_parameters(), task.make_inner(model, task.default_lr), averager, sync_every=20)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", args.steps))
    data = task.batches(me, len(members), 0)
    for _ in range(args.steps):
        task.loss(model, next(data)).backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    emit(check="hostile", me=swarm.peer_id, hostile=hostile, loss=task.evaluate(model),
         excluded=swarm.exclusions.excluded(), rounds=opt.stats.outer_rounds,
         not_averaged=opt.stats.rounds_not_averaged)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="hivemind")
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--job", choices=("average", "diloco", "crash", "hostile"), required=True)
    ap.add_argument("--peers", nargs="*", default=[])
    ap.add_argument("--numel", type=int, default=1 << 20)
    ap.add_argument("--aggregator", default="mean")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    from lowcomm.p2p import Swarm

    swarm = Swarm.join(args.peers, run_id=f"test-{args.job}", backend=args.backend, window=10.0, base_timeout=5.0,
                       aggregator=args.aggregator)
    try:
        if args.rank == 0:
            emit(addrs=swarm.addrs())
        swarm.wait_for_members(args.count, timeout=60)
        {"average": job_average, "diloco": job_diloco, "crash": job_crash, "hostile": job_hostile}[args.job](
            swarm, args)
    finally:
        swarm.close()
    sys.exit(0)


if __name__ == "__main__":
    main()
