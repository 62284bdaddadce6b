"""Packing small unsigned integer codes into bytes, MSB first.

Element i of a stream of ``bits``-bit codes occupies bits [i*bits, (i+1)*bits)
of the output, counting from the most significant bit of byte 0 (the order of
``numpy.packbits``). The last byte is zero-padded. This layout is part of the
wire format and does not depend on the host's byte order.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 1-D tensor of codes in [0, 2**bits) into a uint8 tensor."""
    if bits == 8:
        return codes.to(torch.uint8)
    if bits == 4:
        c = codes.to(torch.uint8)
        if c.numel() % 2:
            c = torch.cat([c, c.new_zeros(1)])
        c = c.view(-1, 2)
        return (c[:, 0] << 4) | c[:, 1]
    if bits == 1:
        return torch.from_numpy(np.packbits(codes.to(torch.bool).numpy()))
    # generic width: expand each code to its bits, then pack them
    shifts = torch.arange(bits - 1, -1, -1, dtype=torch.int64)
    bitmat = (codes.to(torch.int64).unsqueeze(1) >> shifts) & 1
    return torch.from_numpy(np.packbits(bitmat.reshape(-1).to(torch.uint8).numpy()))


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of `pack`: ``count`` codes (uint8 for bits <= 8, else int64)."""
    if bits == 8:
        return packed[:count]
    if bits == 4:
        out = torch.stack([packed >> 4, packed & 0x0F], dim=1).reshape(-1)
        return out[:count]
    arr = np.unpackbits(packed.numpy(), count=count * bits)
    if bits == 1:
        return torch.from_numpy(arr)
    bitmat = torch.from_numpy(arr).view(count, bits).to(torch.int64)
    weights = 1 << torch.arange(bits - 1, -1, -1, dtype=torch.int64)
    return (bitmat * weights).sum(1)
