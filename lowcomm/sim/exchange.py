"""The exchange patterns of group averaging, computed in one process.

Every member's payloads go through the real codecs and the real wire format
(sizes are ``len(encode(payload))``), so bytes and numerical effects are
exactly those of the network protocol:

- **butterfly** (dense codecs): reduce-scatter then all-gather. The flat
  vector is cut into one shard per member; member i compresses shard j of its
  contribution and sends it to member j (phase 1); member j averages its shard
  in fp32, compresses the mean once and sends it to every other member
  (phase 2). Everyone, the reducer included, uses the decompressed mean, so
  all members end with identical values. Per member and round that is about
  2 (n-1)/n of the payload each way.
- **all-gather** (sparse codecs): every member sends its whole compressed
  contribution to every other member; each averages the n decompressed
  contributions. (n-1) payloads each way, in one phase.

Each shard (butterfly) or the gathered set (all-gather) is combined by the
group's reducer (`lowcomm.averaging.reduce`): the weighted mean, renormalised
over the members present, unless the swarm chose a robust rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowcomm.averaging import AverageResult, Compression, shard_bounds, unflatten
from lowcomm.averaging.patterns import allgather_phases, butterfly_phases
from lowcomm.averaging.reduce import Reducer, get_reducer
from lowcomm.compressors import Compressor, ErrorFeedback, encode, get_compressor


@dataclass
class Contribution:
    """One member's input to a group exchange."""

    peer_id: str
    tensors: list[torch.Tensor]   # as the caller passed them
    vector: torch.Tensor          # flat fp32 contribution (error feedback already added)
    weight: float
    compression: Compression
    key: str


def codec_of(compression: Compression) -> Compressor:
    if isinstance(compression, ErrorFeedback):
        return compression.compressor
    return compression if compression is not None else get_compressor("none")


def _roundtrip(codec: Compressor, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    payload = codec.compress(x)
    return codec.decompress(payload).to(torch.float32), len(encode(payload))


def exchange(group: list[Contribution], reducer: Reducer | None = None) -> list[AverageResult]:
    """Average one group with ``reducer`` (the weighted mean by default); one
    result per member, in the group's order."""
    reducer = reducer or get_reducer("mean")
    ids = [c.peer_id for c in group]
    if len(group) == 1:
        c = group[0]
        return [AverageResult([t.detach().clone() for t in c.tensors], True, ids)]
    codec = codec_of(group[0].compression)
    results = (_all_gather if codec.sparse else _butterfly)(group, reducer)
    for c, r in zip(group, results):
        r.participants = ids
        if isinstance(c.compression, ErrorFeedback) and r.sent is not None:
            c.compression.absorb(c.key, c.vector, torch.cat([s.reshape(-1) for s in r.sent]).float())
    return results


def _butterfly(group: list[Contribution], reducer: Reducer) -> list[AverageResult]:
    n = len(group)
    bounds = shard_bounds(group[0].vector.numel(), n)
    # phase 1: decoded[i][j] is member i's shard j as reducer j receives it
    decoded, size = [[None] * n for _ in range(n)], [[0] * n for _ in range(n)]
    for i, c in enumerate(group):
        codec = codec_of(c.compression)
        for j, (lo, hi) in enumerate(bounds):
            decoded[i][j], size[i][j] = _roundtrip(codec, c.vector[lo:hi])
    # phase 2: reducer j averages shard j in fp32 and sends the compressed mean to all
    means, mean_size, outliers = [], [], set()
    for j in range(n):
        reduced = reducer.reduce({c.peer_id: (c.weight, decoded[i][j]) for i, c in enumerate(group)})
        acc = reduced.value
        outliers.update(reduced.outliers)
        reducer_codec = codec_of(group[j].compression)
        mean, nbytes = _roundtrip(type(reducer_codec)(**reducer_codec.options()), acc)
        means.append(mean)
        mean_size.append(nbytes)
    vector = torch.cat(means)
    results = []
    for i, c in enumerate(group):
        phases = butterfly_phases(size, mean_size, i)
        results.append(AverageResult(
            unflatten(vector.clone(), c.tensors), True, bytes_sent=sum(s for s, _ in phases),
            bytes_received=sum(r for _, r in phases), phases=phases, sent=[torch.cat(decoded[i])],
            outliers=sorted(outliers)))
    return results


def _all_gather(group: list[Contribution], reducer: Reducer) -> list[AverageResult]:
    n = len(group)
    decoded, size = zip(*(_roundtrip(codec_of(c.compression), c.vector) for c in group))
    reduced = reducer.reduce({c.peer_id: (c.weight, d) for c, d in zip(group, decoded)})
    vector = reduced.value
    results = []
    for i, c in enumerate(group):
        (phase,) = allgather_phases(size, i)
        results.append(AverageResult(unflatten(vector.clone(), c.tensors), True, bytes_sent=phase[0],
                                     bytes_received=phase[1], phases=[phase], sent=[decoded[i]],
                                     outliers=list(reduced.outliers)))
    return results
