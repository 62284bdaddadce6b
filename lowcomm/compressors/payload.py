"""The in-memory form of a compressed tensor, before it is turned into bytes."""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import torch

#: Tensor dtypes a codec accepts as input and restores on decompression.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: Buffer dtypes that may appear on the wire (always little-endian there).
BUFFER_DTYPES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype (``torch.float32`` -> ``"float32"``)."""
    return str(dtype).removeprefix("torch.")


@dataclass
class Payload:
    """A compressed tensor: codec name and options, the original dtype and shape,
    and named 1-D buffers. `encode` turns it into bytes, `decode` back.

    ``options`` holds exactly what the decoder needs (block size, k, seed ...);
    ``buffers`` maps names to contiguous 1-D tensors whose dtypes are in
    `BUFFER_DTYPES`.
    """

    codec: str
    options: dict
    dtype: str
    shape: tuple[int, ...]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of raw buffer data (the wire size is this plus a small header)."""
        return sum(b.numel() * b.element_size() for b in self.buffers.values())
