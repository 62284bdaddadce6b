"""Checkpoints as safetensors plus JSON, written atomically; never pickle.

A state is a tree of dicts, lists, numbers, strings, None and tensors (what
the optimizers' ``state_dict()`` return). `save_state` writes the tensors to
``<path>.safetensors`` and the tree, with tensors replaced by references, to
``<path>.json``; each file is written to a temporary name and renamed, the
JSON last, so a reader sees the old checkpoint or the new one, never half.
`load_state` checks the tensor file's length and SHA-256 against the JSON and
raises `CheckpointError` for a missing, truncated or corrupt checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "lowcomm-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt or from another format."""


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().contiguous().clone()
        return {"__tensor__": name}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError("state dict keys must be str or int")
        return {"__dict__": [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError("state holds a non-finite float")
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__}")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            try:
                return tensors[obj["__tensor__"]]
            except (KeyError, TypeError):
                raise CheckpointError(f"checkpoint refers to a missing tensor {obj['__tensor__']!r}") from None
        if set(obj) == {"__dict__"} and isinstance(obj["__dict__"], list):
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        raise CheckpointError("checkpoint JSON has an unexpected object")
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state(path: str | Path, state: dict, meta: dict | None = None) -> None:
    """Write ``state`` (and JSON-able ``meta``) to ``path.safetensors`` + ``path.json``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors)
    blob = st_save(tensors) if tensors else st_save({"_": torch.zeros(0)})
    _atomic_write(path.with_suffix(".safetensors"), blob)
    doc = {"format": FORMAT, "meta": meta or {}, "state": tree, "tensor_bytes": len(blob),
           "tensor_sha256": hashlib.sha256(blob).hexdigest()}
    _atomic_write(path.with_suffix(".json"), json.dumps(doc).encode())


def state_to_bytes(state: dict, meta: dict | None = None) -> bytes:
    """The same format as a checkpoint, in one blob: msgpack of the JSON document
    and the safetensors bytes (for sending state to a peer)."""
    import msgpack

    tensors: dict[str, torch.Tensor] = {}
    tree = _flatten(state, tensors)
    blob = st_save(tensors) if tensors else st_save({"_": torch.zeros(0)})
    doc = {"format": FORMAT, "meta": meta or {}, "state": tree, "tensor_bytes": len(blob),
           "tensor_sha256": hashlib.sha256(blob).hexdigest()}
    return msgpack.packb({"json": json.dumps(doc), "tensors": blob}, use_bin_type=True)


def state_from_bytes(data: bytes) -> tuple[dict, dict]:
    """Inverse of `state_to_bytes`; raises `CheckpointError` for anything malformed."""
    import msgpack

    try:
        obj = msgpack.unpackb(data, raw=False)
        doc, blob = json.loads(obj["json"]), obj["tensors"]
    except Exception as e:  # any malformed blob from a peer is reported the same way
        raise CheckpointError(f"state blob is malformed: {type(e).__name__}") from None
    return _parse(doc, blob, "state from peer")


def _parse(doc, blob: bytes, where: str) -> tuple[dict, dict]:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a {FORMAT} document")
    if doc.get("tensor_bytes") != len(blob):
        raise CheckpointError(f"{where}: tensors have {len(blob)} bytes, expected {doc.get('tensor_bytes')}: "
                              "truncated or from another save")
    if doc.get("tensor_sha256") != hashlib.sha256(blob).hexdigest():
        raise CheckpointError(f"{where}: tensors do not match their checksum: corrupt")
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{where}: tensors are corrupt: {e}") from None
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: tensor {name} holds NaN or inf")
    return _unflatten(doc["state"], tensors), doc.get("meta", {})


def load_state(path: str | Path) -> tuple[dict, dict]:
    """Read a checkpoint written by `save_state`; returns (state, meta)."""
    path = Path(path)
    try:
        doc = json.loads(path.with_suffix(".json").read_bytes())
        blob = path.with_suffix(".safetensors").read_bytes()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file missing: {e.filename}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path.with_suffix('.json')} is not valid JSON ({e})") from None
    return _parse(doc, blob, str(path.with_suffix(".safetensors")))
