"""Typed errors raised by the codecs and the wire format."""


class WireFormatError(ValueError):
    """A payload or blob is malformed, inconsistent, or not supported.

    Raised by `decode` (and payload validation) for anything a peer could send
    wrong: truncated bytes, unknown codec or version, buffer sizes that do not
    match the shape, indices out of range, non-finite values, oversize blobs.
    The receiver should drop the payload (and the peer, for that round).
    """
