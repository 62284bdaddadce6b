"""Private swarms: a shared secret and an allowlist keep strangers out of rounds and membership."""

import pytest
import torch

from lowcomm.p2p import MemoryNetwork, PrivateTransport, Swarm, Unauthorized, messages
from lowcomm.p2p.private import REFUSED

FAST = dict(window=1.0, base_timeout=2.0, membership_ttl=30.0)
SECRET = b"0123456789abcdef-the-lab-secret"


@pytest.fixture
def make():
    made = []

    def node(net, name, secret=None, allow=None):
        transport = net.transport(name)
        if secret is not None or allow is not None:
            transport = PrivateTransport(transport, secret=secret, allow=allow)
        swarm = Swarm(transport, "test", **FAST)
        made.append(swarm)
        return swarm

    yield node
    for s in made:
        s.close()


def average(swarms, xs, round=0):
    handles = [s.average("k", [x], round=round) for s, x in zip(swarms, xs)]
    return [h.result() for h in handles]


def test_only_holders_of_the_secret_take_part(make):
    net = MemoryNetwork()
    # the outsider's id sorts first: were it trusted it would lead every round
    outsider = make(net, "aaa-outsider")
    intruder = make(net, "bbb-intruder", secret=b"a-different-secret-of-16+")
    members = [make(net, f"member{i}", secret=SECRET) for i in range(3)]
    for s in members:
        assert s.members() == sorted(m.peer_id for m in members)  # strangers' records do not verify
    xs = [torch.full((1000,), float(i)) for i in range(5)]
    results = average(members + [outsider, intruder], xs)
    for r in results[:3]:
        assert r.averaged and r.participants == sorted(m.peer_id for m in members)
        assert torch.equal(r.tensors[0], torch.full((1000,), 1.0))  # mean of 0, 1, 2
    for stranger, r in zip((outsider, intruder), results[3:]):
        assert r.participants == [stranger.peer_id]  # alone: nobody answered it
    with pytest.raises(Unauthorized, match="refused us"):
        intruder.call(intruder.transport.request(members[0].peer_id, messages.PROTOCOL_JOIN, b"x", timeout=5), 10)


def test_the_allowlist_refuses_a_peer_that_has_the_secret(make):
    net = MemoryNetwork()
    names = ["m0", "m1", "m2"]
    members = [make(net, n, secret=SECRET, allow=names) for n in names]
    unlisted = make(net, "a-unlisted", secret=SECRET, allow=names + ["a-unlisted"])
    for s in members:
        assert s.members() == names
    results = average(members + [unlisted], [torch.full((10,), float(i)) for i in range(4)])
    assert all(r.participants == names and torch.equal(r.tensors[0], torch.full((10,), 1.0)) for r in results[:3])
    assert results[3].participants == ["a-unlisted"]
    with pytest.raises(Unauthorized, match="not on this node's allowlist"):
        members[0].call(members[0].transport.request("a-unlisted", messages.PROTOCOL_JOIN, b"x", timeout=5), 10)
    # the allowlist alone (no secret) gates requests the same way
    open_net = MemoryNetwork()
    listed = make(open_net, "x0", allow=["x0", "x1"])
    other = make(open_net, "x2")
    reply = other.call(other.transport.request("x0", messages.PROTOCOL_JOIN, b"x", timeout=5), 10)
    assert reply == REFUSED  # a plain node gets the refusal as is
    with pytest.raises(Unauthorized, match="not on this node's allowlist"):
        listed.call(listed.transport.request("x2", messages.PROTOCOL_JOIN, b"x", timeout=5), 10)


def test_a_tampered_message_leaves_its_sender_out(make):
    net = MemoryNetwork()
    members = [make(net, f"peer{i}", secret=SECRET) for i in range(4)]
    for s in members:
        s.members()

    def nudge_a_value(data: bytes) -> bytes:
        """In part messages, flip the lowest mantissa bit of the last value: still a valid
        payload (finite, right size), so only the tag can tell."""
        try:
            messages.unpack("part", data[:-32])
        except Exception:
            return data  # a control message goes out untouched
        i = len(data) - 32 - 4  # the last fp32 value's low byte (32 values a shard: no padding)
        return data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]

    net.corrupt(members[3].peer_id, nudge_a_value)
    results = average(members, [torch.full((128,), float(i)) for i in range(4)])
    for r in results[:3]:
        assert members[3].peer_id not in r.participants
        assert torch.equal(r.tensors[0], torch.full((128,), 1.0))  # mean of 0, 1, 2


def test_bad_settings_are_refused():
    net = MemoryNetwork()
    with pytest.raises(ValueError, match="at least 16 bytes"):
        PrivateTransport(net.transport("a"), secret=b"short")
    with pytest.raises(ValueError, match="a secret, an allowlist, or both"):
        PrivateTransport(net.transport("b"))
    with pytest.raises(TypeError, match="must be bytes"):
        PrivateTransport(net.transport("c"), secret="a string secret, not bytes")
