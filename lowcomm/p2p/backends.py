"""Transports by name, imported only when chosen.

hivemind and py-libp2p cannot be imported into one Python process (both
register the protobuf symbol ``crypto.pb.KeyType``), so a backend module is
imported the first time it is asked for, and asking for the other one in the
same process raises `BackendConflict` with that explanation.
"""

from __future__ import annotations

import sys

BACKENDS = ("hivemind", "libp2p")


class BackendConflict(RuntimeError):
    """A backend cannot be loaded here: the other one is already loaded in this
    process, or its package is not installed."""


def _loaded(backend: str) -> bool:
    return ("hivemind" if backend == "hivemind" else "libp2p") in sys.modules


def make_transport(backend: str, *, initial_peers: list[str], listen: list[str], announce: list[str],
                   identity_path: str | None):
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    other = BACKENDS[1 - BACKENDS.index(backend)]
    if _loaded(other):
        raise BackendConflict(f"the {other} backend is already loaded in this process; hivemind and libp2p "
                              f"cannot share one Python process (both register the protobuf symbol "
                              f"crypto.pb.KeyType). Run the {backend} node in a separate process.")
    if backend == "hivemind":
        from lowcomm.p2p.hivemind_transport import HivemindTransport

        return HivemindTransport(initial_peers=initial_peers, listen=listen, announce=announce,
                                 identity_path=identity_path)
    try:
        from lowcomm.p2p.libp2p_transport import Libp2pTransport
    except ModuleNotFoundError as e:
        raise BackendConflict(f"the libp2p backend needs py-libp2p ({e.name} is missing): "
                              "pip install 'lowcomm[libp2p]'") from None

    return Libp2pTransport(initial_peers=initial_peers, listen=listen, announce=announce,
                           identity_path=identity_path)
