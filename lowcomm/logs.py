"""``LOWCOMM_LOG=info`` (or ``debug``, ``warning``, ``error``): lowcomm's log lines on standard error."""

from __future__ import annotations

import logging
import os

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure_from_env() -> str | None:
    """Send lowcomm's log lines at ``$LOWCOMM_LOG``'s level to standard error.
    Returns an error message for a level that does not exist, else None."""
    level = os.environ.get("LOWCOMM_LOG", "").upper()
    if not level:
        return None
    if level not in LEVELS:
        return f"LOWCOMM_LOG must be debug, info, warning or error, got {level.lower()!r}"
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("lowcomm").setLevel(level)
    return None
