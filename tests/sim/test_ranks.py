"""`lowcomm.sim.ranks`: a simulated worker of G ranks averages G slices, as the real split mode."""

import torch

from lowcomm.compressors import get_compressor
from lowcomm.sim.ranks import SplitAverager, merge_phases
from lowcomm.sim.swarm import LocalSwarm


def test_merge_phases_sums_each_phase_over_the_slices():
    assert merge_phases([[(10, 20), (30, 5)], [(1, 2), (3, 4)], []]) == [(11, 22), (33, 9)]
    assert merge_phases([]) == []


def run_split(codec, ranks):
    x = [torch.arange(10.0).reshape(2, 5), -torch.arange(10.0).reshape(2, 5) * 0.5]
    whole = LocalSwarm(2).run(lambda r, avg: avg.average("k", [x[r]], round=0, compressor=codec).result(5))
    splits = {}

    def split(r, avg):
        splits[r] = SplitAverager(avg, ranks)
        return splits[r].average("k", [x[r]], round=0, compressor=codec).result(5)

    return whole, LocalSwarm(2).run(split), [splits[r].bytes_sent_by_rank for r in range(2)]


def test_split_worker_averages_like_a_single_process():
    whole, parts, _ = run_split(get_compressor("none"), 3)
    for w, p in zip(whole, parts):
        assert torch.equal(w.tensors[0], p.tensors[0]) and p.averaged
        assert p.participants == ["worker00000", "worker00001"]
        assert len(p.phases) == 2


def test_split_worker_counts_bytes_per_rank_at_codec_units():
    """int8 in blocks of 8: 10 values are 2 units, so rank 2 of 3 has nothing to send."""
    _, parts, by_rank = run_split(get_compressor("int8", block_size=8), 3)
    for p, ranks in zip(parts, by_rank):
        assert ranks[2] == 0 and ranks[0] > 0 and ranks[1] > 0
        assert sum(ranks) == p.bytes_sent == sum(s for s, _ in p.phases)
