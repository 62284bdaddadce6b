"""The network model with exact numbers."""

import pytest
import torch

from lowcomm.averaging import AverageResult
from lowcomm.compressors import encode, get_compressor
from lowcomm.optimizers import DataParallel
from lowcomm.sim import LocalSwarm
from lowcomm.sim.network import (
    Network, NetworkModel, NetworkSpecError, parse_bandwidth, parse_duration, swarm_round,
)
from lowcomm.optimizers.registry import SyncSchedule
from lowcomm.sim.plan import exchange_phases, predict


def test_parse_units():
    assert parse_bandwidth("100Mbit") == 1e8
    assert parse_bandwidth("1gbit") == 1e9
    assert parse_bandwidth("12.5MB/s") == 1e8
    assert parse_bandwidth("100 Mbps") == 1e8
    assert parse_duration("50ms") == pytest.approx(0.05)
    assert parse_duration("0.2s") == 0.2 and parse_duration("200us") == pytest.approx(2e-4)
    for bad in ("10 potatoes", "", "-5Mbit", "fast"):
        with pytest.raises(NetworkSpecError, match="bandwidth"):
            parse_bandwidth(bad)
    with pytest.raises(NetworkSpecError, match="duration"):
        parse_duration("5 parsecs")


def test_ddp_step_time_is_bytes_over_bandwidth_plus_latency_per_hop():
    net = Network(bandwidth=8e6, latency=0.01)  # 1 MB/s, 10 ms per hop
    swarm = LocalSwarm(2)
    model = NetworkModel(net, [swarm.peer_id(r) for r in range(2)])

    def fn(rank, av):
        p = torch.nn.Parameter(torch.zeros(1000))
        opt = DataParallel([p], torch.optim.SGD([p], lr=0.1), model.wrap(av))
        p.grad = torch.ones(1000)
        model.compute(av.peer_id, 0.5)
        opt.step()
        return opt.stats

    swarm.run(fn)
    shard = len(encode(get_compressor("none").compress(torch.zeros(500))))  # each member reduces 500 floats
    # matchmaking's two hops (JOIN, roster), then two phases (reduce-scatter, all-gather) each moving one
    # shard each way
    want = 2 * 0.01 + 2 * (shard * 8 / 8e6 + 0.01)
    for c in model.clocks.values():
        assert c.now == pytest.approx(0.5 + want, rel=1e-12)
        assert c.stall == pytest.approx(want, rel=1e-12)
        assert c.utilization == pytest.approx(0.5 / (0.5 + want))


def _exchange(model, key, sent_at, needed_at, phases):
    for peer in model.clocks:
        c = model.clocks[peer]
        c.now = c.compute = sent_at
        model.sent(peer, key, 0)
    for peer in model.clocks:
        model.compute(peer, needed_at - sent_at)
    return [model.received(p, key, 0, AverageResult([], True, list(model.clocks), phases=phases))
            for p in model.clocks]


def test_transfer_shorter_than_overlap_does_not_stall():
    model = NetworkModel(Network(8e6, 0.5), ["a", "b"])
    # two matchmaking hops (1 s), then 2 MB at 1 MB/s + 0.5 s latency: 3.5 s, hidden behind 4 s of compute
    stalls = _exchange(model, "k", 1.0, 5.0, [(2_000_000, 2_000_000)])
    assert stalls == [0.0, 0.0]
    assert all(c.utilization == 1.0 and c.now == 5.0 for c in model.clocks.values())


def test_transfer_longer_than_overlap_stalls_by_the_difference():
    model = NetworkModel(Network(8e6, 0.5), ["a", "b"])
    # 1 s of matchmaking, 4 MB -> 4.5 s: 5.5 s, only 3 s of compute to hide it: 2.5 s stall
    stalls = _exchange(model, "k", 1.0, 4.0, [(4_000_000, 1_000_000)])
    assert stalls == [pytest.approx(2.5), pytest.approx(2.5)]
    assert all(c.now == pytest.approx(6.5) and c.utilization == pytest.approx(4.0 / 6.5)
               for c in model.clocks.values())


def test_group_waits_for_its_latest_member():
    model = NetworkModel(Network(8e6, 0.0), ["a", "b"])
    model.compute("a", 1.0)
    model.sent("a", "k", 0)
    model.compute("b", 3.0)
    model.sent("b", "k", 0)
    r = AverageResult([], True, ["a", "b"], phases=[(1_000_000, 1_000_000)])
    assert model.received("a", "k", 0, r) == pytest.approx(3.0)  # waits for b (2 s) and the transfer (1 s)
    assert model.received("b", "k", 0, r) == pytest.approx(1.0)


def test_streaming_schedule_stalls_exactly():
    codec = get_compressor("none")
    phases = exchange_phases(codec, 1000, 2)
    net = Network(8e3, 0.1)  # 1 kB/s: about 4.5 s for matchmaking's two hops and the exchange's two
    transfer = net.transfer_time(swarm_round(phases))
    assert transfer == pytest.approx(net.transfer_time(phases) + 0.2)
    assert 4 < transfer < 5
    # tau steps of 1 s each hide a transfer of `transfer` seconds iff tau >= transfer
    for tau in (1, 3, 5):
        sched = SyncSchedule(every=10, numels=[1000], offsets=[0], delay=tau, group=2, compressor=codec)
        clock = predict(sched, 1.0, net, 100)
        stall_each = max(0.0, transfer - tau)
        assert clock.stall == pytest.approx(stall_each * 9)  # sends at 10..90 are applied within 100 steps
        assert clock.utilization == pytest.approx(100 / (100 + 9 * stall_each))
        assert (clock.utilization == 1.0) == (tau == 5)
