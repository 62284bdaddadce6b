"""Swarm messages, validated on receipt (never pickled).

Control messages (``join``, ``roster``) are small msgpack maps. A ``part``
message carries a payload: it is a frame (`lowcomm.compressors.wire.frame`)
whose header holds the fields and whose body is the payload's blob, so the
blob is neither copied into msgpack when sent nor out of it when received.
"""

from __future__ import annotations

from typing import Any, Mapping

import msgpack

from lowcomm.compressors import MAX_BLOB_BYTES, Buffer, WireFormatError
from lowcomm.compressors.wire import frame, unframe
from lowcomm.p2p.transport import Message, segments

PROTOCOL_JOIN = "/lowcomm/join/1"
PROTOCOL_PART = "/lowcomm/part/3"

_LIMITS = {"max_str_len": 4096, "max_array_len": 100_000, "max_map_len": 32}
_SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "join": {"run": str, "key": str, "round": int, "group_size": int, "weight": float},
    "roster": {"roster": list, "reason": str},
    # phase: "part" (a shard for its reducer), "mean" (a reduced shard), "full" (all-gather),
    # "bpart"/"bmean" (the same for a backup reducer); the blob is the frame's body
    # outliers: the members a reducer flagged ("mean"/"bmean"; empty otherwise)
    "part": {"run": str, "key": str, "round": int, "phase": str, "shard": int, "weight": float,
             "contributors": list, "outliers": list},
}


def pack(kind: str, **fields: Any) -> bytes:
    """A control message."""
    return msgpack.packb({"kind": kind, **fields}, use_bin_type=True)


def pack_part(blob: Message, **fields: Any) -> list[Buffer]:
    """A part message as segments: the header, then the blob's own segments."""
    return frame({"kind": "part", **fields}, segments(blob))


def unpack(kind: str, data: Buffer) -> dict:
    """Parse a message of ``kind``; raise `WireFormatError` unless it has exactly
    the schema's fields with the right types. A part's ``blob`` is a view of ``data``."""
    if kind == "part":
        obj, body = unframe(data, "part message", **_LIMITS)
        if len(body) > MAX_BLOB_BYTES:
            raise WireFormatError(f"part message blob of {len(body)} bytes is over {MAX_BLOB_BYTES}")
    else:
        try:
            obj = msgpack.unpackb(data, raw=False, max_bin_len=MAX_BLOB_BYTES, **_LIMITS)
        except Exception as e:  # msgpack raises several types for malformed input
            raise WireFormatError(f"malformed {kind} message: {type(e).__name__}") from None
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        raise WireFormatError(f"not a {kind} message")
    check_fields(kind, obj, {**_SCHEMAS[kind], "kind": str})
    if kind == "part":
        for name in ("contributors", "outliers"):
            if not all(isinstance(peer, str) for peer in obj[name]):
                raise WireFormatError(f"part message field {name!r} must list peer ids")
        obj["blob"] = body
    return obj


def check_fields(what: str, obj: Any, schema: Mapping[str, type | tuple[type, ...]]) -> dict:
    """``obj`` if it is a map with exactly ``schema``'s fields, of its types (an
    int is taken as a float; a bool only where the schema says bool); raise
    `WireFormatError` naming ``what`` otherwise. For any message of a schema."""
    if not isinstance(obj, dict) or set(obj) != set(schema):
        raise WireFormatError(f"not a {what} message")
    for name, typ in schema.items():
        v = obj[name]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            obj[name] = v = float(v)
        if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
            raise WireFormatError(f"{what} message field {name!r} has type {type(v).__name__}")
    return obj
