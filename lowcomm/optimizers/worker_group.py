"""Workers that are `torch.distributed` process groups: several GPUs per worker.

    pg = dist.new_group(my_worker_ranks)                  # this worker's G ranks
    model = DDP(model, process_group=pg)                   # replicated parameters
    swarm = Swarm.join(peers, run_id=f"{run}/part{pg.rank()}of{G}")   # one swarm per rank slot
    opt = DiLoCo(model.parameters(), AdamW(model.parameters()), swarm, worker_group=pg)

Every outer optimizer takes ``worker_group=`` (and ``worker_group_mode=``); it
wraps its averager in a `WorkerGroupAverager`, at the Averager seam, so the
optimizers' math is unchanged. Three ways to sync a worker:

- ``"split"`` (the default; replicated parameters, DDP inside): every rank
  holds the same outer gradient. Rank r of G takes one contiguous slice of the
  call's flattened tensors (`slice_bounds`: cut at multiples of the codec's
  `unit`, so blocks and top-k chunks of a slice are those of the whole vector)
  and averages it under ``f"{key}/part{r}of{G}"``, a key that pairs equal
  slices across workers; then the group gathers the averaged slices (one
  broadcast per rank). Each rank sends about 1/G of a single-process
  worker's bytes, and every rank ends with the same tensors, bit for bit.
- ``"rank0"``: rank 0 alone talks to the swarm (one identity per machine);
  it averages the whole vector under ``key`` and broadcasts the mean. The
  other ranks need no averager (pass None).
- **sharded** (parameters are DTensors: FSDP2 `fully_shard`,
  `distribute_tensor`), picked by the tensors themselves: each rank averages
  its local shards (``to_local()``) under ``f"{key}/shard{r}of{G}"`` and gets
  DTensors back with the same mesh and placements; nothing is gathered. Keys
  pair rank r with rank r of every worker, so workers must lay out their
  meshes alike (the same model, mesh shape and sharding). A replicated
  placement is synced by every rank that holds it (no saving there).

With the real swarm, rank r of every worker joins a swarm of its own slot
(its own ``run_id``, as above): a swarm's matchmaking waits for every live
member, so ranks that never join a slot's keys would hold each of its rounds
for the whole window.

``result()`` is a collective of the worker group: every rank must call it
for the same calls in the same order. The outer optimizers do (their
schedule is deterministic and the same on each rank; DiLoCo's ``state_dict``
waits for rounds in flight, so it is collective too, as is building an
optimizer, which checks that the ranks agree on the parameters). The first
call gathers; later calls return the same result.

The combined `AverageResult` every rank returns: ``averaged`` if every
non-empty slice was; ``participants`` those of the slice with the fewest
(lowest rank on ties); ``shards_averaged`` one entry per rank's slice (an
empty slice counts as averaged); ``diverged`` the ranks whose slice may
differ from what the other workers hold; ``outliers`` the union;
``bytes_*`` and ``phases`` this rank's own; ``sent`` (split and rank0) the
gathered whole vector, or None unless every slice has one.

Gossip (``group_size`` k): each slot swarm draws its own groups, so slices of
one worker may average with different partners. Every coordinate still
follows its algorithm in a random group of k, and the copies of a coordinate
that one call sends (NoLoCo's phi and theta - phi: ``copies=2``) are sliced
alike, so they travel together. Use ``"rank0"`` where whole workers should
pair up.

Catch-up: one rank fetches a peer's shared state and `broadcast_shared_state`
loads it on every rank (replicated parameters; with sharded ones rank r
takes the state of rank r of a peer). Error-feedback residuals live per
slice key on each rank and are saved by each rank's ``state_dict``.
"""

from __future__ import annotations

import io
import json
import sys
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.distributed as dist

from lowcomm.averaging import (
    AverageHandle, AverageResult, Averager, Compression, DoneHandle, flatten, shard_bounds, unflatten,
)
from lowcomm.compressors import ErrorFeedback

if TYPE_CHECKING:
    from lowcomm.optimizers.base import OuterOptimizer

#: How a replicated worker syncs: each rank a slice, or rank 0 everything.
MODES = ("split", "rank0")


def slice_bounds(numel: int, parts: int, unit: int = 1) -> list[tuple[int, int]]:
    """Contiguous slices of ``range(numel)``, one per rank, each starting at a
    multiple of ``unit``: whole units shared out as evenly as possible
    (`shard_bounds` over ``ceil(numel / unit)`` units), the last non-empty
    slice taking the short tail. Ranks past the last unit get an empty slice
    ``(numel, numel)``."""
    if type(unit) is not int or unit < 1:
        raise ValueError(f"unit must be a positive integer, got {unit!r}")
    units = -(-numel // unit)
    return [(min(lo * unit, numel), min(hi * unit, numel)) for lo, hi in shard_bounds(units, parts)]


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (each rank holds its part, ``to_local()``).
    No tensor can be one before ``torch.distributed.tensor`` is imported, which
    this does not do (plain runs need not pay for it)."""
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def codec_unit(compressor: Compression) -> int:
    """The values a codec compresses as one unit (1 with no codec): where split slices are cut."""
    codec = compressor.compressor if isinstance(compressor, ErrorFeedback) else compressor
    return codec.unit if codec is not None else 1


def split_pieces(numel: int, parts: int, unit: int = 1, copies: int = 1) -> list[list[tuple[int, int]]]:
    """For each of ``parts`` ranks, the ranges of a flattened call of ``numel``
    values that it averages in ``"split"`` mode: slice r (`slice_bounds` of one
    copy) of each of the call's ``copies`` equal runs; none for a rank whose
    slice is empty. Also what `lowcomm simulate --ranks-per-worker` sends."""
    if numel % copies:
        raise ValueError(f"a call of {numel} values cannot be {copies} equal copies")
    run = numel // copies
    return [[(c * run + lo, c * run + hi) for c in range(copies)] if hi > lo else []
            for lo, hi in slice_bounds(run, parts, unit)]


class WorkerGroupAverager:
    """The `Averager` of one rank of a worker that is a process group (see the
    module docstring).

    Args:
        averager: this rank's averager (a `lowcomm.p2p.Swarm` of its slot); may
            be None on ranks other than 0 in ``"rank0"`` mode.
        group: the worker's process group (``dist.new_group``), this rank in it.
        mode: ``"split"`` or ``"rank0"`` for replicated parameters; sharded
            (DTensor) tensors are always synced shard by shard.
        copies: the call's tensors are this many equally long runs back to back
            (NoLoCo: 2, phi then theta - phi); every rank takes the same slice of
            each, so a coordinate's copies travel in one group [1].
    """

    def __init__(self, averager: Averager | None, group: dist.ProcessGroup, mode: str = "split",
                 copies: int = 1):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("worker_group needs torch.distributed set up first: call "
                               "dist.init_process_group(...) on every rank, then dist.new_group(worker_ranks)")
        if mode not in MODES:
            raise ValueError(f"worker_group_mode must be one of {', '.join(MODES)}, got {mode!r}")
        if type(copies) is not int or copies < 1:
            raise ValueError(f"copies must be a positive integer, got {copies!r}")
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("this process is not a member of worker_group; pass the group of its own worker")
        if averager is None and not (mode == "rank0" and self.rank != 0):
            raise ValueError(f"rank {self.rank} of the worker group needs an averager (only ranks other than 0 "
                             "in worker_group_mode='rank0' may pass None)")
        self.averager, self.group, self.mode, self.copies = averager, group, mode, copies
        self.device = torch.device("cuda", torch.cuda.current_device()) if (
            dist.get_backend(group) == "nccl") else torch.device("cpu")

    @property
    def peer_id(self) -> str:
        """This rank's swarm identity ("" for a rank without an averager)."""
        return self.averager.peer_id if self.averager is not None else ""

    # --- what each rank averages ---
    def pieces(self, numel: int, unit: int = 1) -> list[list[tuple[int, int]]]:
        """For each rank, the ranges of the flattened call it averages (one per copy;
        none for a rank with nothing to average)."""
        if self.mode == "rank0":
            return [[(0, numel)] if r == 0 and numel else [] for r in range(self.size)]
        return split_pieces(numel, self.size, unit, self.copies)

    def average(self, key: str, tensors: Sequence[torch.Tensor], *, round: int, group_size: int | None = None,
                weight: float = 1.0, compressor: Compression = None) -> AverageHandle:
        """Average this rank's part of ``tensors`` (see the module docstring)."""
        tensors = list(tensors)
        sharded = [is_sharded(t) for t in tensors]
        if any(sharded):
            if not all(sharded):
                raise ValueError("a call mixes DTensors and plain tensors; shard every parameter (fully_shard the "
                                 "whole model) or none")
            if self.mode == "rank0":
                raise ValueError("worker_group_mode='rank0' needs replicated parameters; sharded ones (DTensor) "
                                 "sync from every rank: use the default 'split'")
            local = [t.to_local() for t in tensors]
            handle = self._start(f"{key}/shard{self.rank}of{self.size}", local, round, group_size, weight,
                                 compressor)
            return _ShardHandle(self, key, handle, tensors)
        vector = flatten(tensors)
        pieces = self.pieces(vector.numel(), codec_unit(compressor))
        mine = [vector[a:b] for a, b in pieces[self.rank]]
        part_key = key if self.mode == "rank0" else f"{key}/part{self.rank}of{self.size}"
        handle = self._start(part_key, mine, round, group_size, weight, compressor)
        return _SplitHandle(self, key, handle, tensors, pieces)

    def _start(self, key, tensors, round, group_size, weight, compressor) -> AverageHandle:
        if sum(t.numel() for t in tensors) == 0:  # nothing here: take part in the gathers only
            return DoneHandle(AverageResult([t.detach().clone() for t in tensors], True, sent=[torch.zeros(0)]))
        return self.averager.average(key, tensors, round=round, group_size=group_size, weight=weight,
                                     compressor=compressor)

    # --- collectives in the group ---
    def all_gather_json(self, obj: Any) -> list[Any]:
        """``obj`` (JSON-able) of every rank, in rank order."""
        data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([data.numel()], device=self.device), group=self.group)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:data.numel()] = data
        out = [torch.zeros(longest, dtype=torch.uint8, device=self.device) for _ in range(self.size)]
        dist.all_gather(out, padded.to(self.device), group=self.group)
        return [json.loads(bytes(o[:int(s.item())].cpu().tolist())) for o, s in zip(out, sizes)]

    def gather_pieces(self, own: torch.Tensor, pieces: list[list[tuple[int, int]]], out: torch.Tensor) -> None:
        """Fill ``out`` (flat, CPU) with every rank's values at its ``pieces``
        (``own``: this rank's, its pieces back to back): one broadcast per rank
        that has any."""
        for r, ranges in enumerate(pieces):
            n = sum(b - a for a, b in ranges)
            if n == 0:
                continue
            buf = own.to(self.device, torch.float32) if r == self.rank else torch.empty(n, device=self.device)
            dist.broadcast(buf, src=dist.get_global_rank(self.group, r), group=self.group)
            buf, start = buf.cpu(), 0
            for a, b in ranges:
                out[a:b] = buf[start:start + b - a]
                start += b - a

    def check_params(self, params: Sequence[torch.Tensor]) -> None:
        """Raise ValueError (on every rank alike) unless all ranks hold parameters of
        the same shapes and dtypes, all sharded or all replicated, in one mode. A
        collective: every rank of the group calls it."""
        mine = {"mode": self.mode, "copies": self.copies,
                "params": [[list(t.shape), str(t.dtype), is_sharded(t)] for t in params]}
        views = self.all_gather_json(mine)
        for r, view in enumerate(views):
            if view != views[0]:
                what = next(k for k in mine if view[k] != views[0][k])
                raise ValueError(f"the ranks of worker_group disagree on {what}: rank 0 has {views[0][what]}, "
                                 f"rank {r} has {view[what]}; build the same model and optimizer on every rank")
        flags = {s for _, _, s in mine["params"]}
        if len(flags) > 1:
            raise ValueError("some parameters are DTensors and some are not; shard every parameter "
                             "(fully_shard the whole model) or none")
        if True in flags and self.mode == "rank0":
            raise ValueError("worker_group_mode='rank0' needs replicated parameters; sharded ones (DTensor) sync "
                             "from every rank: use the default 'split'")

    def broadcast_state(self, state: dict | None, src: int = 0) -> dict:
        """``state`` as rank ``src`` of the group has it, on every rank (torch.save
        on ``src``, ``torch.load(weights_only=True)`` elsewhere: plain tensors,
        numbers, strings and containers only). A collective; raises ValueError on
        every rank if ``src`` has no state (None)."""
        data = torch.zeros(0, dtype=torch.uint8)
        if self.rank == src and state is not None:
            buf = io.BytesIO()
            torch.save(state, buf)
            data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        size = torch.tensor([data.numel()], device=self.device)
        root = dist.get_global_rank(self.group, src)
        dist.broadcast(size, src=root, group=self.group)
        if size.item() == 0:
            raise ValueError(f"rank {src} of the worker group had no state to broadcast (None)")
        moved = (data if self.rank == src else torch.empty(int(size.item()), dtype=torch.uint8)).to(self.device)
        dist.broadcast(moved, src=root, group=self.group)
        if self.rank == src:
            return state
        return torch.load(io.BytesIO(moved.cpu().numpy().tobytes()), weights_only=True)


def slice_meta(result: AverageResult, numel: int, key: str) -> dict:
    """What `combine_slices` needs of one rank's slice result (``numel`` values), as JSON."""
    return {"key": key, "numel": numel, "averaged": result.averaged, "participants": list(result.participants),
            "all_shards": all(result.shards_averaged) if result.shards_averaged else result.averaged,
            "diverged": bool(result.diverged), "outliers": list(result.outliers), "reason": result.reason,
            "sent": result.sent is not None}


def combine_slices(metas: list[dict], own: AverageResult, tensors: list[torch.Tensor],
                   sent: list[torch.Tensor] | None) -> AverageResult:
    """Every rank's view of one call (``metas``, rank order, from `slice_meta`) as one
    result (see the module docstring); bytes and phases are ``own``'s."""
    if any(m["key"] != metas[0]["key"] for m in metas):
        raise RuntimeError(f"the ranks of a worker group waited for different calls ({[m['key'] for m in metas]}); "
                           "every rank must collect results for the same calls in the same order")
    live = [m for m in metas if m["numel"]]
    return AverageResult(
        tensors, all(m["averaged"] for m in live), min((m["participants"] for m in live), key=len, default=[]),
        own.bytes_sent, own.bytes_received, list(own.phases), sent=sent,
        reason="; ".join(f"rank {r}: {m['reason']}" for r, m in enumerate(metas) if m["reason"]),
        shards_averaged=[not m["numel"] or (m["averaged"] and m["all_shards"]) for m in metas],
        outliers=sorted({o for m in metas for o in m["outliers"]}),
        diverged=[r for r, m in enumerate(metas) if m["diverged"]])


class _SplitHandle:
    """One call of a replicated worker: this rank's slice in flight; `result` gathers."""

    def __init__(self, wg: WorkerGroupAverager, key: str, handle: AverageHandle, like: list[torch.Tensor],
                 pieces: list[list[tuple[int, int]]]):
        self.wg, self.key, self.handle, self.like, self.pieces = wg, key, handle, like, pieces
        self._result: AverageResult | None = None

    def done(self) -> bool:
        """Whether this rank's own slice is done (the gather is still to come)."""
        return self.handle.done()

    def result(self, timeout: float | None = None) -> AverageResult:
        """This rank's slice (waiting up to ``timeout`` s for it), then the group's
        gather: a collective (see the module docstring)."""
        if self._result is not None:
            return self._result
        own = self.handle.result(timeout)
        numel = sum(t.numel() for t in self.like)
        metas = self.wg.all_gather_json(slice_meta(own, sum(b - a for a, b in self.pieces[self.wg.rank]), self.key))
        if any(m["numel"] != sum(b - a for a, b in p) for m, p in zip(metas, self.pieces)):
            raise RuntimeError(f"the ranks of a worker group averaged {self.key!r} with different sizes "
                               f"({[m['numel'] for m in metas]}); they must hold the same parameters")
        values = torch.empty(numel)
        self.wg.gather_pieces(flatten(own.tensors), self.pieces, values)
        sent = None
        if all(m["sent"] for m in metas if m["numel"]):
            whole = torch.empty(numel)
            self.wg.gather_pieces(flatten(own.sent or []), self.pieces, whole)
            sent = [whole]
        self._result = combine_slices(metas, own, unflatten(values, self.like), sent)
        return self._result


class _ShardHandle:
    """One call of a sharded worker: this rank's shards in flight; `result` wraps
    them back as DTensors and combines the ranks' outcomes (no tensor gather)."""

    def __init__(self, wg: WorkerGroupAverager, key: str, handle: AverageHandle, like: list[torch.Tensor]):
        self.wg, self.key, self.handle, self.like = wg, key, handle, like
        self._result: AverageResult | None = None

    def done(self) -> bool:
        return self.handle.done()

    def result(self, timeout: float | None = None) -> AverageResult:
        """This rank's shards (waiting up to ``timeout`` s), then the outcomes of
        every rank: a collective (see the module docstring)."""
        from torch.distributed.tensor import DTensor

        if self._result is not None:
            return self._result
        own = self.handle.result(timeout)
        metas = self.wg.all_gather_json(slice_meta(own, sum(t.to_local().numel() for t in self.like), self.key))
        tensors = [DTensor.from_local(t.to(d.dtype), d.device_mesh, d.placements, run_check=False, shape=d.shape,
                                      stride=d.stride()) for t, d in zip(own.tensors, self.like)]
        self._result = combine_slices(metas, own, tensors, None)  # sent: shards of a vector no rank holds whole
        return self._result


def broadcast_shared_state(opt: OuterOptimizer, state: dict | None, src: int = 0) -> dict:
    """Catch-up of a worker that is a process group: rank ``src`` holds a peer's
    ``shared_state_dict`` (fetched by it alone), every rank loads it. A
    collective; returns the state loaded. Replicated parameters only: with
    sharded ones, rank r takes the state of rank r of a peer worker and loads
    it itself."""
    wg = opt.averager
    if not isinstance(wg, WorkerGroupAverager):
        raise ValueError("this optimizer was built without worker_group; load the state with "
                         "opt.load_shared_state_dict(state)")
    if any(is_sharded(p) for p in opt.params):
        raise ValueError("sharded parameters: each rank loads the shared state of the same rank of a peer "
                         "worker (opt.load_shared_state_dict) instead of a broadcast")
    state = wg.broadcast_state(state, src)
    opt.load_shared_state_dict(state)
    return state
