"""The wire format: a `Payload` as bytes, and back with full validation.

A blob is one msgpack map::

    {"v": 1, "codec": str, "opts": {str: int | float | str},
     "dtype": "float32" | "float16" | "bfloat16", "shape": [int, ...],
     "bufs": [[name, dtype, raw little-endian bytes], ...]}

`decode` checks everything before it builds a tensor: size limit, msgpack
structure, version, codec, dtype, shape, the codec's options, that every
buffer has exactly the expected name, dtype and byte length, and the codec's
content checks (finite values, indices in range). Any violation raises
`WireFormatError`; nothing else escapes. Nothing is pickled.
"""

from __future__ import annotations

import sys
import warnings
from math import prod

import msgpack
import numpy as np
import torch

from lowcomm.compressors.base import Compressor, codec_class
from lowcomm.compressors.errors import WireFormatError
from lowcomm.compressors.payload import BUFFER_DTYPES, FLOAT_DTYPES, Payload

WIRE_VERSION = 1
SUPPORTED_VERSIONS = (1,)
#: Default upper bound on a blob's size in bytes (1 GiB).
MAX_BLOB_BYTES = 1 << 30
#: Upper bound on the number of values a payload may stand for.
MAX_NUMEL = 1 << 31
MAX_DIMS = 32

_KEYS = {"v", "codec", "opts", "dtype", "shape", "bufs"}
_NUMPY_LE = {"uint8": "u1", "int8": "i1", "float16": "<f2", "float32": "<f4"}


def _raw(t: torch.Tensor) -> memoryview:
    """Little-endian bytes of a 1-D tensor (a view, not a copy, on little-endian hosts)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr = t.numpy()
    if sys.byteorder == "big" and arr.dtype.itemsize > 1:
        arr = arr.byteswap()
    return memoryview(arr).cast("B")


def _tensor(data: bytes, dtype: str) -> torch.Tensor:
    """A tensor over little-endian bytes. On little-endian hosts it shares the
    (immutable) bytes, so decoding copies nothing; codecs only read buffers and
    decompression always returns a fresh tensor."""
    np_dtype = "<i2" if dtype == "bfloat16" else _NUMPY_LE[dtype]
    arr = np.frombuffer(data, dtype=np_dtype)
    if sys.byteorder == "big" and arr.dtype.itemsize > 1:
        arr = arr.byteswap().view(arr.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": it is never written
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def encode(payload: Payload) -> bytes:
    """Serialise a payload to bytes (see the module docstring for the layout)."""
    bufs = []
    for name, t in payload.buffers.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in BUFFER_DTYPES:
            raise TypeError(f"buffer {name!r} has dtype {dtype}, which the wire format does not carry")
        bufs.append([name, dtype, _raw(t.reshape(-1))])
    return msgpack.packb({"v": WIRE_VERSION, "codec": payload.codec, "opts": payload.options,
                          "dtype": payload.dtype, "shape": list(payload.shape), "bufs": bufs},
                         use_bin_type=True)


def wire_size(codec: Compressor, numel: int) -> int:
    """Bytes `encode` produces for ``numel`` fp32 values of a 1-D tensor, without
    compressing anything (every codec's size depends only on numel and options;
    for ``randk`` this is an upper bound, within 8 bytes)."""
    options = codec.wire_options(numel)
    spec = codec.buffer_spec(options, numel)
    empty = Payload(codec.name, options, "float32", (numel,),
                    {name: torch.zeros(0, dtype=BUFFER_DTYPES[dt]) for name, (dt, _) in spec.items()})
    size = len(encode(empty))
    for dt, count in spec.values():
        n = count * BUFFER_DTYPES[dt].itemsize
        size += n + (0 if n < 256 else 1 if n < 65536 else 3)  # msgpack bin8/16/32 length prefix
    return size


def _field(obj: dict, key: str, kind: type | tuple[type, ...]):
    v = obj[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise WireFormatError(f"field {key!r} has the wrong type {type(v).__name__}")
    return v


def decode(blob: bytes, *, max_bytes: int = MAX_BLOB_BYTES) -> Payload:
    """Parse and validate a blob from `encode`. Raises only `WireFormatError`."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"expected bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise WireFormatError(f"blob of {len(blob)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        obj = msgpack.unpackb(blob, raw=False, use_list=True, strict_map_key=True,
                              max_bin_len=len(blob), max_str_len=1024, max_array_len=max(64, MAX_DIMS),
                              max_map_len=64, max_ext_len=0)
    except Exception as e:  # msgpack raises many types for malformed input
        raise WireFormatError(f"not a valid msgpack envelope: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict) or set(obj) != _KEYS:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise WireFormatError(f"envelope must be a map with keys {sorted(_KEYS)}, got {got}")
    version = _field(obj, "v", int)
    if version not in SUPPORTED_VERSIONS:
        raise WireFormatError(f"wire format version {version} is not supported (this build reads {SUPPORTED_VERSIONS}); "
                              "upgrade lowcomm on the older peer")
    codec = codec_class(_field(obj, "codec", str))
    dtype = _field(obj, "dtype", str)
    if dtype not in FLOAT_DTYPES:
        raise WireFormatError(f"dtype {dtype!r} is not one of {sorted(FLOAT_DTYPES)}")
    shape = _field(obj, "shape", list)
    if len(shape) > MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
        raise WireFormatError(f"shape must be at most {MAX_DIMS} non-negative integers, got {shape!r}")
    numel = prod(shape)
    if numel > MAX_NUMEL:
        raise WireFormatError(f"shape {shape} has {numel} values, over the limit of {MAX_NUMEL}")
    options = _field(obj, "opts", dict)
    codec.check_options(options, numel)
    spec = codec.buffer_spec(options, numel)
    bufs = _field(obj, "bufs", list)
    names = [b[0] if isinstance(b, list) and b else None for b in bufs]
    if names != list(spec):
        raise WireFormatError(f"{codec.name} payload must carry buffers {list(spec)}, got {names}")
    buffers = {}
    for entry, (name, (want_dtype, count)) in zip(bufs, spec.items()):
        if len(entry) != 3 or entry[1] != want_dtype or not isinstance(entry[2], bytes):
            raise WireFormatError(f"buffer {name!r} must be [name, {want_dtype!r}, bytes]")
        want_bytes = count * BUFFER_DTYPES[want_dtype].itemsize
        if len(entry[2]) != want_bytes:
            raise WireFormatError(f"buffer {name!r} has {len(entry[2])} bytes; shape {shape} with these "
                                  f"options needs exactly {want_bytes}")
        buffers[name] = _tensor(entry[2], want_dtype)
    payload = Payload(codec.name, options, dtype, tuple(shape), buffers)
    codec.check_buffers(payload)
    return payload
