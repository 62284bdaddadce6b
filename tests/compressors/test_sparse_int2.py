"""2-bit values for the sparse codecs (``values="int2"``): hand-computed cases,
the error bound, exact wire sizes, and rejection of malformed payloads."""

import pytest
import torch

from lowcomm.compressors import WireFormatError, decode, encode, get_compressor, wire_size
from lowcomm.compressors.wire import unframe

from tests.compressors.test_wire import envelope, reencode


def roundtrip(codec, x):
    return codec.decompress(decode(encode(codec.compress(x))))


def test_topk_int2_hand_computed_chunk_of_8():
    # k = 4 of 8: kept |v| = 3, 2, 1, 4 at indices 1, 3, 4, 6; threshold (1 + 4) / 2 = 2.5
    # high side {3, 4} decodes to their mean 3.5, low side {2, 1} to 1.5, signs kept
    c = get_compressor("topk", chunk_size=8, k=4, values="int2")
    x = torch.tensor([0.5, -3.0, 0.25, 2.0, -1.0, 0.125, 4.0, 0.0])
    p = c.compress(x)
    assert list(p.buffers) == ["indices", "values", "scales"]
    assert p.buffers["indices"].tolist() == [0b00101110, 0b01100000]  # 3-bit indices 1, 3, 4, 6, MSB first
    assert p.buffers["values"].tolist() == [0b11_00_10_01]  # codes 2*negative + high: 3, 0, 2, 1
    assert p.buffers["scales"].tolist() == [1.5, 3.5]  # [low, high] of the chunk
    want = torch.tensor([0.0, -3.5, 0.0, 1.5, -1.5, 0.0, 3.5, 0.0])
    assert torch.equal(roundtrip(c, x), want)
    assert torch.equal(roundtrip(c, 4 * x), 4 * want)  # the levels travel, not a fixed grid


def test_topk_int2_hand_computed_chunks_ties_and_tail():
    # chunk_size 4, k 2: [1, -4, .5, 2] keeps -4, 2 (levels 2, 4: exact);
    # [.5, -.5, 0, .25] keeps .5, -.5: equal magnitudes are all "high", low side empty -> level 0;
    # the tail [3, -1] keeps round(0.5 * 2) = 1 value: levels [0, 3]
    c = get_compressor("topk", chunk_size=4, k=2, values="int2")
    x = torch.tensor([1.0, -4.0, 0.5, 2.0, 0.5, -0.5, 0.0, 0.25, 3.0, -1.0])
    p = c.compress(x)
    assert p.options == {"chunk_size": 4, "k": 2, "values": "int2", "k_tail": 1}
    assert p.buffers["scales"].tolist() == [2.0, 4.0, 0.0, 0.5, 0.0, 3.0]
    assert torch.equal(roundtrip(c, x), torch.tensor([0.0, -4.0, 0.0, 2.0, 0.5, -0.5, 0.0, 0.0, 3.0, 0.0]))


def test_randk_int2_keeps_its_draws_and_quantises_them():
    x = torch.arange(1.0, 41.0) * torch.tensor([1.0, -1.0]).repeat(20)
    exact = get_compressor("randk", k=3, chunk_size=10, values="fp32", seed=7)
    coarse = get_compressor("randk", k=3, chunk_size=10, values="int2", seed=7)
    want, got = roundtrip(exact, x), roundtrip(coarse, x)
    assert torch.equal(got != 0, want != 0) and torch.equal(got.sign(), want.sign())
    for a, b in zip(want.view(4, 10), got.view(4, 10)):
        mags = a[a != 0].abs()
        assert (b - a).abs().max() <= (mags.max() - mags.min()) / 2
        assert b.abs().sum() == pytest.approx(mags.sum().item(), rel=1e-6)  # bin means keep the L1 mass


@pytest.mark.parametrize("name", ["topk", "randk"])
def test_int2_error_within_half_the_kept_range_and_l1_kept(name):
    x = torch.randn(10 * 512 + 77, generator=torch.Generator().manual_seed(11))
    opts = dict(density=1 / 32, chunk_size=512, **({"seed": 0} if name == "randk" else {}))
    ref = roundtrip(get_compressor(name, values="fp32", **opts), x)  # same coordinates, exact values
    y = roundtrip(get_compressor(name, values="int2", **opts), x)
    assert torch.equal(y != 0, ref != 0) and torch.equal(y.sign(), ref.sign())
    for start in range(0, x.numel(), 512):
        a, b = ref[start:start + 512], y[start:start + 512]
        mags = a[a != 0].abs()
        assert (b - a).abs().max() <= (mags.max() - mags.min()) / 2 * (1 + 1e-6)
        assert b.abs().sum().item() == pytest.approx(mags.sum().item(), rel=1e-5)


@pytest.mark.parametrize("name", ["topk", "randk"])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (4096,), (2, 4096 + 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int2_roundtrip_keeps_shape_and_dtype(name, shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = roundtrip(get_compressor(name, density=0.01, values="int2"), x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["topk", "randk"])
@pytest.mark.parametrize("numel", [0, 1, 7, 4096, 3 * 4096 + 5, 100_003])
def test_int2_wire_size_is_exact(name, numel):
    c = get_compressor(name, density=1 / 64, values="int2")
    blob = encode(c.compress(torch.randn(numel, generator=torch.Generator().manual_seed(2))))
    if name == "topk":
        assert len(blob) == wire_size(c, numel)
    else:  # the draw seed's msgpack width varies: wire_size is the bound
        assert 0 <= wire_size(c, numel) - len(blob) <= 8


def test_int2_bits_on_1m_values():
    # 256 chunks of 4096, k = 64: 12-bit indices, 2-bit codes, two fp32 levels per chunk
    numel = 1 << 20
    c = get_compressor("topk", density=1 / 64, chunk_size=4096, values="int2")
    p = c.compress(torch.randn(numel, generator=torch.Generator().manual_seed(3)))
    assert {k: v.numel() * v.element_size() for k, v in p.buffers.items()} == {
        "indices": 256 * 64 * 12 // 8, "values": 256 * 64 * 2 // 8, "scales": 256 * 2 * 4}
    assert len(encode(p)) == wire_size(c, numel) < p.nbytes + 200
    assert wire_size(c, numel) * 8 / numel < 0.24


def test_other_value_dtypes_keep_their_wire_layout():
    # no scales buffer, values as raw floats: the pre-int2 format, byte for byte
    c = get_compressor("topk", k=2, chunk_size=4, values="fp32")
    p = c.compress(torch.tensor([0.1, -5.0, 3.0, 0.2, 9.0]))
    assert list(p.buffers) == ["indices", "values"]
    assert p.buffers["indices"].tolist() == [0b01100000]  # 2-bit indices 1, 2, then the tail's 0
    assert p.buffers["values"].tolist() == [-5.0, 3.0, 9.0]
    header, _ = unframe(encode(p), "blob")
    assert header["bufs"] == [["indices", "uint8", 1], ["values", "float32", 12]]
    for values, dtype in (("fp16", "float16"), ("bf16", "bfloat16")):
        header, _ = unframe(encode(get_compressor("randk", k=2, chunk_size=4, values=values).compress(
            torch.ones(5))), "blob")
        assert [b[:2] for b in header["bufs"]] == [["values", dtype]]


def _set_scales(obj, values):
    obj["bufs"][2][2] = torch.tensor(values, dtype=torch.float32).numpy().tobytes()


@pytest.mark.parametrize("mutate,match", [
    (lambda o: _set_scales(o, [1.5, -3.5]), "negative"),
    (lambda o: _set_scales(o, [float("nan"), 3.5]), "non-finite"),
    (lambda o: _set_scales(o, [1.5, float("inf")]), "non-finite"),
    (lambda o: _set_scales(o, [3.5, 1.5]), "low level above"),
    (lambda o: _set_scales(o, [1.5, 3.5, 0.0, 0.0]), "needs exactly 8"),
    (lambda o: _set_scales(o, [1.5]), "needs exactly 8"),
    (lambda o: o["bufs"][1].__setitem__(2, b""), "needs exactly 1"),
    (lambda o: o["bufs"].pop(), "must carry buffers"),
    (lambda o: o["bufs"][2].__setitem__(1, "float16"), "must be \\[name"),
    (lambda o: o["opts"].update(values="int3"), "'values' must be one of"),
    (lambda o: o["opts"].update(values="fp32"), "must carry buffers"),
])
def test_malformed_int2_payloads_raise_wire_format_error(mutate, match):
    x = torch.tensor([0.5, -3.0, 0.25, 2.0, -1.0, 0.125, 4.0, 0.0])
    obj = envelope(blob=encode(get_compressor("topk", chunk_size=8, k=4, values="int2").compress(x)))
    assert decode(reencode(obj)).buffers["scales"].tolist() == [1.5, 3.5]  # the helpers are faithful
    mutate(obj)
    with pytest.raises(WireFormatError, match=match):
        decode(reencode(obj))


def test_int2_is_a_values_choice_and_bad_ones_name_it():
    with pytest.raises(ValueError, match="int2"):
        get_compressor("topk", values="int4")
