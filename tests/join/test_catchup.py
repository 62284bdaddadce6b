"""The catch-up policy: which rounds leave a node out of sync, and which state it catches up to."""

import io

import pytest
import torch
from rich.console import Console

from lowcomm.join.catchup import CatchUp, out_of_sync, take_at_start
from lowcomm.join.protocol import PROTOCOL_OFFER, Fetched, JoinProtocol, StateOffer, pack
from lowcomm.optimizers import Stats
from lowcomm.p2p import MemoryNetwork, Swarm


def test_out_of_sync_after_a_round_not_averaged_or_averaged_alone_among_others():
    averaged = Stats(outer_rounds=5, rounds_not_averaged=1, last_group_size=3)
    assert not out_of_sync(averaged, not_averaged_before=1, members=3)
    assert out_of_sync(averaged, not_averaged_before=0, members=3)          # this round was not averaged
    alone = Stats(outer_rounds=5, rounds_not_averaged=1, last_group_size=1)
    assert out_of_sync(alone, not_averaged_before=1, members=2)             # alone while another is live
    assert not out_of_sync(alone, not_averaged_before=1, members=1)         # alone in the swarm: in sync


def test_a_starting_node_takes_the_swarms_state_unless_the_peer_is_behind():
    assert take_at_start(peer_step=120, checkpoint_step=None)   # no checkpoint
    assert take_at_start(peer_step=150, checkpoint_step=100)    # the swarm went on
    # stopped in the round that ended at step 150: the checkpoint holds this node's own,
    # unaveraged global weights at step 150, the swarm averaged that round to 150
    assert take_at_start(peer_step=150, checkpoint_step=150)
    assert not take_at_start(peer_step=100, checkpoint_step=150)  # a peer further behind


# --- which state a node catches up to (the churn soak: "caught up ... at step 120" six times in a row) ---

@pytest.fixture
def nodes():
    """Four swarms over one MemoryNetwork (peer0 ... peer3), each with a JoinProtocol."""
    net = MemoryNetwork()
    swarms = [Swarm(net.transport(f"peer{i}"), "test", window=1.0, base_timeout=2.0, membership_ttl=30.0)
              for i in range(4)]
    protocols = [JoinProtocol(s, "run", {"task": "t"}, "hash-a", Console(file=io.StringIO(), width=300))
                 for s in swarms]
    for p in protocols:
        p.serve()
    for s in swarms:
        s.members()
    yield swarms, protocols
    for s in swarms:
        s.close()


def state_at(step):
    return {"step": step, "phi": [torch.full((3,), float(step))]}


def test_a_node_catches_up_to_the_most_advanced_state_of_a_member_in_step(nodes):
    _, (p0, p1, p2, me) = nodes
    p0.publish(state_at(80), 80)     # stuck in the round above (leading a round of its own)
    p1.publish(state_at(100), 100)   # finished that round with the others
    p2.publish(state_at(120), 120)   # further, but on weights of its own: out of step
    p2.in_step = False
    assert me.swarm.request("peer0", PROTOCOL_OFFER, b"\xc1", timeout=5) == b""  # garbage: no offer
    offers = me.offers(["peer0", "peer1", "peer2"])
    assert offers == {"peer0": StateOffer("hash-a", 80, True), "peer1": StateOffer("hash-a", 100, True),
                      "peer2": StateOffer("hash-a", 120, False)}
    fetched = me.fetch_state()
    assert (fetched.peer, fetched.step) == ("peer1", 100)
    assert torch.equal(fetched.state["phi"][0], torch.full((3,), 100.0))
    p0.in_step = p1.in_step = False  # with no member in step, the highest step there is
    assert me.fetch_state().peer == "peer2"


def test_a_node_waits_for_a_member_to_serve_the_round_it_missed(nodes):
    (s0, *_), (p0, _, _, me) = nodes
    p0.publish(state_at(80), 80)
    asked = []

    async def offer(sender, data):  # the member's exchange of the round ending at step 100 ends on the 3rd ask
        asked.append(sender)
        if len(asked) == 3:
            p0.publish(state_at(100), 100)
        return pack(StateOffer("hash-a", 100 if len(asked) >= 3 else 80, True))

    s0.serve(PROTOCOL_OFFER, offer)
    assert me.fetch_state(at_least=100, patience=0.0).step == 80  # no patience: what there is now
    asked.clear()
    fetched = me.fetch_state(at_least=100, patience=30.0)
    assert (fetched.peer, fetched.step, len(asked)) == ("peer0", 100, 3)
    # a node told to stop while it waits gives up at once and downloads nothing (SIGTERM in a catch-up)
    asked.clear()
    p0.publish(state_at(80), 80)
    stop_after = iter([False, True])
    assert me.fetch_state(at_least=200, patience=30.0, cancelled=lambda: next(stop_after, True)) is None
    assert len(asked) == 2  # the first ask, and one more before the stop was seen


class _Opt:
    """What `CatchUp` uses of an outer optimizer."""

    def __init__(self):
        self.stats, self.step_count, self.loaded = Stats(), 0, []

    def load_shared_state_dict(self, state):
        self.loaded.append(state["step"])
        self.step_count = state["step"]

    def round(self, averaged, group):
        self.step_count += 20
        self.stats.outer_rounds += 1
        self.stats.rounds_not_averaged += not averaged
        self.stats.last_group_size = group


class _Swarm:
    known_members = ["a", "b", "c"]

    def forget_rounds(self):
        pass


class _Protocol:
    """Serves the states queued in ``steps``, one per fetch, and records what it was asked."""

    def __init__(self, steps):
        self.steps, self.asked, self.in_step = list(steps), [], True

    def fetch_state(self, at_least=0, patience=0.0, cancelled=lambda: False):
        self.asked.append((at_least, patience))
        step = self.steps.pop(0)
        return Fetched("b" * 20, {"step": step}, step)


def test_a_node_never_catches_up_to_the_same_step_twice_and_stays_out_of_step_until_it_does():
    opt, protocol = _Opt(), _Protocol([80, 80, 120])
    catchup = CatchUp(opt, _Swarm(), protocol, Console(file=io.StringIO()), patience=7.0)
    opt.step_count = 80
    opt.round(averaged=False, group=1)              # late for round 4 (ends at step 100)
    catchup.after_round(stopping=False)
    assert opt.loaded == [80] and protocol.asked == [(100, 7.0)] and protocol.in_step
    opt.round(averaged=False, group=1)              # late again: the others are still at step 80
    catchup.after_round(stopping=False)
    assert opt.loaded == [80] and catchup.behind and not protocol.in_step  # kept its own, and says so
    opt.round(averaged=True, group=3)               # averaged with others, on weights of its own
    catchup.after_round(stopping=False)
    assert opt.loaded == [80, 120] and not catchup.behind and protocol.in_step
    opt.round(averaged=True, group=3)
    catchup.after_round(stopping=False)             # in step: nothing asked
    assert len(protocol.asked) == 3
