"""Simulated workers of G ranks: `lowcomm simulate --ranks-per-worker G`.

A real worker of G processes (`lowcomm join --nproc-per-node G`,
`lowcomm.optimizers.worker_group`) is modelled as follows:

- **Training.** Its G ranks each compute a micro-batch of the task's batch
  size (``--batch-size`` is per rank) and average their gradients every step,
  so the worker trains as one process on G times the batch. The simulator
  runs one model per worker whose step's loss is the mean of G micro-batch
  losses (worker w's micro-batch r from ``task.batches(w * G + r, n * G,
  seed)``): its gradient is the ranks' gradient mean. Loss curves are those
  of the bigger batch, and tokens count all G micro-batches.
- **Step time.** ``--step-time`` is one rank's step; the ranks compute in
  parallel on their own devices, so a worker's step takes ``--step-time``.
  The gradient all-reduce inside the worker (NVLink, PCIe or loopback,
  overlapped with the backward pass by DDP) is not modelled: it costs no time.
- **Outer exchange** (`SplitAverager`): rank r averages slice r of each
  exchange (`split_pieces`, cut at the codec's `unit`, as the real
  ``"split"`` mode) under ``f"{key}/part{r}of{G}"``, so bytes per rank, wire
  headers included, are exactly the real ones, error-feedback residuals
  live per slice, and a lossy codec's rounding (each slice's butterfly shards
  its own slice) and a robust aggregator's per-vector rules act per slice, as
  they do in the real worker. The G slices go out at once over the worker machine's one
  link (``--bandwidth`` is per worker machine): phase k of the exchange moves
  the sum of the ranks' phase-k bytes, and pays one latency (the ranks wait
  in parallel), as does matchmaking. The all-gather of the averaged slices
  inside the worker is local and, like the gradient all-reduce, not modelled.

With G = 1 nothing is wrapped and nothing changes.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lowcomm.averaging import AverageResult, Compression, flatten, unflatten
from lowcomm.optimizers.worker_group import codec_unit, combine_slices, slice_meta, split_pieces


def merge_phases(parts: Sequence[Sequence[tuple[int, int]]]) -> list[tuple[int, int]]:
    """The phases of G slices exchanged at once over one link: phase k sends and
    receives the sum of every slice's phase-k bytes (slices of fewer phases
    add nothing to the later ones)."""
    out: list[tuple[int, int]] = []
    for phases in parts:
        for k, (sent, received) in enumerate(phases):
            if k == len(out):
                out.append((0, 0))
            out[k] = (out[k][0] + sent, out[k][1] + received)
    return out


class SplitAverager:
    """A simulated worker of ``ranks`` processes over its averager (see the
    module doc): each call is averaged as ``ranks`` slices, one per rank.
    ``copies``: the calls' tensors are this many equal runs back to back
    (`lowcomm.optimizers.base.OuterOptimizer.exchange_copies`).
    ``bytes_sent_by_rank``: bytes each rank sent so far."""

    def __init__(self, inner, ranks: int, copies: int = 1):
        if type(ranks) is not int or ranks < 1:
            raise ValueError(f"ranks must be a positive integer, got {ranks!r}")
        self.inner, self.ranks, self.copies = inner, ranks, copies
        self.bytes_sent_by_rank = [0] * ranks

    @property
    def peer_id(self) -> str:
        return self.inner.peer_id

    def average(self, key: str, tensors: Sequence[torch.Tensor], *, round: int, group_size: int | None = None,
                weight: float = 1.0, compressor: Compression = None) -> _SplitHandle:
        tensors = list(tensors)
        vector = flatten(tensors)
        pieces = split_pieces(vector.numel(), self.ranks, codec_unit(compressor), self.copies)
        handles = []
        for r, ranges in enumerate(pieces):
            if not ranges:
                handles.append(None)
                continue
            mine = [vector[a:b] for a, b in ranges]
            handles.append(self.inner.average(f"{key}/part{r}of{self.ranks}", mine, round=round,
                                              group_size=group_size, weight=weight, compressor=compressor))
        return _SplitHandle(self, key, tensors, pieces, handles)


class _SplitHandle:
    """One call's G slices in flight; `result` puts them back together."""

    def __init__(self, owner: SplitAverager, key: str, like: list[torch.Tensor], pieces: list, handles: list):
        self.owner, self.key, self.like, self.pieces, self.handles = owner, key, like, pieces, handles
        self._result: AverageResult | None = None

    def done(self) -> bool:
        return all(h is None or h.done() for h in self.handles)

    def result(self, timeout: float | None = None) -> AverageResult:
        if self._result is not None:
            return self._result
        numel = sum(t.numel() for t in self.like)
        values, sent = torch.empty(numel), torch.empty(numel)
        metas, results = [], []
        for r, (ranges, handle) in enumerate(zip(self.pieces, self.handles)):
            if handle is None:
                metas.append(slice_meta(AverageResult([], True), 0, self.key))
                continue
            res = handle.result(timeout)
            metas.append(slice_meta(res, sum(b - a for a, b in ranges), self.key))
            results.append(res)
            self.owner.bytes_sent_by_rank[r] += res.bytes_sent
            own, start = flatten(res.tensors), 0
            mine = flatten(res.sent) if res.sent is not None else None
            for a, b in ranges:
                values[a:b] = own[start:start + b - a]
                if mine is not None:
                    sent[a:b] = mine[start:start + b - a]
                start += b - a
        # the flags as a real worker combines them; the bytes and phases are the whole worker's
        whole = AverageResult([], True, bytes_sent=sum(r.bytes_sent for r in results),
                              bytes_received=sum(r.bytes_received for r in results),
                              phases=merge_phases([r.phases for r in results]))
        self._result = combine_slices(metas, whole, unflatten(values, self.like),
                                      [sent] if all(r.sent is not None for r in results) else None)
        return self._result

