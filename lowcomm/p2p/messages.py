"""Swarm messages: small msgpack maps, validated on receipt (never pickled)."""

from __future__ import annotations

from typing import Any

import msgpack

from lowcomm.compressors import MAX_BLOB_BYTES, WireFormatError

PROTOCOL_JOIN = "/lowcomm/join/1"
PROTOCOL_PART = "/lowcomm/part/1"

_SCHEMAS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "join": {"run": str, "key": str, "round": int, "group_size": int, "weight": float},
    "roster": {"roster": list, "reason": str},
    # phase: "part" (a shard for its reducer), "mean" (a reduced shard), "full" (all-gather)
    "part": {"run": str, "key": str, "round": int, "phase": str, "shard": int, "weight": float,
             "contributors": list, "blob": bytes},
}


def pack(kind: str, **fields: Any) -> bytes:
    return msgpack.packb({"kind": kind, **fields}, use_bin_type=True)


def unpack(kind: str, data: bytes) -> dict:
    """Parse a message of ``kind``; raise `WireFormatError` unless it has exactly
    the schema's fields with the right types."""
    try:
        obj = msgpack.unpackb(data, raw=False, max_bin_len=MAX_BLOB_BYTES, max_str_len=4096,
                              max_array_len=100_000, max_map_len=32)
    except Exception as e:  # msgpack raises several types for malformed input
        raise WireFormatError(f"malformed {kind} message: {type(e).__name__}") from None
    schema = _SCHEMAS[kind]
    if not isinstance(obj, dict) or obj.get("kind") != kind or set(obj) != set(schema) | {"kind"}:
        raise WireFormatError(f"not a {kind} message")
    for name, typ in schema.items():
        v = obj[name]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            obj[name] = v = float(v)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise WireFormatError(f"{kind} message field {name!r} has type {type(v).__name__}")
    return obj
