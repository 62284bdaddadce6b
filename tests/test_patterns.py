"""The exchange patterns' byte counts: hand-computed, and equal to what the simulator moves."""

import pytest
import torch

from lowcomm.averaging.patterns import allgather_phases, backup_reducer, butterfly_phases
from lowcomm.compressors import get_compressor
from lowcomm.sim import LocalSwarm
from lowcomm.sim.plan import exchange_phases


def test_butterfly_and_allgather_phases_by_hand():
    parts = [[10, 11, 12], [20, 21, 22], [30, 31, 32]]  # parts[i][j]: member i's shard j
    means = [5, 6, 7]
    # member 1 sends its shards 0 and 2 (20 + 22), receives shard 1 of members 0 and 2 (11 + 31);
    # then sends its mean twice (2 * 6) and receives the other two means (5 + 7)
    assert butterfly_phases(parts, means, 1) == [(42, 42), (12, 12)]
    assert allgather_phases([100, 200, 300], 0) == [(200, 500)]
    assert [backup_reducer(j, 3) for j in range(3)] == [1, 2, 0]


@pytest.mark.parametrize("name", ["none", "fp4", "int8", "topk"])
def test_plan_counts_the_bytes_the_simulator_moves(name):
    n, numel = 4, 10_000
    codec = lambda: get_compressor(name)  # noqa: E731
    xs = [torch.randn(numel, generator=torch.Generator().manual_seed(i)) for i in range(n)]
    results = LocalSwarm(n).run(lambda r, av: av.average("k", [xs[r]], round=0, compressor=codec()).result())
    for member, r in enumerate(results):
        assert r.phases == exchange_phases(codec(), numel, n, member)
