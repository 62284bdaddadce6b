"""Checking multiaddrs before handing them to a backend, with errors a person can act on."""

from __future__ import annotations

import ipaddress
import re

_WITH_VALUE = {"ip4", "ip6", "dns", "dns4", "dns6", "tcp", "udp", "p2p"}
_FLAGS = {"quic", "quic-v1", "ws", "wss"}
_BASE58 = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,100}$")


class AddressError(ValueError):
    """Not a multiaddr this node can use."""


def parse_multiaddr(text: str, need_peer_id: bool = False) -> dict[str, str]:
    """Validate ``text`` (e.g. ``/ip4/1.2.3.4/tcp/31337/p2p/12D3Koo...``) and return
    its parts by protocol name. Raises `AddressError` saying what is wrong."""
    parts = text.strip().split("/")
    if len(parts) < 2 or parts[0] != "":
        raise AddressError(f"{text!r} is not a multiaddr (they start with /ip4/, /ip6/ or /dns/)")
    out: dict[str, str] = {}
    i = 1
    while i < len(parts):
        proto = parts[i]
        if proto in _FLAGS:
            out[proto] = ""
            i += 1
            continue
        if proto not in _WITH_VALUE or i + 1 >= len(parts) or not parts[i + 1]:
            raise AddressError(f"{text!r}: unexpected {proto!r}; a multiaddr looks like /ip4/203.0.113.5/tcp/31337")
        value = parts[i + 1]
        if proto == "ip4":
            _check(lambda: ipaddress.IPv4Address(value), text, "an IPv4 address")
        elif proto == "ip6":
            _check(lambda: ipaddress.IPv6Address(value), text, "an IPv6 address")
        elif proto in ("tcp", "udp") and not (value.isdigit() and 0 <= int(value) <= 65535):
            raise AddressError(f"{text!r}: port {value!r} must be a number from 0 to 65535")
        elif proto == "p2p" and not _BASE58.match(value):
            raise AddressError(f"{text!r}: {value!r} is not a peer id")
        out[proto] = value
        i += 2
    if not ({"ip4", "ip6", "dns", "dns4", "dns6"} & set(out)):
        raise AddressError(f"{text!r} has no host part (/ip4/..., /ip6/... or /dns/...)")
    if need_peer_id and "p2p" not in out:
        raise AddressError(f"{text!r} has no /p2p/<peer id> part; copy the whole address the other node printed")
    return out


def _check(fn, text: str, what: str) -> None:
    try:
        fn()
    except ValueError:
        raise AddressError(f"{text!r} does not hold {what} where one belongs") from None
