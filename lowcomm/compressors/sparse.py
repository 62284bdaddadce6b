"""Sparse codecs: ``topk`` and ``randk``.

The flattened tensor is cut into chunks of ``chunk_size`` values (the last may
be shorter). Each chunk keeps ``k`` coordinates, ``k_tail`` for a short last
chunk (density times its length, at least 1). The rest decompress as zeros.

- ``topk`` keeps the k largest |x| of each chunk and sends their values plus
  chunk-local indices in ceil(log2(chunk_size)) bits each (Deep Gradient
  Compression, Lin et al. 2018; DeMo, Peng et al. 2024).
- ``randk`` keeps k uniformly random coordinates of each chunk; the indices are
  regenerated from a seed carried in the payload, so only values travel
  (Stich et al. 2018). Values are not rescaled: pair it with error feedback.

Kept values travel as fp16, bf16 or fp32, or with ``values="int2"`` as 2-bit
codes plus two fp32 levels per chunk (SparseLoCo's 2-bit values; Sarfi et
al. 2025). Each code is a sign bit and a magnitude bit: a kept value is
"high" when ``|v| >= (min|v| + max|v|) / 2`` over the chunk's kept values,
and it decodes to ``sign(v)`` times the mean ``|v|`` of the kept values of
its chunk on the same side (0 for a side with none). Decoding each bin to the
mean of what fell in it is the rule of SparseLoCo's reference quantiser
(tplr ``TopKCompressor._quantize_values``: 4 bins, each decoded through a
table of bin means); here the bins are sign-symmetric and the table is per
chunk, 2 x 32 bits. Per chunk of ``chunk_size`` values with k kept that is
``k * (index_bits + 2) + 64`` bits for ``topk`` (960 bits for k = 64 of 4096:
0.23 bits per value) and ``2 k + 64`` for ``randk``.
"""

from __future__ import annotations

import torch

from lowcomm.compressors.base import (
    Compressor, flat_fp32, new_payload, register, require_choice, require_finite, require_int,
    require_keys, restore,
)
from lowcomm.compressors.bitpack import pack, packed_size, unpack
from lowcomm.compressors.errors import WireFormatError
from lowcomm.compressors.payload import BUFFER_DTYPES, Payload

MAX_CHUNK = 1 << 24
VALUE_DTYPES = ("fp16", "bf16", "fp32", "int2")
_WIRE_VALUE = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_FLOYD_MAX_K = 64  # above this many picks per chunk, random keys + topk is cheaper


def index_bits(chunk_size: int) -> int:
    """Bits per chunk-local index."""
    return max(1, (chunk_size - 1).bit_length())


def _split(numel: int, chunk: int) -> tuple[int, int]:
    """(number of full chunks, length of the short last chunk or 0)."""
    return numel // chunk, numel % chunk


def int2_quantize(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-bit codes for the kept values of each chunk, one chunk per row (see the
    module doc): ``codes`` (rows, k) int64, ``2 * negative + high``, and
    ``levels`` (rows, 2) fp32, the [low, high] magnitudes they decode to."""
    mag = rows.abs()
    lo, hi = torch.aminmax(mag, dim=1)
    mid = torch.minimum(lo / 2 + hi / 2, hi).unsqueeze(1)  # <= max|v|, so "high" is never empty
    high = mag >= mid
    n_high = high.sum(1)
    level_hi = torch.where(high, mag, 0.0).sum(1) / n_high
    level_lo = torch.where(high, 0.0, mag).sum(1) / (rows.shape[1] - n_high).clamp(min=1)
    level_lo = torch.minimum(level_lo, level_hi)  # means can round across mid; keep low <= high
    return (rows < 0).to(torch.int64) * 2 + high, torch.stack([level_lo, level_hi], dim=1)


def int2_dequantize(codes: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Inverse of `int2_quantize`: (rows, k) fp32 values."""
    mag = levels.gather(1, codes & 1)
    return torch.where(codes >= 2, -mag, mag)


class _Sparse(Compressor):
    sparse = True

    def __init__(self, density: float = 0.01, chunk_size: int = 4096, values: str = "fp16",
                 k: int | None = None):
        if type(chunk_size) is not int or not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be an integer in [1, {MAX_CHUNK}], got {chunk_size!r}")
        if values not in VALUE_DTYPES:
            raise ValueError(f"values must be one of {VALUE_DTYPES}, got {values!r}")
        if k is None:
            if not 0.0 < density <= 1.0:
                raise ValueError(f"density must be in (0, 1], got {density!r}; or pass k=")
            k = max(1, round(density * chunk_size))
        if type(k) is not int or not 1 <= k <= chunk_size:
            raise ValueError(f"k must be an integer in [1, chunk_size={chunk_size}], got {k!r}")
        self.chunk_size, self.k, self.values = chunk_size, k, values

    @property
    def density(self) -> float:
        return self.k / self.chunk_size

    @property
    def unit(self) -> int:
        return self.chunk_size

    def _k_tail(self, tail: int) -> int:
        return min(tail, max(1, round(self.density * tail))) if tail else 0

    def options(self) -> dict:
        return {"chunk_size": self.chunk_size, "k": self.k, "values": self.values}

    def wire_options(self, numel: int) -> dict:
        return {**self.options(), "k_tail": self._k_tail(_split(numel, self.chunk_size)[1])}

    @classmethod
    def _check_sparse_options(cls, options: dict, numel: int, extra: set[str]) -> None:
        require_keys(options, {"chunk_size", "k", "k_tail", "values"} | extra)
        chunk = require_int(options, "chunk_size", 1, MAX_CHUNK)
        require_int(options, "k", 1, chunk)
        require_int(options, "k_tail", 0, _split(numel, chunk)[1])
        if _split(numel, chunk)[1] and options["k_tail"] == 0:
            raise WireFormatError("option 'k_tail' must be >= 1 when the last chunk is short")
        require_choice(options, "values", VALUE_DTYPES)

    @staticmethod
    def _kept(options: dict, numel: int) -> int:
        return _split(numel, options["chunk_size"])[0] * options["k"] + options["k_tail"]

    @staticmethod
    def _rows(v: torch.Tensor, options: dict, numel: int) -> list[torch.Tensor]:
        """Kept values (or their codes) as one 2-D block per chunk size: (full, k), then (1, k_tail)."""
        full, tail = _split(numel, options["chunk_size"])
        k_full = full * options["k"]
        rows = [v[:k_full].view(full, options["k"])] if full else []
        return (rows + [v[k_full:].view(1, -1)]) if tail else rows

    @classmethod
    def _value_spec(cls, options: dict, numel: int) -> dict[str, tuple[str, int]]:
        kept = cls._kept(options, numel)
        if options["values"] != "int2":
            return {"values": (_WIRE_VALUE[options["values"]], kept)}
        full, tail = _split(numel, options["chunk_size"])
        return {"values": ("uint8", packed_size(kept, 2)), "scales": ("float32", 2 * (full + bool(tail)))}

    def _encode_values(self, v: torch.Tensor, numel: int) -> dict[str, torch.Tensor]:
        """The value buffers for the kept fp32 values ``v`` of a tensor of ``numel`` values."""
        if self.values != "int2":
            return {"values": v.to(BUFFER_DTYPES[_WIRE_VALUE[self.values]])}
        rows = self._rows(v, self.wire_options(numel), numel)
        coded = [int2_quantize(r) for r in rows]
        codes = torch.cat([c.reshape(-1) for c, _ in coded]) if coded else torch.zeros(0, dtype=torch.int64)
        levels = torch.cat([lv.reshape(-1) for _, lv in coded]) if coded else torch.zeros(0)
        return {"values": pack(codes, 2), "scales": levels}

    @classmethod
    def _values(cls, payload: Payload) -> torch.Tensor:
        """The kept values in fp32, dequantised where they travel as codes."""
        o = payload.options
        if o["values"] != "int2":
            return payload.buffers["values"].to(torch.float32)
        kept = cls._kept(o, payload.numel)
        codes = cls._rows(unpack(payload.buffers["values"], 2, kept).to(torch.int64), o, payload.numel)
        levels = payload.buffers["scales"].view(-1, 2)
        parts, row = [], 0
        for c in codes:
            parts.append(int2_dequantize(c, levels[row:row + c.shape[0]]).reshape(-1))
            row += c.shape[0]
        return torch.cat(parts) if parts else torch.zeros(0)

    @classmethod
    def _scatter(cls, payload: Payload, indices: list[torch.Tensor]) -> torch.Tensor:
        """Place the payload's values at (full-chunk, tail) indices; zeros elsewhere."""
        chunk = payload.options["chunk_size"]
        full, tail = _split(payload.numel, chunk)
        values = cls._values(payload)
        out = torch.zeros(payload.numel, dtype=torch.float32)
        k_full = full * payload.options["k"]
        if full:
            out[:full * chunk].view(full, chunk).scatter_(1, indices[0], values[:k_full].view(full, -1))
        if tail:
            out[full * chunk:].scatter_(0, indices[1], values[k_full:])
        return restore(out, payload)

    def _gather(self, flat: torch.Tensor, indices: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The value buffers for the values of ``flat`` at (full-chunk, tail) indices."""
        chunk = self.chunk_size
        full, tail = _split(flat.numel(), chunk)
        parts = []
        if full:
            parts.append(flat[:full * chunk].view(full, chunk).gather(1, indices[0]).reshape(-1))
        if tail:
            parts.append(flat[full * chunk:][indices[1]])
        return self._encode_values(torch.cat(parts) if parts else flat.new_zeros(0), flat.numel())

    @classmethod
    def check_buffers(cls, payload: Payload) -> None:
        if payload.options["values"] != "int2":
            require_finite("values", payload.buffers["values"])
            return
        levels = payload.buffers["scales"]
        require_finite("scales", levels)
        if levels.numel() and bool((levels < 0).any()):
            raise WireFormatError("buffer 'scales' holds negative values; int2 levels are magnitudes")
        pairs = levels.view(-1, 2)
        if bool((pairs[:, 0] > pairs[:, 1]).any()):
            raise WireFormatError("buffer 'scales' holds a low level above its chunk's high level")
        # every 2-bit code is valid; trailing pad bits of the code buffer are ignored


@register
class TopK(_Sparse):
    """Keep the k largest-magnitude values of every chunk (see module doc)."""

    name = "topk"

    def compress(self, x: torch.Tensor) -> Payload:
        flat = flat_fp32(x)
        full, tail = _split(flat.numel(), self.chunk_size)
        indices = [torch.zeros(0, 0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)]
        if full:
            mags = flat[:full * self.chunk_size].view(full, self.chunk_size).abs()
            indices[0] = mags.topk(self.k, dim=1, sorted=False).indices.sort(dim=1).values
        if tail:
            mags = flat[full * self.chunk_size:].abs()
            indices[1] = mags.topk(self._k_tail(tail), sorted=False).indices.sort().values
        packed = pack(torch.cat([indices[0].reshape(-1), indices[1]]), index_bits(self.chunk_size))
        return new_payload(self.name, self.wire_options(flat.numel()), x,
                           indices=packed, **self._gather(flat, indices))

    @classmethod
    def _indices(cls, payload: Payload) -> list[torch.Tensor]:
        o = payload.options
        full, _ = _split(payload.numel, o["chunk_size"])
        flat = unpack(payload.buffers["indices"], index_bits(o["chunk_size"]), cls._kept(o, payload.numel))
        flat = flat.to(torch.int64)
        return [flat[:full * o["k"]].view(full, o["k"]), flat[full * o["k"]:]]

    @classmethod
    def decompress_payload(cls, payload: Payload) -> torch.Tensor:
        return cls._scatter(payload, cls._indices(payload))

    @classmethod
    def check_options(cls, options: dict, numel: int) -> None:
        cls._check_sparse_options(options, numel, set())

    @classmethod
    def buffer_spec(cls, options: dict, numel: int) -> dict[str, tuple[str, int]]:
        kept = cls._kept(options, numel)
        return {"indices": ("uint8", packed_size(kept, index_bits(options["chunk_size"]))),
                **cls._value_spec(options, numel)}

    @classmethod
    def check_buffers(cls, payload: Payload) -> None:
        super().check_buffers(payload)
        full_idx, tail_idx = cls._indices(payload)
        chunk = payload.options["chunk_size"]
        tail = _split(payload.numel, chunk)[1]
        for idx, bound in ((full_idx, chunk), (tail_idx.view(1, -1), tail)):
            if idx.numel() == 0:
                continue
            if bool((idx >= bound).any()):
                raise WireFormatError(f"topk index out of range for a chunk of {bound} values")
            if idx.shape[1] > 1 and bool((idx[:, 1:] <= idx[:, :-1]).any()):
                raise WireFormatError("topk indices must be strictly increasing within a chunk")
        # trailing pad bits of the index buffer are ignored


def random_subsets(generator: torch.Generator, rows: int, n: int, k: int) -> torch.Tensor:
    """(rows, k) sorted indices: an independent uniform k-subset of range(n) per row.

    Robert Floyd's algorithm, vectorised over rows, for small k; random keys
    and topk otherwise. Deterministic given the generator's state.
    """
    if k > _FLOYD_MAX_K:
        return torch.rand(rows, n, generator=generator).topk(k, dim=1, sorted=False).indices.sort(1).values
    sel = torch.empty(rows, k, dtype=torch.int64)
    for i, j in enumerate(range(n - k, n)):
        t = torch.randint(0, j + 1, (rows,), generator=generator)
        if i:
            t = torch.where((sel[:, :i] == t.unsqueeze(1)).any(1), j, t)
        sel[:, i] = t
    return sel.sort(1).values


@register
class RandK(_Sparse):
    """Keep k uniformly random values of every chunk (see module doc).

    ``seed`` seeds the stream of per-call seeds; each payload carries the seed
    its indices were drawn from, so the receiver regenerates them.
    """

    name = "randk"

    def __init__(self, density: float = 0.01, chunk_size: int = 4096, values: str = "fp16",
                 k: int | None = None, seed: int = 0):
        super().__init__(density, chunk_size, values, k)
        self.seed = seed
        self._seeds = torch.Generator().manual_seed(seed)

    def options(self) -> dict:
        return {**super().options(), "seed": self.seed}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"seed_stream": self._seeds.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        stream = state.get("seed_stream")
        want = self._seeds.get_state()
        if set(state) != {"seed_stream"} or not isinstance(stream, torch.Tensor) or stream.dtype != want.dtype \
                or stream.shape != want.shape:
            raise ValueError("randk state must be {'seed_stream': the uint8 tensor state_dict() gave}")
        self._seeds.set_state(stream.clone())

    def wire_options(self, numel: int) -> dict:
        return {**super().wire_options(numel), "seed": 2**62 - 1}  # draw seeds take up to 9 bytes

    @staticmethod
    def _indices(options: dict, numel: int, draw_seed: int) -> list[torch.Tensor]:
        chunk = options["chunk_size"]
        full, tail = _split(numel, chunk)
        g = torch.Generator().manual_seed(draw_seed)
        return [random_subsets(g, full, chunk, options["k"]) if full else torch.zeros(0, 0, dtype=torch.int64),
                random_subsets(g, 1, tail, options["k_tail"])[0] if tail else torch.zeros(0, dtype=torch.int64)]

    def compress(self, x: torch.Tensor) -> Payload:
        flat = flat_fp32(x)
        draw_seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        options = {**self.wire_options(flat.numel()), "seed": draw_seed}
        indices = self._indices(options, flat.numel(), draw_seed)
        return new_payload(self.name, options, x, **self._gather(flat, indices))

    @classmethod
    def decompress_payload(cls, payload: Payload) -> torch.Tensor:
        indices = cls._indices(payload.options, payload.numel, payload.options["seed"])
        return cls._scatter(payload, indices)

    @classmethod
    def check_options(cls, options: dict, numel: int) -> None:
        cls._check_sparse_options(options, numel, {"seed"})
        require_int(options, "seed", 0, 2**63 - 1)

    @classmethod
    def buffer_spec(cls, options: dict, numel: int) -> dict[str, tuple[str, int]]:
        return cls._value_spec(options, numel)
