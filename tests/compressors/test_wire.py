"""The wire format: round trips, exact rejections, and a fuzz of 10,000 bad blobs."""

import random

import numpy as np
import pytest
import torch

from lowcomm.compressors import (
    WireFormatError, codec_names, decode, decompress, encode, encode_segments, get_compressor,
)
from lowcomm.compressors.payload import FLOAT_DTYPES
from lowcomm.compressors.wire import frame, padding, unframe

SPARSE = {"topk": {"density": 0.1, "chunk_size": 64}, "randk": {"density": 0.1, "chunk_size": 64}}


def make(name):
    if name in SPARSE:
        return get_compressor(name, **SPARSE[name])
    if name in ("none", "fp16", "bf16"):
        return get_compressor(name)
    return get_compressor(name, block_size=64)


def blob_for(name, numel=300, seed=0):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    return encode(make(name).compress(x))


def envelope(name="int8", blob=None):
    """A blob's header (``blob``, or one of codec ``name``) with each buffer's
    bytes in place of its length (easy to mutate)."""
    header, body = unframe(blob_for(name) if blob is None else blob, "blob")
    offset = 0
    for entry in header["bufs"]:
        size = entry[2]
        entry[2] = bytes(body[offset:offset + size])
        offset += size + len(padding(size))
    return header


def reencode(obj):
    """The inverse of `envelope`: lengths in the header, bytes in the body."""
    bufs = obj.get("bufs")
    if not (isinstance(bufs, list) and all(isinstance(e, list) and len(e) == 3 and isinstance(e[2], bytes)
                                           for e in bufs)):
        return b"".join(frame(obj))
    body = [part for e in bufs for part in (e[2], padding(len(e[2])))]
    return b"".join(frame({**obj, "bufs": [[e[0], e[1], len(e[2])] for e in bufs]}, body))


@pytest.mark.parametrize("name", codec_names())
def test_encode_decode_roundtrip_is_identical(name):
    blob = blob_for(name)
    p = decode(blob)
    assert encode(p) == blob
    assert p.codec == name and p.shape == (300,) and p.dtype == "float32"


@pytest.mark.parametrize("mutate,match", [
    (lambda o: o.update(v=3), "version 3 is not supported"),
    (lambda o: o.update(codec="gzip"), "unknown codec 'gzip'"),
    (lambda o: o.update(dtype="float64"), "dtype 'float64'"),
    (lambda o: o.update(shape=[301]), "needs exactly"),
    (lambda o: o.update(shape=[-1]), "non-negative"),
    (lambda o: o.update(shape=[1 << 20, 1 << 20]), "over the limit"),
    (lambda o: o["opts"].update(block_size=0), "block_size"),
    (lambda o: o["opts"].update(extra=1), "exactly the keys"),
    (lambda o: o["bufs"].reverse(), "must carry buffers"),
    (lambda o: o["bufs"][0].__setitem__(1, "int8"), "must be \\[name"),
    (lambda o: o["bufs"][0].__setitem__(2, o["bufs"][0][2][:-1]), "needs exactly"),
    (lambda o: o["bufs"][1].__setitem__(2, b"\x00\x00\xc0\x7f" + o["bufs"][1][2][4:]), "non-finite"),
    (lambda o: o["bufs"][1].__setitem__(2, b"\x00\x00\x80\xbf" + o["bufs"][1][2][4:]), "negative"),
    (lambda o: o["bufs"][0].__setitem__(2, b"\x80" + o["bufs"][0][2][1:]), "-128"),
    (lambda o: o.pop("v"), "keys"),
])
def test_each_violation_raises_wire_format_error(mutate, match):
    obj = envelope("int8")
    mutate(obj)
    with pytest.raises(WireFormatError, match=match):
        decode(reencode(obj))


def test_topk_index_checks():
    obj = envelope("topk")
    idx = bytearray(obj["bufs"][0][2])
    idx[0] = 0xFF  # first 6-bit index becomes 63 > its successor: not increasing
    obj["bufs"][0][2] = bytes(idx)
    with pytest.raises(WireFormatError, match="strictly increasing"):
        decode(reencode(obj))


def test_size_limit_and_non_bytes():
    blob = blob_for("none")
    with pytest.raises(WireFormatError, match="exceeds the limit"):
        decode(blob, max_bytes=len(blob) - 1)
    with pytest.raises(WireFormatError, match="expected bytes"):
        decode("not bytes")
    with pytest.raises(WireFormatError, match="too short"):
        decode(b"")


def test_framing_rejections():
    blob = blob_for("int8")
    size = int.from_bytes(blob[:4], "little")
    with pytest.raises(WireFormatError, match="does not fit"):
        decode((len(blob)).to_bytes(4, "little") + blob[4:])
    with pytest.raises(WireFormatError, match="header padding"):
        pad_at = 4 + size  # the first padding byte after the header (4 + size is not a multiple of 8 here)
        assert pad_at % 8
        decode(blob[:pad_at] + b"\x01" + blob[pad_at + 1:])
    with pytest.raises(WireFormatError, match="not valid msgpack"):
        decode(blob[:4] + b"\xc1" + blob[5:])
    with pytest.raises(WireFormatError, match="after its last buffer"):
        decode(blob + bytes(8))
    with pytest.raises(WireFormatError, match="blob ends"):
        decode(blob[:-8])
    codes = 300  # int8 codes: 300 bytes, then 4 bytes of padding before the scales
    header_end = 4 + size + len(padding(4 + size))
    with pytest.raises(WireFormatError, match="padding after buffer 'codes'"):
        decode(blob[:header_end + codes] + b"\x07" + blob[header_end + codes + 1:])


@pytest.mark.parametrize("name", codec_names())
def test_segments_join_to_the_blob_and_decode_copies_nothing(name):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))
    payload = make(name).compress(x)
    segments = encode_segments(payload)
    blob = encode(payload)
    assert b"".join(segments) == blob and len(blob) % 8 == 0
    first = next(iter(payload.buffers.values()))
    assert any(isinstance(s, memoryview) and s.obj is not None for s in segments)  # views, not copies
    assert segments[1].nbytes == first.numel() * first.element_size()  # the first buffer, whole
    decoded = decode(memoryview(blob))
    blob_ptr = np.frombuffer(blob, dtype=np.uint8).ctypes.data
    for t in decoded.buffers.values():
        assert blob_ptr <= t.data_ptr() < blob_ptr + len(blob)  # inside the received bytes
        assert (t.data_ptr() - blob_ptr) % 8 == 0  # every buffer starts 8-byte aligned


def _mutations(rng: random.Random, blob: bytes) -> bytes:
    kind = rng.randrange(6)
    b = bytearray(blob)
    if kind == 0:  # truncate
        return bytes(b[:rng.randrange(len(b))])
    if kind == 1:  # flip 1..8 bits
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 2:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    if kind == 3:  # overwrite a run with random bytes
        i = rng.randrange(len(b))
        for j in range(i, min(len(b), i + rng.randint(1, 16))):
            b[j] = rng.randrange(256)
        return bytes(b)
    if kind == 4:  # duplicate or append garbage
        return bytes(b + b[:rng.randrange(1, 32)])
    # structured: a valid header with one field changed to a random value, the body kept
    obj, body = unframe(blob, "blob")
    key = rng.choice(["v", "codec", "opts", "dtype", "shape", "bufs"])
    obj[key] = rng.choice([None, -1, 0, 2**40, "x", [], {}, [1, 2], 1.5, b"\x00", [-3], {"block_size": 3}])
    return b"".join(frame(obj, [body]))


def test_fuzz_10000_blobs_raise_only_the_typed_error():
    rng = random.Random(1234)
    seeds = {name: blob_for(name, numel=rng.choice([1, 63, 300])) for name in codec_names()}
    accepted = rejected = 0
    for _ in range(10_000):
        blob = _mutations(rng, seeds[rng.choice(codec_names())])
        try:
            p = decode(blob)
        except WireFormatError:
            rejected += 1
            continue
        accepted += 1
        y = decompress(p)  # whatever decode lets through must be consistent with its header
        assert tuple(y.shape) == p.shape and y.dtype == FLOAT_DTYPES[p.dtype]
        assert torch.isfinite(y).all()
    assert rejected > 9000 and accepted + rejected == 10_000


@pytest.mark.parametrize("name", codec_names())
@pytest.mark.parametrize("numel", [0, 1, 63, 300, 70_000])
def test_wire_size_predicts_encoded_length(name, numel):
    from lowcomm.compressors import wire_size

    codec = make(name)
    actual = len(encode(codec.compress(torch.randn(numel, generator=torch.Generator().manual_seed(numel)))))
    predicted = wire_size(codec, numel)
    if name == "randk":
        assert actual <= predicted <= actual + 8
    else:
        assert predicted == actual
