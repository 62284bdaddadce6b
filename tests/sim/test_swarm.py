"""LocalSwarm: exact means, group draws, leaving, deadlines, byte counts."""

import pytest
import torch

from lowcomm.averaging import draw_groups, group_seed, shard_bounds
from lowcomm.compressors import encode, get_compressor
from lowcomm.sim import LocalSwarm


def test_exact_weighted_mean_and_identical_results():
    swarm = LocalSwarm(4)

    def fn(rank, av):
        x = [torch.full((5,), float(rank)), torch.full((2, 3), 10.0 * rank)]
        return av.average("k", x, round=0, weight=rank + 1).result()

    results = swarm.run(fn)
    want = sum((r + 1) * r for r in range(4)) / 10  # weighted mean of the ranks: 2.0
    for r in results:
        assert r.averaged and r.group_size == 4
        assert torch.equal(r.tensors[0], torch.full((5,), want))
        assert torch.equal(r.tensors[1], torch.full((2, 3), 10 * want))


def test_pairs_are_disjoint_cover_everyone_and_repeat_across_runs():
    def fn(rank, av):
        return av.average("k", [torch.tensor([float(rank)])], round=3, group_size=2).result()

    a = LocalSwarm(8, seed=1).run(fn)
    b = LocalSwarm(8, seed=1).run(fn)
    groups = {tuple(r.participants) for r in a}
    assert len(groups) == 4 and sorted(p for g in groups for p in g) == [LocalSwarm.peer_id(i) for i in range(8)]
    assert [r.participants for r in a] == [r.participants for r in b]
    for r in a:  # each pair holds its own mean
        ranks = [int(p[-5:]) for p in r.participants]
        assert r.tensors[0].item() == sum(ranks) / 2


def test_draw_groups_odd_count_and_rounds_differ():
    members = [f"p{i}" for i in range(7)]
    g = draw_groups(members, group_seed("run", "k", 0), 2)
    assert sorted(len(x) for x in g) == [2, 2, 3]
    assert sorted(m for x in g for m in x) == members
    draws = {tuple(map(tuple, draw_groups(members, group_seed("run", "k", r), 2))) for r in range(10)}
    assert len(draws) > 5
    assert draw_groups(members, b"s", None) == [members]
    with pytest.raises(ValueError, match="group_size"):
        draw_groups(members, b"s", 1)


def test_a_rank_that_leaves_is_not_waited_for():
    swarm = LocalSwarm(3)

    def fn(rank, av):
        if rank == 2:
            return None  # leaves without contributing
        return av.average("k", [torch.tensor([float(rank)])], round=0).result()

    r0, r1, _ = swarm.run(fn)
    assert r0.averaged and r0.tensors[0].item() == 0.5 and r0.group_size == 2


def test_deadline_returns_own_tensors_flagged():
    swarm = LocalSwarm(2, deadline=0.05)
    x = torch.tensor([3.0])
    r = swarm.averager(0).average("k", [x], round=0).result()  # rank 1 never comes
    assert not r.averaged and r.tensors[0].item() == 3.0 and "deadline" in r.reason


def test_butterfly_bytes_equal_encoded_sizes():
    n, numel = 3, 1000
    codec = get_compressor("int8", block_size=64)
    swarm = LocalSwarm(n)
    results = swarm.run(lambda rank, av: av.average(
        "k", [torch.randn(numel, generator=torch.Generator().manual_seed(rank))], round=0, compressor=codec).result())
    sizes = [len(encode(codec.compress(torch.zeros(hi - lo)))) for lo, hi in shard_bounds(numel, n)]
    for i, r in enumerate(results):
        want = sum(s for j, s in enumerate(sizes) if j != i) + (n - 1) * sizes[i]
        assert r.bytes_sent == want
        assert r.phases[0][1] == (n - 1) * sizes[i]  # reducer i receives shard i from the others
    assert sum(r.bytes_sent for r in results) == sum(r.bytes_received for r in results)


def test_all_gather_for_sparse_codecs():
    codec = get_compressor("topk", k=10, chunk_size=100, values="fp32")
    results = LocalSwarm(2).run(lambda rank, av: av.average(
        "k", [torch.arange(200.0) * (rank + 1)], round=0, compressor=codec).result())
    size = len(encode(codec.compress(torch.zeros(200))))
    assert all(r.bytes_sent == size and len(r.phases) == 1 for r in results)
    # top 10 of each chunk is the same set for both; mean of x and 2x is 1.5x there
    want = torch.zeros(200)
    want[90:100], want[190:200] = torch.arange(90.0, 100) * 1.5, torch.arange(190.0, 200) * 1.5
    assert torch.equal(results[0].tensors[0], want)
