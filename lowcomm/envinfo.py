"""What a user pastes into a bug report: versions of everything that matters."""

from __future__ import annotations

import platform
import sys
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """Versions of lowcomm, Python, the platform and every dependency (no imports
    of hivemind or libp2p: they cannot share one process)."""
    import lowcomm
    import torch

    info = {
        "lowcomm": lowcomm.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "torch threads": str(torch.get_num_threads()),
        "cuda available": str(torch.cuda.is_available()),
    }
    for dist in ("numpy", "msgpack", "safetensors", "typer", "rich", "hivemind", "libp2p", "protobuf"):
        info[dist] = _version(dist)
    return info
