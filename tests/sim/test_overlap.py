"""DDP's bucketed all-reduce overlapping the backward pass, with exact numbers."""

import pytest
import torch

from lowcomm.compressors import get_compressor, wire_size
from lowcomm.optimizers.registry import get_algorithm, settings_for
from lowcomm.sim.network import Network, exchange_phases
from lowcomm.sim.overlap import (
    BUCKET_BYTES, DEFAULT_BACKWARD_SHARE, FIRST_BUCKET_BYTES, BackwardShareError, bucket_numels, ddp_buckets,
    ddp_step_time, filled_buckets, parse_backward_share,
)
from lowcomm.sim.plan import predict
from lowcomm.sim.runner import measure_step_time
from tests.sim.tinytask import task

NONE = get_compressor("none")
MiB = 1024 * 1024


def test_bucket_caps_are_torchs():
    import torch.distributed as dist
    from torch.nn.parallel import distributed as ddp

    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    assert FIRST_BUCKET_BYTES == dist._DEFAULT_FIRST_BUCKET_BYTES == MiB
    assert BUCKET_BYTES == ddp._DEFAULT_BUCKET_CAP_MB * ddp._MB_TO_BYTES == 25 * MiB


@pytest.mark.parametrize("numels", [
    [100_000, 7_000_000, 10, 30_000_000, 5, 262_144, 1],
    [262_144],                       # exactly 1 MiB: one bucket, closed
    [262_143, 1, 1],                 # the first two (in reverse) do not reach 1 MiB, the third does
    [1000] * 3000,                   # many small tensors: 1 MiB, then 25 MiB buckets
    [50_000_000, 3, 6_553_600, 6_553_599, 2],
    [161],
])
def test_buckets_match_torchs_assignment(numels):
    """The buckets torch DDP uses after its first iteration: c10d's assignment
    over the parameters in the order their gradients become ready (reverse
    model order), with caps [1 MiB, 25 MiB]."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    tensors = [torch.empty(n, device="meta") for n in numels]
    order = list(reversed(range(len(numels))))
    want, _ = dist._compute_bucket_assignment_by_size([tensors[i] for i in order],
                                                      [dist._DEFAULT_FIRST_BUCKET_BYTES, 25 * MiB],
                                                      [False] * len(numels), order)
    assert ddp_buckets(numels) == want


def test_filled_buckets():
    assert filled_buckets(100) == [100]
    assert filled_buckets(MiB // 4 + 25 * MiB // 4 * 2 + 7) == [MiB // 4, 25 * MiB // 4, 25 * MiB // 4, 7]
    # a model of many small tensors gets the same buckets
    assert bucket_numels([1] * (MiB // 4 + 25 * MiB // 4 + 3)) == filled_buckets(MiB // 4 + 25 * MiB // 4 + 3)


def _allreduce_time(net: Network, numel: int, n: int = 2) -> float:
    """Butterfly of ``numel`` fp32 values in a group of n: two phases, each moving
    (n - 1) shards each way (n = 2: one shard of numel / 2)."""
    assert n == 2 and numel % 2 == 0
    shard = wire_size(NONE, numel // 2)
    return 2 * (shard * 8 / net.bandwidth + net.latency)


def test_two_buckets_first_hidden_behind_the_backward_pass():
    # model order: a 300,000-value tensor, then one of 262,144 (1 MiB): the latter closes bucket 1 alone
    numels = [300_000, 262_144]
    assert ddp_buckets(numels) == [[1], [0]]
    net = Network(bandwidth=8e6, latency=0.01)  # 1 MB/s
    t1, t2 = _allreduce_time(net, 262_144), _allreduce_time(net, 300_000)
    assert t1 == pytest.approx(2 * (524_288 / 1e6 + 0.01), rel=1e-3)  # ~1.07 s
    # 10 s step, backward 8 s (t = 2 .. 10): bucket 1 is ready at 10 - 8 * 300000/562144 = 5.73 s and done
    # by 6.80 s; bucket 2 is ready when the backward pass ends and is the only stall
    wall, stall = ddp_step_time(numels, 10.0, 0.8, net, 2)
    assert stall == pytest.approx(t2, rel=1e-12)
    assert wall == pytest.approx(10.0 + t2, rel=1e-12)


def test_two_buckets_link_bound():
    numels = [300_000, 262_144]
    net = Network(bandwidth=8e6, latency=0.01)
    t1, t2 = _allreduce_time(net, 262_144), _allreduce_time(net, 300_000)
    # 1 s step, backward 0.5 s (t = 0.5 .. 1): bucket 1 ready at 1 - 0.5 * 300000/562144 = 0.7332 s; its
    # all-reduce (1.07 s) outlasts the backward pass, so bucket 2 waits for the link
    ready1 = 1.0 - 0.5 * 300_000 / 562_144
    wall, stall = ddp_step_time(numels, 1.0, 0.5, net, 2)
    assert stall == pytest.approx(ready1 + t1 + t2 - 1.0, rel=1e-12)
    assert wall == pytest.approx(ready1 + t1 + t2, rel=1e-12)
    assert stall < t1 + t2  # less than without overlap, by the 0.267 s bucket 1 started early
    assert t1 + t2 - stall == pytest.approx(1.0 - ready1, rel=1e-12)


@pytest.mark.parametrize("share", [0.0, 0.5, DEFAULT_BACKWARD_SHARE, 1.0])
def test_one_bucket_does_not_overlap(share):
    """A model under 1 MiB is one bucket, ready when the backward pass ends:
    the stall is the whole exchange, as without overlap, whatever the share."""
    numels = [1000, 24, 50_000]  # 204 kB of gradients
    net = Network(bandwidth=1e7, latency=0.02)
    whole = net.transfer_time(exchange_phases(NONE, sum(numels), 4))
    wall, stall = ddp_step_time(numels, 0.3, share, net, 4)
    assert stall == pytest.approx(whole, rel=1e-12) and wall == pytest.approx(0.3 + whole, rel=1e-12)


def test_alone_no_exchange():
    assert ddp_step_time([10_000_000], 1.0, 0.5, Network(1e6, 0.1), 1) == (1.0, 0.0)


@pytest.mark.parametrize("share", [0.0, 0.3, 0.9])
def test_plan_runs_the_same_step_every_step(share):
    """`predict` over many steps stalls each step by `ddp_step_time`'s stall (steady state)."""
    numels = task(hidden=512, depth=2).make_model(0).parameters()
    numels = [p.numel() for p in numels]
    net = Network(2e9, 1e-3)
    sched = get_algorithm("ddp").schedule(settings_for("ddp"), sum(numels), 4)
    assert sched.overlap_backward
    clock = predict(sched, 0.02, net, 50, share, numels)
    wall, stall = ddp_step_time(numels, 0.02, share, net, 4)
    assert clock.stall == pytest.approx(50 * stall, rel=1e-9)
    assert clock.now == pytest.approx(50 * wall, rel=1e-9)


def test_only_ddp_overlaps():
    overlapping = {name for name in ("ddp", "dgc", "diloco", "streaming", "noloco", "sparseloco")
                   if get_algorithm(name).overlaps_backward}
    assert overlapping == {"ddp"}
    sched = get_algorithm("dgc").schedule(settings_for("dgc"), 10_000_000, 4)
    assert not sched.overlap_backward


def test_parse_backward_share():
    assert parse_backward_share("auto") is None and parse_backward_share("0.6") == 0.6
    assert parse_backward_share("0") == 0.0 and parse_backward_share("1") == 1.0
    for bad in ("1.5", "-0.1", "most", "nan", ""):
        with pytest.raises(BackwardShareError, match=r"\[0, 1\]"):
            parse_backward_share(bad)


def test_measured_backward_share_is_a_share():
    seconds, share = measure_step_time(task(hidden=64, depth=2), 0, 1e-2)
    assert seconds > 0 and 0.0 < share < 1.0
