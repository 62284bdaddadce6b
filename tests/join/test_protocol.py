"""The join protocols: message schemas reject malformed input with `WireFormatError`;
a node serving hello and state over an in-memory swarm answers garbage without failing."""

import io

import msgpack
import pytest
import torch
from rich.console import Console

from lowcomm.checkpoint import state_to_bytes
from lowcomm.compressors import WireFormatError
from lowcomm.join.protocol import (
    PROTOCOL_HELLO, PROTOCOL_STATE, Hello, HelloReply, JoinProtocol, Refused, StateMeta, StateRequest, from_map,
    pack, unpack,
)
from lowcomm.p2p import MemoryNetwork, Swarm

SETTINGS = {"task": "t", "algorithm": "diloco", "sync_every": 20, "parameters": [["w", [2, 3]]]}


def packed(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_messages_round_trip():
    for msg in (Hello("run", "abc"), HelloReply(True, "run", "abc", SETTINGS), HelloReply(False, "r", "h", {}),
                StateRequest("abc")):
        assert unpack(type(msg), pack(msg)) == msg
    assert from_map(StateMeta, {"hash": "abc", "step": 40}) == StateMeta("abc", 40)


@pytest.mark.parametrize("cls, data, words", [
    (Hello, b"\xc1", "malformed hello message: "),                       # not msgpack at all
    (Hello, b"", "malformed hello message: "),                           # nothing
    (Hello, packed(["run", "abc"]), "not a hello message"),              # a list, not a map
    (Hello, packed({"run_id": "run"}), "not a hello message"),           # a field missing
    (Hello, packed({"run_id": "run", "hash": "h", "x": 1}), "not a hello message"),   # a field too many
    (Hello, packed({"run_id": 7, "hash": "h"}), "hello message field 'run_id' has type int"),
    (Hello, packed({"run_id": True, "hash": "h"}), "hello message field 'run_id' has type bool"),
    (Hello, packed({"run_id": b"run", "hash": "h"}), "malformed hello message: ValueError"),  # bins refused
    (HelloReply, packed({"ok": 1, "run_id": "r", "hash": "h", "settings": {}}),
     "hello reply message field 'ok' has type int"),
    (HelloReply, packed({"ok": False, "run_id": "r", "hash": "h", "settings": [1]}),
     "hello reply message field 'settings' has type list"),
    (StateRequest, packed({"hash": None}), "state request message field 'hash' has type NoneType"),
    (StateRequest, packed("x" * 5000), "malformed state request message: ValueError"),  # over the string limit
])
def test_malformed_messages_raise_wire_format_error(cls, data, words):
    with pytest.raises(WireFormatError) as e:
        unpack(cls, data)
    assert words in str(e.value)


def test_state_meta_is_checked():
    for meta, words in (({"hash": "h"}, "not a state meta message"),
                        ({"hash": "h", "step": "40"}, "state meta message field 'step' has type str"),
                        ({"hash": "h", "step": 4.0}, "state meta message field 'step' has type float")):
        with pytest.raises(WireFormatError, match=words):
            from_map(StateMeta, meta)


def test_a_reply_whose_settings_have_keys_other_than_names_is_refused():
    # msgpack itself refuses such keys in received bytes (bins and, strictly, non-string map keys)
    with pytest.raises(WireFormatError, match="malformed hello reply message: ValueError"):
        unpack(HelloReply, packed({"ok": True, "run_id": "r", "hash": "h", "settings": {b"k": 1}}))
    with pytest.raises(WireFormatError, match="'settings' must map names to values"):
        from_map(HelloReply, {"ok": True, "run_id": "r", "hash": "h", "settings": {1: 1}})


@pytest.fixture
def pair():
    """Two swarms over one MemoryNetwork, each with a JoinProtocol; their consoles write to strings."""
    net = MemoryNetwork()
    swarms = [Swarm(net.transport(f"peer{i}"), "test", window=1.0, base_timeout=2.0, membership_ttl=30.0)
              for i in range(2)]
    outs = [io.StringIO(), io.StringIO()]
    protocols = [JoinProtocol(s, "run", SETTINGS, "hash-a", Console(file=o, width=300))
                 for s, o in zip(swarms, outs)]
    for p in protocols:
        p.serve()
    for s in swarms:
        s.members()
    yield swarms, protocols, outs
    for s in swarms:
        s.close()


def test_the_serving_node_answers_garbage_and_keeps_serving(pair):
    (a, b), (pa, pb), (out_a, _) = pair
    for junk in (b"\xc1", packed([1, 2]), packed({"run_id": "run"})):
        reply = unpack(HelloReply, b.request("peer0", PROTOCOL_HELLO, junk, timeout=5))
        assert reply == HelloReply(False, "run", "hash-a", SETTINGS)
        assert b.request("peer0", PROTOCOL_STATE, junk, timeout=5) == b""
    assert out_a.getvalue().count("refused peer1…: its hello is malformed") == 3
    # and still answers well-formed requests
    reply = unpack(HelloReply, b.request("peer0", PROTOCOL_HELLO, pack(Hello("run", "hash-a")), timeout=5))
    assert reply.ok
    pa.publish({"step": 12, "phi": [torch.arange(3.0)]}, 12)
    assert b.request("peer0", PROTOCOL_STATE, pack(StateRequest("other")), timeout=5) == b""
    fetched = pb.fetch_state()
    assert (fetched.peer, fetched.step, fetched.state["step"]) == ("peer0", 12, 12)
    assert torch.equal(fetched.state["phi"][0], torch.arange(3.0))


def test_greet_accepts_the_same_settings_and_refuses_others(pair):
    (a, b), (pa, pb), (out_a, _) = pair
    pb.greet(["/memory/x/p2p/peer0"])  # same run id and hash: no error
    other = JoinProtocol(b, "run", {**SETTINGS, "sync_every": 10}, "hash-b", Console(file=io.StringIO()))
    with pytest.raises(Refused) as e:
        other.greet(["/memory/x/p2p/peer0"])
    assert str(e.value) == ("refused by /memory/x/p2p/peer0: run 'run' settings hash-a differ from run 'run' "
                            "settings hash-b here: sync_every (10 here, 20 there)")
    assert "refused peer1…: it runs other settings" in out_a.getvalue()


def test_unusable_state_is_reported_and_skipped(pair):
    (a, b), (pa, pb), (_, out_b) = pair
    blobs = iter([b"junk", state_to_bytes({"step": 3}, {"hash": "hash-a"})])  # the second lacks its step

    async def serve_bad(sender, data):
        return next(blobs)

    a.serve(PROTOCOL_STATE, serve_bad)
    assert pb.fetch_state() is None
    assert pb.fetch_state() is None
    lines = [line for line in out_b.getvalue().splitlines() if line.startswith("could not catch up from peer0…")]
    assert len(lines) == 2
    assert "state blob is malformed" in lines[0] and "not a state meta message" in lines[1]


def test_a_garbage_hello_reply_is_reported_and_the_next_peer_greeted(pair):
    (a, b), (pa, pb), (_, out_b) = pair

    async def bad_hello(sender, data):
        return packed({"ok": "yes"})

    a.serve(PROTOCOL_HELLO, bad_hello)
    pb.greet(["/memory/x/p2p/peer0"])  # nothing to compare with: no refusal, only a line
    assert "could not greet /memory/x/p2p/peer0: not a hello reply message" in out_b.getvalue()
