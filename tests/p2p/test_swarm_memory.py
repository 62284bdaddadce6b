"""The swarm protocol over MemoryTransport: exact means, pairs, crashes, corruption, late joiners."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import torch

from lowcomm.compressors import WireFormatError, codec_names, encode_segments, get_compressor, wire_size
from lowcomm.p2p import MemoryNetwork, Swarm, messages

FAST = dict(window=1.0, base_timeout=2.0, membership_ttl=30.0)


@pytest.fixture
def swarms():
    made = []

    def make(n, net=None, names=None, run_id="test", **kw):
        net = net or MemoryNetwork()
        new = [Swarm(net.transport(names[i] if names else f"peer{i:02d}"), run_id, **{**FAST, **kw})
               for i in range(n)]
        made.extend(new)
        for s in new:
            s.members()  # refresh everyone's view
        return net, new

    yield make
    for s in made:
        s.close()


def values(n, numel=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(numel, generator=g) for _ in range(n)]


def run_round(swarms, tensors, round=0, **kw):
    handles = [s.average("k", [t], round=round, **kw) for s, t in zip(swarms, tensors)]
    return [h.result() for h in handles]


def test_eight_peers_get_the_exact_fp32_mean(swarms):
    _, nodes = swarms(8)
    for s in nodes:
        assert len(s.members()) == 8
    xs = values(8)
    want = torch.stack(xs).double().mean(0)
    for r in run_round(nodes, xs):
        assert r.averaged and r.group_size == 8 and all(r.shards_averaged)
        assert torch.allclose(r.tensors[0].double(), want, atol=1e-6, rtol=0)
    # identical on every peer, bit for bit
    results = run_round(nodes, xs, round=1)
    assert all(torch.equal(r.tensors[0], results[0].tensors[0]) for r in results)


@pytest.mark.parametrize("n", [8, 7])
def test_pairs_are_disjoint_and_cover_every_peer(swarms, n):
    _, nodes = swarms(n)
    xs = [torch.full((10,), float(i)) for i in range(n)]
    results = run_round(nodes, xs, group_size=2)
    groups = {tuple(r.participants) for r in results}
    members = sorted(p for g in groups for p in g)
    assert members == sorted(s.peer_id for s in nodes)  # disjoint and covering
    assert sorted(len(g) for g in groups) == ([2] * 4 if n == 8 else [2, 2, 3])  # odd: one group of 3
    ids = [s.peer_id for s in nodes]
    for r in results:
        want = sum(ids.index(p) for p in r.participants) / len(r.participants)
        assert torch.allclose(r.tensors[0], torch.full((10,), want))


def test_a_peer_killed_mid_round_leaves_the_mean_of_the_rest(swarms):
    net, nodes = swarms(8)
    victim = nodes[7]
    net.crash(victim.peer_id, after=1)  # it sends its JOIN, then dies before any part
    xs = values(8, seed=1)
    want = torch.stack(xs[:7]).double().mean(0)
    results = run_round(nodes, xs)
    for r in results[:7]:
        assert r.averaged and all(r.shards_averaged)  # the dead reducer's shard was taken over
        assert torch.allclose(r.tensors[0].double(), want, atol=1e-6, rtol=0)
        assert victim.peer_id not in r.participants
    assert not results[7].averaged  # the dead peer got nothing back


def _corrupt_blobs(data: bytes) -> bytes:
    """Part messages get the second half of their blob overwritten with 0xff (NaNs)."""
    try:
        msg = messages.unpack("part", data)
    except WireFormatError:
        return data  # a control message: sent as is
    blob = bytearray(msg.pop("blob"))
    blob[len(blob) // 2:] = b"\xff" * (len(blob) - len(blob) // 2)
    del msg["kind"]
    return b"".join(messages.pack_part(bytes(blob), **msg))


def test_a_peer_sending_garbage_is_excluded(swarms):
    net, nodes = swarms(8)
    liar = nodes[3]
    net.corrupt(liar.peer_id, _corrupt_blobs)
    xs = values(8, seed=2)
    honest = [x for i, x in enumerate(xs) if i != 3]
    want = torch.stack(honest).double().mean(0)
    results = run_round(nodes, xs)
    for i, r in enumerate(results):
        if i == 3:
            continue
        assert liar.peer_id not in r.participants
        assert torch.allclose(r.tensors[0].double(), want, atol=1e-6, rtol=0)


def test_a_late_joiner_takes_part_from_the_next_round(swarms):
    net, nodes = swarms(4)
    xs = values(5, seed=3)
    handles = [s.average("k", [t], round=0) for s, t in zip(nodes, xs[:4])]
    first = [h.result() for h in handles]
    assert all(r.group_size == 4 for r in first)
    _, (late,) = swarms(1, net=net, names=["peer99"])
    assert late.members() and len(late.members()) == 5
    for s in nodes:
        s.members()
    # round 0 is over: the newcomer is told so and keeps its tensors
    r_late = late.average("k", [xs[4]], round=0).result()
    assert not r_late.averaged and "roster" in r_late.reason
    second = run_round(nodes + [late], xs, round=1)
    want = torch.stack(xs).double().mean(0)
    for r in second:
        assert r.group_size == 5 and torch.allclose(r.tensors[0].double(), want, atol=1e-6, rtol=0)


def test_int8_and_topk_on_the_wire(swarms):
    _, nodes = swarms(4)
    xs = values(4, numel=4096, seed=4)
    want = torch.stack(xs).mean(0)
    codec = get_compressor("int8", block_size=256)
    for r in run_round(nodes, xs, compressor=codec):
        # each contribution and the mean are int8-rounded: two roundings of at most absmax/254
        assert (r.tensors[0] - want).abs().max() <= 2 * max(x.abs().max() for x in xs) / 254
        assert r.bytes_sent < 4096 * 2 * 1.1  # about 2 (n-1)/n bytes per value each way at 8 bits
    topk = get_compressor("topk", density=0.1, chunk_size=256, values="fp32")
    results = run_round(nodes, xs, round=1, compressor=topk)
    sparse_mean = torch.stack([topk.decompress(topk.compress(x)) for x in xs]).mean(0)
    for r in results:
        assert torch.allclose(r.tensors[0], sparse_mean, atol=1e-6)


def test_rounds_run_in_the_background():
    net = MemoryNetwork()
    a, b = (Swarm(net.transport(f"bg{i}"), "test", **FAST) for i in range(2))
    try:
        a.members(), b.members()
        ha = a.average("k", [torch.ones(3)], round=0)
        assert not ha.done()  # b has not joined: a's call returned at once
        hb = b.average("k", [torch.zeros(3)], round=0)
        assert torch.equal(ha.result().tensors[0], torch.full((3,), 0.5))
        assert torch.equal(hb.result().tensors[0], torch.full((3,), 0.5))
    finally:
        a.close()
        b.close()


def test_deadlines_before_any_measurement_assume_100_mbit():
    net = MemoryNetwork()
    with Swarm(net.transport("solo"), "test", **FAST) as s:
        size = wire_size(get_compressor("none"), 25_000_000)
        assert size == 100_000_000 + len(frame_header_for(25_000_000))
        assert s.deadline_bandwidth() == 100e6
        assert s._timeout(get_compressor("none"), 25_000_000) == pytest.approx(2.0 + 4 * size * 8 / 100e6)


def frame_header_for(numel):
    """The header segment `encode_segments` writes for ``numel`` fp32 values with `none`."""
    return encode_segments(get_compressor("none").compress(torch.zeros(numel)))[0]


def test_measured_upload_rate_sizes_the_deadlines(swarms):
    net, nodes = swarms(4, net=MemoryNetwork(bandwidth=200e6))
    xs = values(4, numel=1_000_000)
    for r in run_round(nodes, xs):
        assert r.averaged
    for s in nodes:
        # each phase sends 3 x 1 MB through one 200 Mbit/s uplink: the estimate is that rate, less overheads
        assert 120e6 < s.bandwidth_estimate() <= 200e6
        record = msgpack.unpackb(net.store["test/members"][s.peer_id][0])
        assert record["bandwidth"] == s.bandwidth_estimate() and record["round"] == 0 == s.round
    size = wire_size(get_compressor("none"), 1_000_000)
    slowest = min(n.bandwidth_estimate() for n in nodes)  # each node published its new rate before returning
    for s in nodes:
        s.members()
        assert s.deadline_bandwidth() == slowest
        assert s._timeout(get_compressor("none"), 1_000_000) == pytest.approx(
            2.0 + 4 * size * 8 / s.deadline_bandwidth())


def test_a_slow_member_lengthens_everyones_deadlines_and_bad_records_are_ignored(swarms):
    net, nodes = swarms(3)
    slow = Swarm(net.transport("slow"), "test", **FAST, bandwidth=5e6)  # nothing measured: states 5 Mbit/s
    try:
        for s in nodes:
            s.members()
            assert s.deadline_bandwidth() == 5e6
        # a record that lies (a negative or absurd rate, or garbage) states nothing
        for record in (msgpack.packb({"bandwidth": -1.0}), msgpack.packb({"bandwidth": True}), b"\xc1garbage"):
            net.store["test/members"]["slow"] = (record, net.clock() + 30)
            assert nodes[0].members() and nodes[0].deadline_bandwidth() == 100e6
    finally:
        slow.close()
    # never sized below min_bandwidth
    with Swarm(net.transport("floor"), "test", **FAST, bandwidth=2e6, min_bandwidth=2e6) as s:
        s.upload.observe([1 << 20], 1e4)  # a measured 839 bits/s
        assert s.bandwidth_estimate() == 8 * (1 << 20) / 1e4
        assert s.deadline_bandwidth() == 2e6
    with pytest.raises(ValueError, match="min_bandwidth"):
        Swarm(net.transport("bad"), "test", bandwidth=1e5)


def test_a_catch_up_keeps_joins_waiting_for_a_coming_round_and_forgets_closed_ones(swarms):
    _, (lead, b, c) = swarms(3, names=["a-lead", "b", "c"])
    xs = [torch.full((10,), float(i)) for i in range(3)]
    # b and c are ahead: their JOINs for round 5 wait in the leader's lobby before it gets there
    early = [s.average("k", [x], round=5) for s, x in zip((b, c), xs[1:])]
    deadline = time.monotonic() + 10
    while len(lead.call(_joined(lead, "k", 5), 5)) < 2:
        assert time.monotonic() < deadline, "the JOINs never reached the leader"
        threading.Event().wait(0.01)
    lead.forget_rounds()  # the leader catches up before its own round 5, as join does
    mine = lead.average("k", [xs[0]], round=5).result()
    results = [mine] + [h.result() for h in early]
    for r in results:
        assert r.participants == ["a-lead", "b", "c"] and torch.equal(r.tensors[0], torch.full((10,), 1.0))
    # a closed roster is forgotten: the round, run again after a catch-up, forms anew
    lead.forget_rounds()
    again = run_round([lead, b, c], [x + 3 for x in xs], round=5)
    assert all(r.participants == ["a-lead", "b", "c"] and torch.equal(r.tensors[0], torch.full((10,), 4.0))
               for r in again)


async def _joined(swarm, key, round):
    return swarm.matchmaker.joined(key, round)


def _codec(name):
    return get_compressor(name, density=0.1, values="fp32") if name in ("topk", "randk") else get_compressor(name)


@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("name", sorted(codec_names()))
def test_every_member_and_the_local_swarm_end_bitwise_equal(swarms, name, group_size):
    # five members, values of very different scales: a sum's order shows in its last bits
    from lowcomm.sim import LocalSwarm

    n = 5
    local = LocalSwarm(n, seed=0)
    _, nodes = swarms(n, names=[local.peer_id(r) for r in range(n)], run_id=local.run_id)
    xs = [x * 10.0 ** (i - 1) for i, x in enumerate(values(n, numel=3000))]
    handles = [s.average("k", [x], round=0, group_size=group_size, compressor=_codec(name))
               for s, x in zip(nodes, xs)]
    real = [h.result() for h in handles]

    def worker(rank, av):
        return av.average("k", [xs[rank]], round=0, group_size=group_size, compressor=_codec(name)).result()

    sim = local.run(worker)
    for a, b in zip(real, sim):
        assert a.averaged and b.averaged and a.participants == b.participants
        assert torch.equal(a.tensors[0], b.tensors[0])
    for a in real:  # every member of a group holds the same bits
        same = [b for b in real if b.participants == a.participants]
        assert all(torch.equal(a.tensors[0], b.tensors[0]) for b in same)


@pytest.mark.parametrize("name", ["none", "topk"])  # butterfly and all-gather
def test_a_robust_reducer_trims_a_scaled_attacker_and_the_leader_excludes_it(swarms, name, caplog):
    n, attacker = 5, 4
    _, nodes = swarms(n, aggregator="trimmed_mean", exclude_after=2, exclude_rounds=5)
    codec = None if name == "none" else get_compressor("topk", density=1.0, values="fp32")
    liar = nodes[attacker].peer_id
    for round in range(3):
        xs = values(n, seed=10 + round)
        xs[attacker] = xs[attacker] * 100
        handles = [s.average("k", [x], round=round, compressor=codec) for s, x in zip(nodes, xs)]
        results = [h.result() for h in handles]
        honest = [r for i, r in enumerate(results) if i != attacker]
        if round < 2:  # in the roster: trimmed, flagged, and the honest mean stays near the honest values
            stacked = torch.stack(xs)
            want = stacked.sort(0).values[1:-1].mean(0)  # 5 members: one trimmed each side
            for r in honest:
                assert liar in r.participants and r.outliers == [liar]
                assert torch.allclose(r.tensors[0], want, atol=1e-5, rtol=0)
        else:  # flagged in 2 consecutive rounds: the leader leaves it out
            assert not results[attacker].averaged and "roster" in results[attacker].reason
            for r in honest:
                assert liar not in r.participants and r.group_size == 4
    assert any(liar in rec.getMessage() and "excluding" in rec.getMessage() for rec in caplog.records)
    assert liar in nodes[0].exclusions.excluded()


def test_a_claimed_weight_of_a_million_does_not_buy_the_mean(swarms):
    _, nodes = swarms(4)
    xs = [torch.full((100,), float(v)) for v in (1.0, 2.0, 3.0, 1000.0)]
    handles = [s.average("k", [x], round=0, weight=1e6 if i == 3 else 1.0) for i, (s, x) in enumerate(zip(nodes, xs))]
    for h in handles:  # capped at 2x the median weight (1): (1 + 2 + 3 + 2 * 1000) / 5
        assert torch.allclose(h.result().tensors[0], torch.full((100,), 2006.0 / 5), atol=1e-3)


def test_a_link_far_slower_than_assumed_halves_the_estimate_until_rounds_fit(swarms):
    # 4 Mbit/s uplinks where 100 Mbit/s is assumed: a phase sends one 250 kB shard (0.5 s), while the
    # first deadline is 0.2 s + 4 x 500 kB at 100 Mbit/s = 0.36 s; each missed phase halves the estimate
    net, nodes = swarms(2, net=MemoryNetwork(bandwidth=4e6), base_timeout=0.2)
    xs = values(2, numel=125_000)
    first = run_round(nodes, xs, round=0)
    assert not any(all(r.shards_averaged) for r in first)
    for s in nodes:
        assert s.bandwidth_estimate() in (50e6, 25e6)  # one or both phases missed, halved once each
    for round_ in range(1, 4):
        results = run_round(nodes, xs, round=round_)
        if all(all(r.shards_averaged) for r in results):
            break
    else:
        raise AssertionError("no round fitted its deadline after three halvings")
    want = (xs[0].double() + xs[1].double()) / 2
    for r in results:
        assert torch.allclose(r.tensors[0].double(), want, atol=1e-6)


def test_upload_rate_halves_once_per_missed_phase():
    from lowcomm.p2p.exchange import UploadRate

    rate = UploadRate(100e6)
    rate.timed_out(("k", 0, "part"))
    rate.timed_out(("k", 0, "part"))  # a second send of the same phase
    assert rate.estimate() == 50e6
    rate.timed_out(("k", 0, "mean"))
    assert rate.estimate() == 25e6
    rate.observe([2_000_000], 0.16)  # 100 Mbit/s measured: the moving average takes 30% of it
    assert rate.estimate() == pytest.approx(0.7 * 25e6 + 0.3 * 100e6)


# --- views of who leads, after churn (a node down for a moment, then back) ---

CHURN = dict(membership_ttl=300.0, base_timeout=5.0)  # suspicions outlast the test unless something lifts them


async def _suspect(swarm, peer):
    swarm.membership.suspect(peer)


def _exact_mean(results, xs):
    want = torch.stack(xs).double().mean(0)
    return all(r.averaged and torch.allclose(r.tensors[0].double(), want, atol=1e-6, rtol=0) for r in results)


def test_a_restarted_leader_is_expected_again_once_its_new_record_is_read(swarms):
    net, (a, b, c) = swarms(3, names=["a", "b", "c"], **CHURN)
    xs = values(3, seed=20)
    assert all(r.participants == ["a", "b", "c"] for r in run_round([a, b, c], xs, round=0))
    a.close()  # a is down: b and c fail to reach it, suspect it and average without it
    assert all(r.participants == ["b", "c"] for r in run_round([b, c], xs[1:], round=1))
    assert b.membership.expected() == c.membership.expected() == ["b", "c"]
    _, (a,) = swarms(1, net=net, names=["a"], **CHURN)  # back, with the same id: it publishes a new record
    for s in (b, c):
        assert "a" in s.members()  # the next refresh reads it: no longer a suspect
    results = run_round([a, b, c], xs, round=2)
    assert all(r.participants == ["a", "b", "c"] for r in results) and _exact_mean(results, xs)


def test_suspicion_lasts_while_the_suspects_record_is_unchanged(swarms):
    net, (a, b) = swarms(2, names=["a", "b"], **CHURN)
    b.call(_suspect(b, "a"), 5)
    b.members()  # the same record of a: still a suspect
    assert b.membership.expected() == ["b"]
    record = msgpack.unpackb(net.store["test/members"]["a"][0])
    record["time"] -= 1.0  # an older record (a stale replica) lifts nothing either
    net.store["test/members"]["a"] = (msgpack.packb(record), net.clock() + 30)
    b.members()
    assert b.membership.expected() == ["b"]
    a.call(a.membership.publish(100e6), 5)  # a republishes (its refresh loop does so every ttl / 3)
    b.members()
    assert b.membership.expected() == ["a", "b"]


def test_a_member_that_wrongly_suspects_the_leader_finds_it_instead_of_averaging_alone(swarms):
    # c failed to reach a once (a was restarting): it skips a as leader and JOINs b, which is a's member;
    # alone in b's lobby it forms no group of one, and asks its suspect a last
    _, (a, b, c) = swarms(3, names=["a", "b", "c"], **CHURN)
    c.call(_suspect(c, "a"), 5)
    xs = values(3, seed=21)
    first = run_round([a, b, c], xs, round=0)
    assert first[0].participants == first[1].participants == ["a", "b"] and _exact_mean(first[:2], xs[:2])
    assert not first[2].averaged and "roster" in first[2].reason  # late for a's roster, but it heard from a
    assert c.membership.expected() == ["a", "b", "c"]
    second = run_round([a, b, c], xs, round=1)
    assert all(r.participants == ["a", "b", "c"] for r in second) and _exact_mean(second, xs)


def test_a_restarted_leader_still_suspected_hands_its_round_on_and_the_views_converge(swarms):
    # a came back, but b and c have not read its new record yet (no refresh): a leads alone,
    # b and c lead elsewhere; a hands its lone lobby to b, which hears from it, and so on
    net, (a, b, c) = swarms(3, names=["a", "b", "c"], **CHURN)
    a.close()
    xs = values(3, seed=22)
    run_round([b, c], xs[1:], round=0)
    _, (a,) = swarms(1, net=net, names=["a"], **CHURN)
    rounds = [run_round([a, b, c], xs, round=r) for r in range(1, 4)]
    for results in rounds:
        assert not any(r.averaged and r.group_size == 1 for r in results)  # nobody averages alone
    assert all(r.participants == ["a", "b", "c"] for r in rounds[-1]) and _exact_mean(rounds[-1], xs)


# --- members killed mid-round: not waited for, and a member left apart from its group knows it ---

import asyncio  # noqa: E402

from lowcomm.averaging import shard_bounds  # noqa: E402
from lowcomm.optimizers import Stats  # noqa: E402
from lowcomm.p2p.transport import PeerUnreachable, segments  # noqa: E402


def _out_of_step(result):
    """Whether an outer optimizer counts ``result`` as a round that left it apart from its group."""
    stats = Stats()
    stats.record(result)
    return stats.rounds_not_averaged == 1


@pytest.mark.parametrize("after", [1, 4])  # killed after its JOIN, or after 3 of its 7 parts
def test_a_member_killed_mid_round_costs_the_others_no_deadline(swarms, after):
    net, nodes = swarms(8, base_timeout=5.0)
    victim = nodes[7].peer_id
    net.crash(victim, after=after)
    xs = values(8, seed=5)
    t0 = time.monotonic()
    handles = [s.average("k", [x], round=0) for s, x in zip(nodes, xs)]
    survivors = [h.result() for h in handles[:7]]
    took = time.monotonic() - t0
    handles[7].result()
    # a send to it fails (refused): its part, its mean and its shard's backup are not waited for; before,
    # each phase waited out its deadline (every deadline here is over 5 s). Killed after 3 parts, it may
    # have received a member's part first: that member cannot tell it died and waits out one deadline for
    # its mean, then asks the backup (how soon that happens depends on the threads' timing)
    assert took < (2.5 if after == 1 else 5.0 + 2.5)
    rest, everyone = torch.stack(xs[:7]).double().mean(0), torch.stack(xs).double().mean(0)
    for r in survivors:
        assert r.averaged and all(r.shards_averaged) and not r.diverged and not _out_of_step(r)
        assert torch.equal(r.tensors[0], survivors[0].tensors[0])
    got = survivors[0].tensors[0].double()
    for j, (a, b) in enumerate(shard_bounds(1000, 8)):
        if after == 1 or j >= 3:  # its part never reached shard j's reducer
            assert torch.allclose(got[a:b], rest[a:b], atol=1e-6, rtol=0)
        else:  # its part reached the reducer, which took it if it came before the reducer found it gone
            assert any(torch.allclose(got[a:b], want[a:b], atol=1e-6, rtol=0) for want in (rest, everyone))
    if after == 1:
        assert all(victim not in r.participants for r in survivors)


def test_a_shard_whose_reducer_and_backup_are_gone_keeps_local_values_and_flags_everyone(swarms):
    # peer01 reduces shard 1 and backs up shard 0, peer02 backs up shard 1: both killed after their JOINs
    net, nodes = swarms(4, base_timeout=5.0)
    for s in nodes[1:3]:
        net.crash(s.peer_id, after=1)
    xs = values(4, seed=6)
    t0 = time.monotonic()
    handles = [s.average("k", [x], round=0) for s, x in zip(nodes, xs)]
    survivors = [handles[0].result(), handles[3].result()]
    assert time.monotonic() - t0 < 2.5
    bounds = shard_bounds(1000, 4)
    for i, r in zip((0, 3), survivors):
        # shard 2 was backed up by peer03; nobody reduced shard 1: each kept its own values, so they differ
        assert r.averaged and r.shards_averaged == [True, False, True, True] and r.diverged == [1]
        assert _out_of_step(r)
        a, b = bounds[1]
        assert torch.equal(r.tensors[0][a:b], xs[i][a:b])
    rest = (xs[0].double() + xs[3].double()) / 2
    for a, b in (bounds[0], bounds[2], bounds[3]):
        assert torch.allclose(survivors[0].tensors[0][a:b].double(), rest[a:b], atol=1e-6, rtol=0)
        assert torch.equal(survivors[0].tensors[0][a:b], survivors[1].tensors[0][a:b])


class _MeansLast:
    """A member's transport that sends its mean shard only once every other member's
    mean reached it: none of them can find it gone (and stop waiting for its mean)
    before its mean reached them, so killing it between two sends of its mean is
    deterministic."""

    def __init__(self, inner, others: int):
        self.inner, self.others, self.heard = inner, others, set()
        self.all_heard = asyncio.Event()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def serve(self, protocol, handler):
        async def counting(sender, data):
            reply = await handler(sender, data)
            if messages.unpack("part", data)["phase"] == "mean":
                self.heard.add(sender)
                if len(self.heard) == self.others:
                    self.all_heard.set()
            return reply
        await self.inner.serve(protocol, counting if protocol == messages.PROTOCOL_PART else handler)

    async def request(self, peer, protocol, data, timeout):
        if protocol == messages.PROTOCOL_PART and \
                messages.unpack("part", b"".join(segments(data)))["phase"] == "mean":
            await self.all_heard.wait()
        return await self.inner.request(peer, protocol, data, timeout)


@pytest.mark.parametrize("after, missed", [(6, ["peer03"]), (5, ["peer02", "peer03"])])
def test_a_member_that_missed_a_killed_reducers_mean_is_flagged(swarms, after, missed):
    # peer01 reduces shard 1 (its backup: peer02) and is killed between its sends of the mean (to peer00,
    # peer02, peer03, in order): its requests are a JOIN, 3 parts, then the means, and `after` counts them
    net = MemoryNetwork()
    _, (a,) = swarms(1, net=net, names=["peer00"], base_timeout=1.0)
    owner = Swarm(_MeansLast(net.transport("peer01"), others=3), "test", **{**FAST, "base_timeout": 1.0})
    _, (c, d) = swarms(2, net=net, names=["peer02", "peer03"], base_timeout=1.0)
    nodes = [a, owner, c, d]
    try:
        for s in nodes:
            s.members()
        net.crash("peer01", after=after)
        xs = values(4, seed=7)
        results = run_round(nodes, xs)
    finally:
        owner.close()
    survivors = {s.peer_id: r for s, r in zip(nodes, results) if s is not owner}
    # every survivor averaged the round, so `averaged` alone says nothing is wrong
    assert all(r.averaged for r in survivors.values())
    assert sorted(p for p, r in survivors.items() if r.diverged) == missed
    for peer, r in survivors.items():
        assert _out_of_step(r) == (peer in missed)
        assert r.diverged == ([1] if peer in missed else [])
    lo, hi = shard_bounds(1000, 4)[1]
    in_step = [r.tensors[0] for p, r in survivors.items() if p not in missed]
    assert all(torch.equal(t, in_step[0]) for t in in_step)  # the owner's mean of shard 1: the group's
    assert torch.allclose(in_step[0][lo:hi].double(), torch.stack(xs).double().mean(0)[lo:hi], atol=1e-6)
    for peer in missed:
        t = survivors[peer].tensors[0]
        assert torch.equal(t[:lo], in_step[0][:lo]) and torch.equal(t[hi:], in_step[0][hi:])
        assert not torch.allclose(t[lo:hi], in_step[0][lo:hi])
        if after == 6:  # the backup held the mean and moved on: the member kept its own values
            assert torch.equal(t[lo:hi], xs[3][lo:hi])
        else:  # the backup missed it too, and reduced the parts of the two that missed it
            want = (xs[2].double() + xs[3].double())[lo:hi] / 2
            assert torch.allclose(t[lo:hi].double(), want, atol=1e-6, rtol=0)


def _corrupt_parts_of(shard):
    """Part messages for ``shard``'s reducer get NaNs (`_corrupt_blobs`); all else is sent as is."""
    def fn(data):
        try:
            msg = messages.unpack("part", data)
        except WireFormatError:
            return data
        return _corrupt_blobs(data) if msg["phase"] == "part" and msg["shard"] == shard else data
    return fn


def test_a_reducer_that_got_no_other_part_gives_everyone_its_own_values_and_nobody_is_flagged(swarms):
    net, nodes = swarms(4)
    for s in nodes[:3]:
        net.corrupt(s.peer_id, _corrupt_parts_of(3))  # peer03 drops every other part of its shard
    xs = values(4, seed=8)
    results = run_round(nodes, xs)
    lo, hi = shard_bounds(1000, 4)[3]
    mean = torch.stack(xs).double().mean(0)
    for r in results:
        # shard 3 is peer03's part alone, on every member alike: not averaged, but not apart either
        assert r.averaged and r.shards_averaged == [True, True, True, False]
        assert not r.diverged and not _out_of_step(r)
        assert torch.equal(r.tensors[0], results[0].tensors[0])
        assert torch.equal(r.tensors[0][lo:hi], xs[3][lo:hi])
        assert torch.allclose(r.tensors[0][:lo].double(), mean[:lo], atol=1e-6, rtol=0)


class _Refusing:
    """A member's transport whose part handler refuses ``phase`` messages from ``sender``
    (the sender finds this member unreachable)."""

    def __init__(self, inner, sender: str, phase: str):
        self.inner, self.sender, self.phase = inner, sender, phase

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def serve(self, protocol, handler):
        async def refusing(sender, data):
            if sender == self.sender and messages.unpack("part", data)["phase"] == self.phase:
                raise PeerUnreachable("refused")
            return await handler(sender, data)
        await self.inner.serve(protocol, refusing if protocol == messages.PROTOCOL_PART else handler)


def test_an_all_gather_member_without_a_live_members_payload_is_flagged(swarms):
    net = MemoryNetwork()
    first = Swarm(_Refusing(net.transport("peer00"), "peer02", "full"), "test", **FAST)
    try:
        _, rest = swarms(2, net=net, names=["peer01", "peer02"])
        nodes = [first, *rest]
        for s in nodes:
            s.members()
        xs = values(3, seed=9)
        topk = get_compressor("topk", density=1.0, values="fp32")
        results = run_round(nodes, xs, compressor=topk)
    finally:
        first.close()
    # peer00 never got peer02's payload, which peer01 reduced: peer00 alone holds another mean
    assert [bool(r.diverged) for r in results] == [True, False, False]
    assert [_out_of_step(r) for r in results] == [True, False, False]
    assert torch.allclose(results[0].tensors[0], (xs[0] + xs[1]) / 2, atol=1e-6)
    for r in results[1:]:
        assert torch.allclose(r.tensors[0], torch.stack(xs).mean(0), atol=1e-6)
