"""Codec math: wire sizes, error bounds, hand-computed cases, round trips."""

import pytest
import torch

from lowcomm.compressors import codec_names, decode, encode, get_compressor
from lowcomm.compressors.bitpack import pack, unpack
from lowcomm.compressors.sparse import random_subsets

SPARSE = {"topk": {"density": 0.01}, "randk": {"density": 0.01}}


def roundtrip(codec, x):
    return codec.decompress(decode(encode(codec.compress(x))))


def bits_per_value(name, numel=1 << 20, **options):
    x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    return len(encode(get_compressor(name, **options).compress(x))) * 8 / numel


@pytest.mark.parametrize("name,options,limit", [
    ("sign", {}, 1.02), ("fp4", {}, 4.05), ("int4", {}, 4.05), ("int8", {}, 8.05), ("fp8", {}, 8.05),
    ("topk", {"density": 0.01, "values": "fp16"}, 0.35), ("randk", {"density": 0.01, "values": "fp16"}, 0.17),
])
def test_wire_size_on_1m_values(name, options, limit):
    assert bits_per_value(name, **options) <= limit


def test_dense_wire_sizes_are_exact():
    numel = 1 << 20
    for name, bits in (("none", 32), ("fp16", 16), ("bf16", 16)):
        size = bits_per_value(name, numel) * numel / 8
        assert numel * bits // 8 < size < numel * bits // 8 + 120  # header is under 120 bytes


@pytest.mark.parametrize("name", codec_names())
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 5), (4096,), (2, 4096 + 13), (1 << 20) + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_roundtrip_keeps_shape_and_dtype(name, shape, dtype):
    shape = shape if isinstance(shape, tuple) else (shape,)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = roundtrip(get_compressor(name, **SPARSE.get(name, {})), x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()


def test_none_is_exact_and_casts_equal_torch():
    x = torch.randn(10_001, generator=torch.Generator().manual_seed(2)) * 100
    assert torch.equal(roundtrip(get_compressor("none"), x), x)
    assert torch.equal(roundtrip(get_compressor("fp16"), x), x.half().float())
    assert torch.equal(roundtrip(get_compressor("bf16"), x), x.bfloat16().float())
    xb = x.bfloat16()
    assert torch.equal(roundtrip(get_compressor("fp16"), xb), xb.half().bfloat16())


def test_decompressed_tensor_never_aliases_the_payload():
    c = get_compressor("none")
    p = c.compress(torch.ones(4))
    y = c.decompress(p)
    y.zero_()
    assert torch.equal(c.decompress(p), torch.ones(4))


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_int8_error_within_absmax_over_254(block):
    x = torch.randn(50_000, generator=torch.Generator().manual_seed(3)) * 3
    y = roundtrip(get_compressor("int8", block_size=block), x)
    pad = (-x.numel()) % block
    absmax = torch.cat([x, x.new_zeros(pad)]).view(-1, block).abs().amax(1)
    bound = absmax.repeat_interleave(block)[: x.numel()] / 254
    assert ((y - x).abs() <= bound * (1 + 1e-5) + 1e-12).all()


def test_int4_error_within_absmax_over_14():
    x = torch.randn(8192, generator=torch.Generator().manual_seed(4))
    y = roundtrip(get_compressor("int4", block_size=1024), x)
    bound = x.view(-1, 1024).abs().amax(1).repeat_interleave(1024) / 14
    assert ((y - x).abs() <= bound * (1 + 1e-5)).all()


def test_int8_hand_computed():
    # absmax 1: codes round(127 * x) = [127, -64 (half to even), 32, 0]
    y = roundtrip(get_compressor("int8", block_size=4), torch.tensor([1.0, -0.5, 0.25, 0.0]))
    assert torch.allclose(y, torch.tensor([127, -64, 32, 0]) / 127.0, atol=0, rtol=1e-6)


def test_fp4_hand_computed():
    # block absmax 1; nearest of {0, 2^-6 .. 2^-1, 1} in linear distance, sign kept
    x = torch.tensor([1.0, 0.7, 0.3, 0.005, -0.1, 0.0, 0.01, -0.76])
    want = torch.tensor([1.0, 0.5, 0.25, 0.0, -0.125, 0.0, 2.0 ** -6, -1.0])
    assert torch.equal(roundtrip(get_compressor("fp4", block_size=8), x), want)
    # the scale travels: doubling the input doubles the output
    assert torch.equal(roundtrip(get_compressor("fp4", block_size=8), 2 * x), 2 * want)


def test_fp8_matches_e4m3_cast_of_scaled_values():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(5))
    s = x.abs().max()
    want = (x * (448 / s)).to(torch.float8_e4m3fn).float() * (s / 448)
    assert torch.allclose(roundtrip(get_compressor("fp8"), x), want, rtol=1e-6, atol=0)


def test_sign_hand_computed():
    # two blocks of 2: mean |x| = 2 and 0.5; zero counts as positive
    y = roundtrip(get_compressor("sign", block_size=2), torch.tensor([1.0, -3.0, 0.0, -1.0, 5.0]))
    assert torch.equal(y, torch.tensor([2.0, -2.0, 0.5, -0.5, 5.0]))


def test_topk_keeps_exactly_the_k_largest_per_chunk():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(10 * 1000 + 300, generator=g)  # 10 full chunks and a short one
    c = get_compressor("topk", k=25, chunk_size=1000, values="fp32")
    y = roundtrip(c, x)
    for start in range(0, x.numel(), 1000):
        xs, ys = x[start:start + 1000], y[start:start + 1000]
        k = 25 if xs.numel() == 1000 else round(0.025 * xs.numel())
        top = set(xs.abs().topk(k).indices.tolist())
        assert set(ys.nonzero().flatten().tolist()) == top
        assert torch.equal(ys[sorted(top)], xs[sorted(top)])


def test_topk_hand_computed():
    c = get_compressor("topk", k=2, chunk_size=4, values="fp32")
    y = roundtrip(c, torch.tensor([0.1, -5.0, 3.0, 0.2, 9.0]))
    assert torch.equal(y, torch.tensor([0.0, -5.0, 3.0, 0.0, 9.0]))


def test_randk_indices_from_the_seed():
    c = get_compressor("randk", k=3, chunk_size=10, values="fp32", seed=7)
    x = torch.arange(1.0, 41.0)
    p = c.compress(x)
    y = c.decompress(decode(encode(p)))
    kept = y.view(4, 10).ne(0).sum(1)
    assert kept.tolist() == [3, 3, 3, 3]
    assert torch.equal(y[y != 0], x[y != 0])  # values are the original ones
    # the same seed stream gives the same draws; the next call draws anew
    assert torch.equal(get_compressor("randk", k=3, chunk_size=10, values="fp32", seed=7).compress(x).buffers["values"],
                       p.buffers["values"])
    assert not torch.equal(c.compress(x).buffers["values"], p.buffers["values"])


@pytest.mark.parametrize("k", [5, 100])  # Floyd's algorithm and random keys
def test_random_subsets_are_distinct_and_uniform(k):
    n, rows = 200, 4000
    sel = random_subsets(torch.Generator().manual_seed(8), rows, n, k)
    assert sel.shape == (rows, k)
    assert (sel[:, 1:] > sel[:, :-1]).all()  # sorted and distinct
    counts = torch.bincount(sel.flatten(), minlength=n)
    assert counts.sum().item() == rows * k
    freq = counts.double() / rows
    assert (freq - k / n).abs().max().item() < 6 * (k / n * (1 - k / n) / rows) ** 0.5


@pytest.mark.parametrize("bits", [1, 4, 8, 12, 3])
def test_bitpack_roundtrip(bits):
    codes = torch.randint(0, 2 ** bits, (1001,), generator=torch.Generator().manual_seed(9))
    packed = pack(codes, bits)
    assert packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, 1001).to(torch.int64), codes)


def test_bitpack_layout_is_msb_first():
    assert pack(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0b10000001, 0b10000000]
    assert pack(torch.tensor([0xA, 0x5, 0x3]), 4).tolist() == [0xA5, 0x30]
    assert pack(torch.tensor([0xABC, 0x123]), 12).tolist() == [0xAB, 0xC1, 0x23]


def test_bad_options_raise_value_error():
    with pytest.raises(ValueError, match="block_size"):
        get_compressor("int8", block_size=0)
    with pytest.raises(ValueError, match="density"):
        get_compressor("topk", density=0)
    with pytest.raises(ValueError, match="unknown compressor 'gzip'"):
        get_compressor("gzip")
    with pytest.raises(ValueError, match="bad options"):
        get_compressor("sign", density=0.1)


def test_codec_state_resumes_randk_draws_and_is_empty_elsewhere():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    a = get_compressor("randk", density=0.1, chunk_size=100, seed=3)
    a.compress(x)
    saved = a.state_dict()
    want = [encode(a.compress(x)) for _ in range(2)]
    b = get_compressor("randk", density=0.1, chunk_size=100, seed=3)
    assert encode(b.compress(x)) != want[0]  # a fresh codec is at the start of its stream
    b.load_state_dict(saved)
    assert [encode(b.compress(x)) for _ in range(2)] == want
    with pytest.raises(ValueError, match="seed_stream"):
        b.load_state_dict({"seed_stream": torch.zeros(3, dtype=torch.uint8)})
    for name in ("none", "int8", "topk"):
        assert get_compressor(name).state_dict() == {}
    with pytest.raises(ValueError, match="keeps no state"):
        get_compressor("int8").load_state_dict(saved)


def test_fp4_codes_follow_the_nearest_power_of_two_rule():
    """The bit-level quantiser equals the rule written with frexp: level = nearest power of two of
    |x| / scale (ties up), code = sign * 8 + clamp(level + 7, 1, 7), or 0 below 2**-7."""
    from lowcomm.compressors.blockwise import Float4

    def reference(blocks, scales):
        r = blocks.abs() * torch.where(scales > 0, 1.0 / scales, torch.zeros_like(scales))
        mantissa, exponent = torch.frexp(r)
        k = torch.clamp(exponent - (mantissa < 0.75).to(torch.int32) + 7, 1, 7)
        k = torch.where(r < 2.0 ** -7, torch.zeros_like(k), k)
        return (k + (blocks < 0).to(torch.int32) * 8).to(torch.uint8)

    g = torch.Generator().manual_seed(7)
    x = torch.randn(64, 512, generator=g) * 10.0 ** torch.randint(-30, 30, (64, 1), generator=g).float()
    x[0, :10] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 2 ** -7, -(2 ** -7), 1.5 * 2 ** -8, 0.999 * 2 ** -7, 0.75, 1.0])
    x[1] = 0.0  # an all-zero block
    scales = Float4._scale(x).unsqueeze(1)
    assert torch.equal(Float4._quantize(x, scales), reference(x, scales))
