"""Dense casts: ``none`` (fp32, exact), ``fp16`` and ``bf16`` (torch's rounding)."""

from __future__ import annotations

import torch

from lowcomm.compressors.base import (
    Compressor, flat_fp32, new_payload, register, require_finite, require_keys,
)
from lowcomm.compressors.payload import BUFFER_DTYPES, FLOAT_DTYPES, Payload


class _Cast(Compressor):
    wire_dtype: str

    def compress(self, x: torch.Tensor) -> Payload:
        payload = self.compress_owned(x)
        values = payload.buffers["values"]
        if values.data_ptr() == x.data_ptr():
            payload.buffers["values"] = values.clone()  # a payload never aliases the caller's tensor
        return payload

    def compress_owned(self, x: torch.Tensor) -> Payload:
        wire = BUFFER_DTYPES[self.wire_dtype]
        values = x.detach().reshape(-1)
        if values.dtype not in FLOAT_DTYPES.values():
            values = flat_fp32(values)  # raises the dtype error
        return new_payload(self.name, {}, x, values=values.to(wire).contiguous())

    @classmethod
    def decompress_payload(cls, payload: Payload) -> torch.Tensor:
        values = payload.buffers["values"].to(FLOAT_DTYPES[payload.dtype], copy=True)
        return values.reshape(payload.shape)  # a fresh tensor: never aliases the payload

    @classmethod
    def decompress_payload_into(cls, payload: Payload, out: torch.Tensor) -> None:
        out.copy_(payload.buffers["values"])

    def options(self) -> dict:
        return {}

    @classmethod
    def check_options(cls, options: dict, numel: int) -> None:
        require_keys(options, set())

    @classmethod
    def buffer_spec(cls, options: dict, numel: int) -> dict[str, tuple[str, int]]:
        return {"values": (cls.wire_dtype, numel)}

    @classmethod
    def check_buffers(cls, payload: Payload) -> None:
        require_finite("values", payload.buffers["values"])


@register
class NoCompression(_Cast):
    """fp32 on the wire: 32 bits per value, exact."""

    name = "none"
    wire_dtype = "float32"
    exact = True


@register
class Float16(_Cast):
    """IEEE half precision: 16 bits per value, equal to ``x.half()``."""

    name = "fp16"
    wire_dtype = "float16"


@register
class BFloat16(_Cast):
    """bfloat16: 16 bits per value, equal to ``x.bfloat16()``; fp32's range."""

    name = "bf16"
    wire_dtype = "bfloat16"


__all__ = ["NoCompression", "Float16", "BFloat16"]
