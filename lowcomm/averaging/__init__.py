"""The Averager seam: the one call an outer optimizer makes to "the network".

    handle = averager.average(key, tensors, round=r, group_size=None, weight=1.0,
                              compressor=ErrorFeedback(get_compressor("fp4")))
    result = handle.result(timeout)   # AverageResult: tensors, who took part, bytes

`average` returns at once; the exchange runs in the background. A round that
cannot complete (peers late or gone past the deadline) returns the caller's own
tensors with ``averaged=False``; it never hangs. Implementations:
`lowcomm.sim.LocalSwarm` (in-process) and `lowcomm.p2p` (real peers).

This module also holds what every implementation must agree on, so that peers
derive the same groups without a coordinator: `group_seed` and `draw_groups`,
plus the flattening and sharding of the tensors of one call.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable, Protocol, Sequence, Union

import torch

from lowcomm.compressors import Compressor, ErrorFeedback

#: What a caller may pass as ``compressor``: nothing (fp32 on the wire), a codec,
#: or a codec wrapped in error feedback (residuals kept under the call's key).
Compression = Union[Compressor, ErrorFeedback, None]


@dataclass
class AverageResult:
    """The outcome of one `Averager.average` call, as seen by one peer.

    ``tensors`` are the weighted group mean, or the caller's own tensors when
    ``averaged`` is False. ``sent`` is what the caller's own contribution
    decompressed to (what entered the mean; error feedback uses it), or None
    when nothing was sent. ``phases`` lists (bytes sent, bytes received) for
    each sequential message phase of the exchange, for network models.
    ``shards_averaged`` (real swarm, butterfly) says which of the group's
    shards hold a mean of several members (False: the local values, or a
    reducer's mean of its own part alone). ``diverged`` lists the shards
    (butterfly: indices into ``shards_averaged``; all-gather: ``[0]``, the
    whole vector) whose values here may differ from what the group's other
    live members hold: a mean that reached some members but not this one, or
    this one's mean that reached no one. Such a peer is out of step with its
    group however many shards were averaged; it should take a peer's state.
    ``outliers`` are the members the reducer flagged (a robust rule trimmed or
    clipped them, or capped their weight), sorted.
    """

    tensors: list[torch.Tensor]
    averaged: bool
    participants: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    phases: list[tuple[int, int]] = field(default_factory=list)
    sent: list[torch.Tensor] | None = None
    reason: str = ""
    shards_averaged: list[bool] = field(default_factory=list)
    outliers: list[str] = field(default_factory=list)
    diverged: list[int] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        return len(self.participants)


class AverageHandle(Protocol):
    def done(self) -> bool:
        """True once `result` would return without waiting."""

    def result(self, timeout: float | None = None) -> AverageResult:
        """Wait up to ``timeout`` seconds (None: the averager's deadline)."""


class Averager(Protocol):
    peer_id: str

    def average(self, key: str, tensors: Sequence[torch.Tensor], *, round: int, group_size: int | None = None,
                weight: float = 1.0, compressor: Compression = None) -> AverageHandle:
        """Start averaging ``tensors`` with the peers ready for ``(key, round)``."""


class DoneHandle:
    """A handle whose result is already known."""

    def __init__(self, result: AverageResult):
        self._result = result

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None) -> AverageResult:
        return self._result


def check_group_size(group_size: int | None) -> None:
    if group_size is not None and (type(group_size) is not int or group_size < 2):
        raise ValueError(f"group_size must be None (everyone) or an integer >= 2, got {group_size!r}")


def group_seed(run_id: str, key: str, round: int) -> bytes:
    """The seed every member derives for ``(run, key, round)``."""
    return hashlib.blake2b(f"{run_id}\x00{key}\x00{round}".encode(), digest_size=16).digest()


def draw_groups(members: Sequence[str], seed: bytes, group_size: int | None) -> list[list[str]]:
    """Split ``members`` into groups, identically on every peer.

    ``None``: one group of everyone. ``k``: members are shuffled by a hash of
    (seed, member) and cut into groups of k; a short last group (fewer than k)
    joins the group before it, so sizes lie in [k, 2k-1] and an odd count of
    gossip pairs gives one group of 3. A lone member forms a group of one.
    Each group is listed in sorted order.
    """
    check_group_size(group_size)
    ordered = sorted(set(members))
    if group_size is None or len(ordered) <= group_size:
        return [ordered] if ordered else []
    shuffled = sorted(ordered, key=lambda m: hashlib.blake2b(seed + m.encode(), digest_size=8).digest())
    groups = [shuffled[i:i + group_size] for i in range(0, len(shuffled), group_size)]
    if len(groups[-1]) < group_size:
        groups[-2].extend(groups.pop())
    return [sorted(g) for g in groups]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One fp32 vector in CPU memory holding every tensor, in order (a copy): what
    codecs and transports work on, whatever device the caller trains on."""
    if not tensors:
        return torch.zeros(0)
    return torch.cat([t.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Split a `flatten`ed vector back into tensors shaped, typed and placed like
    ``like`` (views of ``vector`` where dtype and device already match)."""
    out, start = [], 0
    for t in like:
        out.append(vector[start:start + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype))
        start += t.numel()
    return out


def weighted_mean(parts: Iterable[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``sum_i w_i v_i / sum_i w_i`` in fp32, accumulated in the order given
    (the weights of those present are renormalised). Callers give the members in
    sorted peer-id order (`lowcomm.averaging.reduce`), so every member sums alike,
    bit for bit."""
    parts = list(parts)
    total = sum(w for w, _ in parts)
    acc = torch.zeros_like(parts[0][1], dtype=torch.float32)
    for w, v in parts:
        acc.add_(v, alpha=w / total)
    return acc


def shard_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal shards of ``range(numel)``, one per group member."""
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds
