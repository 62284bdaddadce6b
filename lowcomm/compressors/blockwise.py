"""Blockwise-scaled codecs: ``int8``, ``int4``, ``fp8``, ``fp4`` and ``sign``.

The flattened tensor is cut into blocks of ``block_size`` values (the last one
may be shorter). Each block gets one fp32 scale and each value one code of
``bits`` bits, packed MSB first (see `bitpack`). Wire cost per value is
``bits + 32 / block_size`` bits.

Work is done in runs of whole blocks of about 2**20 values, so each run's
passes stay in cache: this is what makes the codecs run near memcpy speed.
"""

from __future__ import annotations

from typing import ClassVar, Iterator

import torch

from lowcomm.compressors.base import (
    Compressor, flat_fp32, new_payload, register, require_finite, require_int, require_keys, restore,
)
from lowcomm.compressors.bitpack import pack, packed_size, unpack
from lowcomm.compressors.errors import WireFormatError
from lowcomm.compressors.payload import Payload

MAX_BLOCK = 1 << 24
_RUN_VALUES = 1 << 20  # values per run of blocks, sized for the cache

Run = tuple[int, int, int]  # (first value index, number of blocks, block width)


def _groups(n: int, block: int) -> Iterator[list[Run]]:
    """Cover [0, n) with runs of whole blocks, grouped so that every group
    starts at a multiple of 8 values (so its packed codes start on a byte)."""
    rows = max(8, (_RUN_VALUES // block) // 8 * 8)
    full = n // block
    start = 0
    while full - start // block >= rows:
        yield [(start, rows, block)]
        start += rows * block
    rest = []
    left = full - start // block
    if left:
        rest.append((start, left, block))
        start += left * block
    if n > start:
        rest.append((start, 1, n - start))
    if rest:
        yield rest


class _Blockwise(Compressor):
    bits: ClassVar[int]

    def __init__(self, block_size: int = 4096):
        if type(block_size) is not int or not 1 <= block_size <= MAX_BLOCK:
            raise ValueError(f"block_size must be an integer in [1, {MAX_BLOCK}], got {block_size!r}")
        self.block_size = block_size

    def options(self) -> dict:
        return {"block_size": self.block_size}

    @property
    def unit(self) -> int:
        return self.block_size

    # --- per-codec math on a (rows, width) run; scales has shape (rows, 1) ---
    @staticmethod
    def _scale(blocks: torch.Tensor) -> torch.Tensor:
        """One fp32 scale per row (default: absmax)."""
        lo, hi = torch.aminmax(blocks, dim=1)
        return torch.maximum(-lo, hi)

    @staticmethod
    def _quantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def _check_codes(cls, codes: torch.Tensor, numel: int) -> None:
        """Reject packed codes that no compressor emits."""

    # --- shared machinery ---
    def compress(self, x: torch.Tensor) -> Payload:
        flat = flat_fp32(x)
        n, block, bits = flat.numel(), self.block_size, self.bits
        codes = torch.empty(packed_size(n, bits), dtype=torch.uint8)
        scales = torch.empty(-(-n // block), dtype=torch.float32)
        for group in _groups(n, block):
            parts = []
            for start, rows, width in group:
                blocks = flat[start:start + rows * width].view(rows, width)
                s = self._scale(blocks)
                scales[start // block:start // block + rows] = s
                parts.append(self._quantize(blocks, s.unsqueeze(1)).reshape(-1))
            packed = pack(parts[0] if len(parts) == 1 else torch.cat(parts), bits)
            offset = group[0][0] * bits // 8
            codes[offset:offset + packed.numel()] = packed
        return new_payload(self.name, self.options(), x, codes=codes, scales=scales)

    @classmethod
    def decompress_payload(cls, payload: Payload) -> torch.Tensor:
        block, bits = payload.options["block_size"], cls.bits
        codes, scales = payload.buffers["codes"], payload.buffers["scales"]
        out = torch.empty(payload.numel, dtype=torch.float32)
        for group in _groups(payload.numel, block):
            count = sum(rows * width for _, rows, width in group)
            offset = group[0][0] * bits // 8
            c = unpack(codes[offset:offset + packed_size(count, bits)], bits, count)
            used = 0
            for start, rows, width in group:
                run_codes = c[used:used + rows * width].view(rows, width)
                s = scales[start // block:start // block + rows].unsqueeze(1)
                out[start:start + rows * width] = cls._dequantize(run_codes, s).reshape(-1)
                used += rows * width
        return restore(out, payload)

    @classmethod
    def check_options(cls, options: dict, numel: int) -> None:
        require_keys(options, {"block_size"})
        require_int(options, "block_size", 1, MAX_BLOCK)

    @classmethod
    def buffer_spec(cls, options: dict, numel: int) -> dict[str, tuple[str, int]]:
        blocks = -(-numel // options["block_size"])
        return {"codes": ("uint8", packed_size(numel, cls.bits)), "scales": ("float32", blocks)}

    @classmethod
    def check_buffers(cls, payload: Payload) -> None:
        scales = payload.buffers["scales"]
        require_finite("scales", scales)
        if scales.numel() and bool((scales < 0).any()):
            raise WireFormatError("buffer 'scales' holds negative values; block scales are magnitudes")
        cls._check_codes(payload.buffers["codes"], payload.numel)


def _inverse(scales: torch.Tensor, top: float) -> torch.Tensor:
    """top / scale, and 0 where the scale is 0 (an all-zero block)."""
    return torch.where(scales > 0, top / scales, torch.zeros_like(scales))


@register
class Int8(_Blockwise):
    """Symmetric 8-bit integers with a blockwise absmax scale.

    q = round(x * 127 / absmax); per-value error <= absmax / 254.
    """

    name = "int8"
    bits = 8

    @staticmethod
    def _quantize(blocks, scales):
        return torch.round(blocks * _inverse(scales, 127.0)).to(torch.int8).view(torch.uint8)

    @staticmethod
    def _dequantize(codes, scales):
        return codes.view(torch.int8) * (scales / 127.0)

    @classmethod
    def _check_codes(cls, codes, numel):
        if codes.numel() and bool((codes == 0x80).any()):
            raise WireFormatError("int8 code -128 is outside the symmetric range [-127, 127]")


@register
class Int4(_Blockwise):
    """Symmetric 4-bit integers in [-7, 7] with a blockwise absmax scale,
    two values per byte. Per-value error <= absmax / 14."""

    name = "int4"
    bits = 4

    @staticmethod
    def _quantize(blocks, scales):
        return (torch.round(blocks * _inverse(scales, 7.0)) + 8).to(torch.uint8)

    @staticmethod
    def _dequantize(codes, scales):
        return (codes.to(torch.float32) - 8.0) * (scales / 7.0)

    @classmethod
    def _check_codes(cls, codes, numel):
        # code 0 (value -8) is never emitted; only the pad nibble after an odd count is 0
        if (unpack(codes, 4, numel) == 0).any():
            raise WireFormatError("int4 code 0 is outside the symmetric range [-7, 7]")


@register
class Float8(_Blockwise):
    """FP8 E4M3 (``torch.float8_e4m3fn``) with a blockwise scale that maps the
    block's absmax to 448, the largest E4M3 value. Relative error <= 2**-4."""

    name = "fp8"
    bits = 8

    @staticmethod
    def _quantize(blocks, scales):
        return (blocks * _inverse(scales, 448.0)).to(torch.float8_e4m3fn).view(torch.uint8)

    @staticmethod
    def _dequantize(codes, scales):
        return codes.view(torch.float8_e4m3fn).to(torch.float32) * (scales / 448.0)

    @classmethod
    def _check_codes(cls, codes, numel):
        if codes.numel() and bool(((codes & 0x7F) == 0x7F).any()):
            raise WireFormatError("fp8 codes hold NaN (0x7F or 0xFF)")


# E3M0: code = sign << 3 | k, magnitude 0 for k = 0 and 2**(k-7) for k = 1..7
_FP4_VALUES = torch.tensor([0.0] + [2.0 ** (k - 7) for k in range(1, 8)]
                           + [-0.0] + [-(2.0 ** (k - 7)) for k in range(1, 8)])


@register
class Float4(_Blockwise):
    """FP4 E3M0 (sign + 3-bit exponent, no mantissa) with a blockwise absmax
    scale, as Streaming DiLoCo quantises outer gradients (Douillard et al. 2025).

    A value becomes the nearest of ``scale * {0, 2**-6, ..., 2**-1, 1}`` with
    its sign. Relative error <= 1/3 for values above scale * 2**-6.
    """

    name = "fp4"
    bits = 4

    @staticmethod
    def _quantize(blocks, scales):
        r = blocks.abs() * _inverse(scales, 1.0)
        # r's nearest power of two, 2**level, from its fp32 bits: adding half the mantissa range
        # carries into the exponent field exactly when the mantissa is >= 1.5 (ties go up)
        level = ((r.view(torch.int32) + 0x400000) >> 23) - 127
        k = torch.clamp(level + 7, 1, 7)
        k = torch.where(r < 2.0 ** -7, 0, k)
        return (k + (blocks < 0).to(torch.int32) * 8).to(torch.uint8)

    @staticmethod
    def _dequantize(codes, scales):
        return _FP4_VALUES[codes.to(torch.int64)] * scales


@register
class Sign(_Blockwise):
    """One bit per value (its sign) with a blockwise mean-|x| scale, as
    signSGD with majority vote / 1-bit Adam (Bernstein et al. 2018; Tang et al.
    2021). Zero counts as positive. Use it with error feedback."""

    name = "sign"
    bits = 1

    @staticmethod
    def _scale(blocks):
        return blocks.abs().mean(dim=1)

    @staticmethod
    def _quantize(blocks, scales):
        return blocks >= 0

    @staticmethod
    def _dequantize(codes, scales):
        return (codes.to(torch.float32) * 2.0 - 1.0) * scales
