"""Codecs that shrink tensors for the wire, error feedback, and the wire format.

    from lowcomm.compressors import get_compressor, ErrorFeedback, encode, decode
    c = get_compressor("sign", block_size=4096)   # or "topk", density=0.01 ...
    payload = c.compress(x)
    blob = encode(payload)                         # bytes (encode_segments: views, no copy)
    y = c.decompress(decode(blob))                 # same shape and dtype as x

Depends on torch, numpy and msgpack only.
"""

from lowcomm.compressors import blockwise, cast, sparse  # noqa: F401  (registers the codecs)
from lowcomm.compressors.base import Compressor, codec_names, decompress, decompress_into, get_compressor
from lowcomm.compressors.errors import WireFormatError
from lowcomm.compressors.feedback import EF21, ErrorFeedback
from lowcomm.compressors.payload import Payload
from lowcomm.compressors.wire import (
    MAX_BLOB_BYTES, WIRE_VERSION, Buffer, decode, encode, encode_segments, wire_size,
)

__all__ = [
    "Buffer", "Compressor", "EF21", "ErrorFeedback", "MAX_BLOB_BYTES", "Payload", "WIRE_VERSION", "WireFormatError",
    "codec_names", "decode", "decompress", "decompress_into", "encode", "encode_segments", "get_compressor", "wire_size",
]
