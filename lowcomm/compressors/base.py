"""The compressor interface and the registry that maps codec names to classes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from lowcomm.compressors.errors import WireFormatError
from lowcomm.compressors.payload import FLOAT_DTYPES, Payload, dtype_name

_REGISTRY: dict[str, type[Compressor]] = {}


class Compressor(ABC):
    """Turns a float tensor into a `Payload` and back.

    Subclasses set ``name``, implement `compress` / `decompress`, describe the
    exact buffers a payload of theirs holds (`buffer_spec`) and check what a
    peer could get wrong (`check_options`, `check_buffers`). `decode` calls
    those before any tensor is built, so `decompress` may trust its input.
    Decompression reads the codec options from the payload, not from ``self``.
    """

    name: ClassVar[str]
    #: Sparse codecs are averaged by all-gather; dense ones by reduce-scatter.
    sparse: ClassVar[bool] = False
    #: Exact codecs decompress fp32 input to itself, bit for bit (only ``none``).
    exact: ClassVar[bool] = False

    @property
    def unit(self) -> int:
        """Consecutive values compressed together (a block, a top-k chunk): a
        vector cut at multiples of it is compressed in the same units piece by
        piece as whole (so a deterministic codec gives the same values; randk
        draws its own). 1 for codecs that treat every value alone."""
        return 1

    @abstractmethod
    def compress(self, x: torch.Tensor) -> Payload:
        """Compress ``x`` (fp32, fp16 or bf16, any shape). ``x`` must be finite:
        a non-finite input gives a payload that `decode` rejects."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a codec changes as it compresses (``randk``'s seed stream), so that
        a resumed run compresses exactly as an uninterrupted one. Most have none."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"the {self.name!r} codec keeps no state, got {sorted(state)}")

    @classmethod
    def decompress_payload_into(cls, payload: Payload, out: torch.Tensor) -> None:
        """Decompress into the 1-D tensor ``out`` (see `decompress_into`)."""
        out.copy_(cls.decompress_payload(payload).reshape(-1))

    def compress_owned(self, x: torch.Tensor) -> Payload:
        """`compress` for a tensor nobody writes to again: the payload may share
        its memory (``none`` then copies nothing)."""
        return self.compress(x)

    def decompress(self, payload: Payload) -> torch.Tensor:
        """The tensor ``payload`` stands for, in its original dtype and shape."""
        if payload.codec != self.name:
            raise ValueError(f"a {self.name!r} compressor cannot decompress a {payload.codec!r} payload; "
                             "use lowcomm.compressors.decompress(payload), which picks the codec")
        return self.decompress_payload(payload)

    @classmethod
    @abstractmethod
    def decompress_payload(cls, payload: Payload) -> torch.Tensor:
        """Decompress using the options stored in the payload."""

    @abstractmethod
    def options(self) -> dict:
        """The constructor options, as `get_compressor` takes them."""

    def wire_options(self, numel: int) -> dict:
        """The options a payload of ``numel`` values carries."""
        return self.options()

    @classmethod
    @abstractmethod
    def check_options(cls, options: dict, numel: int) -> None:
        """Raise `WireFormatError` unless ``options`` can describe ``numel`` values."""

    @classmethod
    @abstractmethod
    def buffer_spec(cls, options: dict, numel: int) -> dict[str, tuple[str, int]]:
        """Exact buffers of a payload: name -> (wire dtype name, element count)."""

    @classmethod
    def check_buffers(cls, payload: Payload) -> None:
        """Content checks (finite values, indices in range); sizes are already right."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.options().items())
        return f"get_compressor({self.name!r}{', ' if args else ''}{args})"


def register(cls: type[Compressor]) -> type[Compressor]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def codec_names() -> list[str]:
    """Names of every registered codec."""
    return sorted(_REGISTRY)


def codec_class(name: str) -> type[Compressor]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise WireFormatError(f"unknown codec {name!r}; known codecs: {', '.join(codec_names())}") from None


def get_compressor(name: str, **options) -> Compressor:
    """A compressor by name, e.g. ``get_compressor("topk", density=0.01)``.

    Raises ``ValueError`` for an unknown name or an option the codec does not take.
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown compressor {name!r}; choose one of: {', '.join(codec_names())}")
    try:
        return _REGISTRY[name](**options)
    except TypeError as e:
        raise ValueError(f"bad options for compressor {name!r}: {e}") from None


def decompress(payload: Payload) -> torch.Tensor:
    """Decompress with the codec the payload names (its options come with it)."""
    return codec_class(payload.codec).decompress_payload(payload)


def decompress_into(payload: Payload, out: torch.Tensor) -> None:
    """Write the values ``payload`` stands for into ``out`` (a tensor of ``payload.numel``
    values, any shape), converting to ``out``'s dtype: no intermediate tensor where the
    codec allows it (``none``, ``fp16``, ``bf16``)."""
    if out.numel() != payload.numel or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous tensor of {payload.numel} values, got {out.numel()} values "
                         f"(contiguous: {out.is_contiguous()})")
    codec_class(payload.codec).decompress_payload_into(payload, out.view(-1))


def flat_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous 1-D fp32 tensor (no copy when it already is one)."""
    if x.dtype not in FLOAT_DTYPES.values():
        raise TypeError(f"compressors take float32, float16 or bfloat16 tensors, got {x.dtype}")
    return x.detach().reshape(-1).to(torch.float32).contiguous()


def restore(flat: torch.Tensor, payload: Payload) -> torch.Tensor:
    """Reshape a decoded fp32 vector to the payload's shape and dtype."""
    return flat.to(FLOAT_DTYPES[payload.dtype]).reshape(payload.shape)


def new_payload(codec: str, options: dict, x: torch.Tensor, **buffers: torch.Tensor) -> Payload:
    return Payload(codec, options, dtype_name(x.dtype), tuple(x.shape), buffers)


def require_int(options: dict, key: str, lo: int, hi: int) -> int:
    """Check that ``options[key]`` is an int in [lo, hi] and return it."""
    v = options.get(key)
    if type(v) is not int or not lo <= v <= hi:
        raise WireFormatError(f"option {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def require_choice(options: dict, key: str, choices: tuple[str, ...]) -> str:
    v = options.get(key)
    if v not in choices:
        raise WireFormatError(f"option {key!r} must be one of {choices}, got {v!r}")
    return v


def require_keys(options: dict, keys: set[str]) -> None:
    if set(options) != keys:
        raise WireFormatError(f"codec options must have exactly the keys {sorted(keys)}, got {sorted(options)}")


def require_finite(name: str, t: torch.Tensor) -> None:
    if t.numel() and not torch.isfinite(torch.stack(torch.aminmax(t))).all():  # one pass, no mask; NaN propagates
        raise WireFormatError(f"buffer {name!r} holds non-finite values (NaN or inf)")
