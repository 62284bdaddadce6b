"""The wire format: a `Payload` as bytes, and back with full validation.

Every message lowcomm sends is a *frame*: a little-endian u32 header length,
a msgpack map (the header), zero bytes up to an 8-byte boundary, then a
body of raw bytes. A payload's frame ("blob") has the header::

    {"v": 2, "codec": str, "opts": {str: int | float | str},
     "dtype": "float32" | "float16" | "bfloat16", "shape": [int, ...],
     "bufs": [[name, dtype, byte length], ...]}

and its body holds the buffers back to back in that order, little-endian,
each followed by zeros up to an 8-byte boundary. Buffers stay out of msgpack
so that neither side copies them: `encode_segments` hands the transport views
of the payload's own tensors, and `decode` builds tensors over the received
bytes (aligned, because every offset is a multiple of 8).

`decode` checks everything before it builds a tensor: size limit, framing,
msgpack structure, version, codec, dtype, shape, the codec's options, that
every buffer has exactly the expected name, dtype and byte length, that the
body has exactly the bytes the header names (padding zero), and the codec's
content checks (finite values, indices in range). Any violation raises
`WireFormatError`; nothing else escapes. Nothing is pickled.
"""

from __future__ import annotations

import sys
import warnings
from math import prod
from typing import Sequence, Union

import msgpack
import numpy as np
import torch

from lowcomm.compressors.base import Compressor, codec_class
from lowcomm.compressors.errors import WireFormatError
from lowcomm.compressors.payload import BUFFER_DTYPES, FLOAT_DTYPES, Payload

WIRE_VERSION = 2
SUPPORTED_VERSIONS = (2,)
#: Default upper bound on a blob's size in bytes (1 GiB).
MAX_BLOB_BYTES = 1 << 30
#: Upper bound on a frame's header in bytes.
MAX_HEADER_BYTES = 1 << 16
#: Upper bound on the number of values a payload may stand for.
MAX_NUMEL = 1 << 31
MAX_DIMS = 32
ALIGN = 8

#: Bytes-like objects a frame is made of (sent back to back, never joined by lowcomm).
Buffer = Union[bytes, bytearray, memoryview]

_KEYS = {"v", "codec", "opts", "dtype", "shape", "bufs"}
_NUMPY_LE = {"uint8": "u1", "int8": "i1", "float16": "<f2", "float32": "<f4"}


def padding(n: int) -> bytes:
    """The zeros that bring ``n`` bytes up to an 8-byte boundary."""
    return bytes(-n % ALIGN)


def frame(header: dict, body: Sequence[Buffer] = ()) -> list[Buffer]:
    """A frame as segments: length, header and padding in one small bytes object, then ``body``."""
    head = msgpack.packb(header, use_bin_type=True)
    if len(head) > MAX_HEADER_BYTES:
        raise ValueError(f"frame header of {len(head)} bytes is over {MAX_HEADER_BYTES}")
    return [len(head).to_bytes(4, "little") + head + padding(4 + len(head)), *body]


def byte_view(data: Buffer) -> memoryview:
    """``data`` as a view of unsigned bytes (no copy), whatever a memoryview's format."""
    view = memoryview(data)
    return view.cast("B") if view.format != "B" else view


def unframe(data: Buffer, what: str, **limits) -> tuple[object, memoryview]:
    """Split a frame into its unpacked header and a view of its body (no copy).
    ``limits`` go to `msgpack.unpackb`. Raises `WireFormatError`."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"expected bytes, got {type(data).__name__}")
    view = byte_view(data)
    if len(view) < 4:
        raise WireFormatError(f"a {what} of {len(view)} bytes is too short to hold a msgpack header")
    size = int.from_bytes(view[:4], "little")
    start = 4 + size + (-(4 + size) % ALIGN)
    if size > MAX_HEADER_BYTES or start > len(view):
        raise WireFormatError(f"{what} header length {size} does not fit in {len(view)} bytes")
    if any(view[4 + size:start]):
        raise WireFormatError(f"{what} header padding is not zero")
    try:
        header = msgpack.unpackb(view[4:4 + size], raw=False, use_list=True, strict_map_key=True,
                                 max_bin_len=MAX_HEADER_BYTES, max_ext_len=0, **limits)
    except Exception as e:  # msgpack raises many types for malformed input
        raise WireFormatError(f"{what} header is not valid msgpack: {type(e).__name__}: {e}") from None
    return header, view[start:]


def _raw(t: torch.Tensor) -> memoryview:
    """Little-endian bytes of a 1-D tensor (a view, not a copy, on little-endian hosts)."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr = t.numpy()
    if sys.byteorder == "big" and arr.dtype.itemsize > 1:
        arr = arr.byteswap()
    return memoryview(arr).cast("B")


def _tensor(data: memoryview, dtype: str) -> torch.Tensor:
    """A tensor over little-endian bytes. On little-endian hosts it shares the
    received bytes, so decoding copies nothing; codecs only read buffers and
    decompression always returns a fresh tensor."""
    np_dtype = "<i2" if dtype == "bfloat16" else _NUMPY_LE[dtype]
    arr = np.frombuffer(data, dtype=np_dtype)
    if sys.byteorder == "big" and arr.dtype.itemsize > 1:
        arr = arr.byteswap().view(arr.dtype.newbyteorder("="))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "buffer is not writable": it is never written
        t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def _header(payload_codec: str, options: dict, dtype: str, shape, bufs: list) -> dict:
    return {"v": WIRE_VERSION, "codec": payload_codec, "opts": options, "dtype": dtype, "shape": list(shape),
            "bufs": bufs}


def encode_segments(payload: Payload) -> list[Buffer]:
    """A payload's frame as segments, its buffers as views of the payload's
    tensors (no copy): for a transport that writes segments back to back."""
    bufs, body = [], []
    for name, t in payload.buffers.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in BUFFER_DTYPES:
            raise TypeError(f"buffer {name!r} has dtype {dtype}, which the wire format does not carry")
        raw = _raw(t.reshape(-1))
        bufs.append([name, dtype, len(raw)])
        body += [raw, padding(len(raw))]
    return frame(_header(payload.codec, payload.options, payload.dtype, payload.shape, bufs), body)


def encode(payload: Payload) -> bytes:
    """Serialise a payload to bytes (see the module docstring for the layout)."""
    return b"".join(encode_segments(payload))


def wire_size(codec: Compressor, numel: int) -> int:
    """Bytes `encode` produces for ``numel`` fp32 values of a 1-D tensor, without
    compressing anything (every codec's size depends only on numel and options;
    for ``randk`` this is an upper bound, within 8 bytes)."""
    options = codec.wire_options(numel)
    spec = codec.buffer_spec(options, numel)
    sizes = [count * BUFFER_DTYPES[dt].itemsize for dt, count in spec.values()]
    header = _header(codec.name, options, "float32", (numel,),
                     [[name, dt, n] for (name, (dt, _)), n in zip(spec.items(), sizes)])
    return sum(len(b) for b in frame(header)) + sum(n + (-n % ALIGN) for n in sizes)


def _field(obj: dict, key: str, kind: type | tuple[type, ...]):
    v = obj[key]
    if not isinstance(v, kind) or isinstance(v, bool):
        raise WireFormatError(f"field {key!r} has the wrong type {type(v).__name__}")
    return v


def decode(blob: Buffer, *, max_bytes: int = MAX_BLOB_BYTES) -> Payload:
    """Parse and validate a blob from `encode` (bytes or a view of them; the
    payload's buffers share its memory). Raises only `WireFormatError`."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"expected bytes, got {type(blob).__name__}")
    if len(blob) > max_bytes:
        raise WireFormatError(f"blob of {len(blob)} bytes exceeds the limit of {max_bytes} bytes")
    obj, body = unframe(blob, "blob", max_str_len=1024, max_array_len=max(64, MAX_DIMS), max_map_len=64)
    if not isinstance(obj, dict) or set(obj) != _KEYS:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise WireFormatError(f"envelope must be a map with keys {sorted(_KEYS)}, got {got}")
    version = _field(obj, "v", int)
    if version not in SUPPORTED_VERSIONS:
        raise WireFormatError(f"wire format version {version} is not supported (this build reads {SUPPORTED_VERSIONS}); "
                              "run the same lowcomm version on every peer")
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
    buffers, offset = {}, 0
    for entry, (name, (want_dtype, count)) in zip(bufs, spec.items()):
        if len(entry) != 3 or entry[1] != want_dtype or type(entry[2]) is not int:
            raise WireFormatError(f"buffer {name!r} must be [name, {want_dtype!r}, byte length]")
        want_bytes = count * BUFFER_DTYPES[want_dtype].itemsize
        if entry[2] != want_bytes:
            raise WireFormatError(f"buffer {name!r} has {entry[2]} bytes; shape {shape} with these "
                                  f"options needs exactly {want_bytes}")
        end = offset + want_bytes + (-want_bytes % ALIGN)
        if end > len(body):
            raise WireFormatError(f"buffer {name!r} needs exactly {want_bytes} bytes, but the blob ends "
                                  f"{len(body) - offset} bytes after its start")
        if any(body[offset + want_bytes:end]):
            raise WireFormatError(f"padding after buffer {name!r} is not zero")
        buffers[name] = _tensor(body[offset:offset + want_bytes], want_dtype)
        offset = end
    if offset != len(body):
        raise WireFormatError(f"blob has {len(body) - offset} bytes after its last buffer; "
                              "the header and the body do not match")
    payload = Payload(codec.name, options, dtype, tuple(shape), buffers)
    codec.check_buffers(payload)
    return payload
