"""Reducers: how the contributions of one group (or one shard of it) become one vector.

    reducer = get_reducer("norm_clip+trimmed_mean")    # a swarm setting every member shares
    out = reducer.reduce({"peer-a": (1.0, values_a), "peer-b": (1.0, values_b), ...})
    out.value, out.outliers                            # fp32 vector, peers flagged this call

``mean`` (the weighted mean) is the default, for swarms of trusted peers. The
robust rules (``trimmed_mean``, ``median``, ``centered_clip``, and ``norm_clip+``
before any rule) bound what a few hostile members can do to the result, for
swarms open to strangers.

What every reducer does, in this order:

1. Weights. A claimed weight that is not finite or not positive counts as 0
   and drops that member. The others are capped at ``WEIGHT_CAP`` times their
   median claimed weight (dropped members do not count), so no member buys the
   mean with a weight of 1e6.
   ``mean`` uses the capped weights; the robust rules are unweighted over the
   members left (a weight cannot move a median or a trimmed mean).
2. The rule, over the members in sorted peer-id order, with fixed-order sums
   (`_sum_rows`, `_row_norms`) instead of torch's reductions, whose order
   depends on the thread count and the CPU: every member of a group computes
   bitwise-identical results from the same inputs, on any machine.
3. Outliers (every rule but ``mean``, which does not judge): a member whose
   distance ``||x_i - value||`` exceeds ``OUTLIER_FACTOR`` times the median of
   those distances, a member whose weight was capped, and (``norm_clip+``) a
   member whose norm was clipped. A group of fewer than 3 flags nothing:
   with 2 members nothing can be told apart (no cap or clip can trigger either).

Values are trusted to be finite (decoding rejects non-finite payloads).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from statistics import median
from typing import ClassVar, Iterable, Sequence

import torch

from lowcomm.averaging import weighted_mean

#: A claimed weight is capped at this times the group's median claimed weight.
WEIGHT_CAP = 2.0
#: A member farther than this times the median distance from the result is an outlier.
OUTLIER_FACTOR = 3.0
#: ``norm_clip+`` scales a contribution down to this times the group's median L2 norm.
NORM_CLIP_FACTOR = 2.0
#: Iterations of centered clipping (L in Karimireddy et al. 2021).
CLIP_ITERATIONS = 3

_REGISTRY: dict[str, type[Reducer]] = {}


class EmptyGroupError(ValueError):
    """No member of the group has a positive, finite weight: there is nothing to reduce."""


@dataclass
class Reduced:
    """One reduction: the fp32 ``value`` and the peers flagged as ``outliers`` (sorted)."""

    value: torch.Tensor
    outliers: list[str] = field(default_factory=list)


@dataclass
class Contributions:
    """The members that count in one reduction, in sorted peer-id order, weights capped.

    ``capped`` names the members whose claimed weight was cut to the cap.
    """

    peers: list[str]
    weights: list[float]
    values: list[torch.Tensor]
    capped: list[str]

    def replace(self, values: list[torch.Tensor]) -> Contributions:
        return Contributions(self.peers, self.weights, values, self.capped)


def contributions(parts: dict[str, tuple[float, torch.Tensor]]) -> Contributions:
    """Check ``parts`` (peer id -> (claimed weight, 1-D fp32 values)), drop members
    whose weight is not finite and positive, and cap the rest at ``WEIGHT_CAP``
    times their median weight."""
    if not parts:
        raise EmptyGroupError("no contributions to reduce")
    numel = None
    peers, weights, values = [], [], []
    for peer in sorted(parts):
        w, v = parts[peer]
        if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.dim() != 1:
            raise ValueError(f"peer {peer!r}: values must be a 1-D float32 tensor, got "
                             f"{getattr(v, 'dtype', type(v).__name__)} of shape {tuple(getattr(v, 'shape', ()))}")
        if numel is None:
            numel = v.numel()
        elif v.numel() != numel:
            raise ValueError(f"peer {peer!r} sent {v.numel()} values, the first peer {numel}: a group reduces "
                             "vectors of one length")
        w = float(w)
        if math.isfinite(w) and w > 0:
            peers.append(peer)
            weights.append(w)
            values.append(v)
    if not peers:
        raise EmptyGroupError(f"no member has a positive finite weight (peers {sorted(parts)})")
    cap = WEIGHT_CAP * median(weights)
    capped = [p for p, w in zip(peers, weights) if w > cap]
    return Contributions(peers, [min(w, cap) for w in weights], values, capped)


def _sum_rows(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of ``rows`` (tensors of one shape), added one after another in order."""
    acc = rows[0].clone()
    for row in rows[1:]:
        acc.add_(row)
    return acc


def _row_norms(x: torch.Tensor, overwrite: bool = False) -> list[float]:
    """The L2 norm of each row of ``x`` (n, numel), summed pairwise in a fixed order:
    the same bits on every machine and thread count (torch's sum does not promise that).
    ``overwrite``: ``x`` is scratch, square it in place (saves a copy)."""
    sq = x.square_() if overwrite else x.square()  # (n, numel), ours to overwrite
    length = sq.shape[1]
    while length > 1:
        keep = length - length // 2
        sq[:, :length - keep] += sq[:, keep:length]
        length = keep
    if length == 0:
        return [0.0] * x.shape[0]
    return sq[:, 0].sqrt().tolist()


def _middle(values: list[torch.Tensor], f: int) -> list[torch.Tensor]:
    """Per coordinate, the values of ``values`` (n rows) less the f smallest and the
    f largest: n - 2f rows (new tensors), in an order fixed by the network, not sorted.

    A selection network of min/max exchanges: pass k moves the smallest of rows
    k..n-1-k to row k and the largest to row n-1-k. It costs about 2 f n
    elementwise passes, less than a sort for the small groups averaging uses, and
    min/max are exact, so the same inputs give the same rows on every machine
    (up to the sign of a zero, which `_sum_rows` callers normalise by adding 0)."""
    rows = [v.clone() for v in values]
    n = len(rows)
    spare = torch.empty_like(rows[0])
    for k in range(f):
        for i in range(k + 1, n - k):            # smallest of rows k.. to row k
            torch.maximum(rows[k], rows[i], out=spare)
            torch.minimum(rows[k], rows[i], out=rows[k])
            rows[i], spare = spare, rows[i]
        for i in range(k + 1, n - 1 - k):        # largest of rows k+1.. to row n-1-k
            torch.minimum(rows[n - 1 - k], rows[i], out=spare)
            torch.maximum(rows[n - 1 - k], rows[i], out=rows[n - 1 - k])
            rows[i], spare = spare, rows[i]
    return rows[f:n - f]


def _coordinate_median(values: list[torch.Tensor]) -> torch.Tensor:
    """Per coordinate median of ``values`` (n rows); for even n ``0.5 * (a + b)``
    of the two middle values, in fp32."""
    n = len(values)
    mid = _middle(values, (n - 1) // 2)
    if n % 2:
        return mid[0].add_(0.0)
    return mid[0].add_(mid[1]).mul_(0.5).add_(0.0)


def _distances(values: list[torch.Tensor], centre: torch.Tensor) -> list[float]:
    """``||x_i - centre||`` for each row, with `_row_norms`' fixed summation order."""
    scratch = torch.empty_like(centre)
    return [_row_norms(torch.sub(v, centre, out=scratch).unsqueeze(0), overwrite=True)[0] for v in values]


def _judge(c: Contributions, distances: list[float] | None, also: Iterable[str] = ()) -> list[str]:
    """Outliers: capped members, ``also``, and (given ``distances`` from the result)
    members farther than ``OUTLIER_FACTOR`` times the median distance. Nothing in a
    group of fewer than 3."""
    if len(c.peers) < 3:
        return []
    flagged = set(c.capped) | set(also)
    if distances is not None:
        bound = OUTLIER_FACTOR * median(distances)
        flagged |= {p for p, d in zip(c.peers, distances) if d > bound}
    return sorted(flagged)


class Reducer(ABC):
    """Combines the contributions of one group into one fp32 vector.

    Subclasses set ``name`` (the registry key) and implement `combine`, which gets
    the members already checked, sorted and weight-capped (`contributions`), at
    least 2 of them, and must be deterministic: bitwise-identical on every member.
    """

    name: ClassVar[str]

    def reduce(self, parts: dict[str, tuple[float, torch.Tensor]]) -> Reduced:
        """Reduce ``parts`` (peer id -> (claimed weight, 1-D fp32 values), one length).

        Raises `EmptyGroupError` when no weight is positive and finite, ``ValueError``
        for values that are not 1-D fp32 vectors of one length. A lone member's
        values come back as they are (a copy)."""
        c = contributions(parts)
        if len(c.peers) == 1:
            return Reduced(c.values[0].clone(), [])
        return self.combine(c)

    @abstractmethod
    def combine(self, c: Contributions) -> Reduced:
        """The rule, on 2 or more members."""

    @property
    def spec(self) -> str:
        """What `get_reducer` takes to build this reducer again."""
        return self.name

    def __repr__(self) -> str:
        return f"get_reducer({self.spec!r})"


def register(cls: type[Reducer]) -> type[Reducer]:
    """Class decorator: make ``cls`` available under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def reducer_names() -> list[str]:
    """Names of every registered reducer (``norm_clip`` combines with the others)."""
    return sorted(_REGISTRY)


def get_reducer(spec: str) -> Reducer:
    """A reducer by name, e.g. ``"trimmed_mean"``, or ``"norm_clip+<name>"`` to clip
    norms first (``"norm_clip"`` alone: ``"norm_clip+mean"``)."""
    names = [n.strip() for n in spec.split("+")]
    if len(names) == 2 and names[0] == NormClip.name and names[1] in _REGISTRY and names[1] != NormClip.name:
        return NormClip(_REGISTRY[names[1]]())
    if len(names) == 1 and names[0] in _REGISTRY:
        return _REGISTRY[names[0]]()
    rules = [n for n in reducer_names() if n != NormClip.name]
    raise ValueError(f"unknown reducer {spec!r}; choose one of: {', '.join(reducer_names())}, "
                     f"or {NormClip.name}+<rule> with <rule> one of: {', '.join(rules)}")


@register
class Mean(Reducer):
    """The weighted mean ``sum_i w_i x_i / sum_i w_i`` with capped weights
    (`lowcomm.averaging.weighted_mean`, bit for bit). Flags no one: mean does not judge."""

    name = "mean"

    def combine(self, c: Contributions) -> Reduced:
        return Reduced(weighted_mean(zip(c.weights, c.values)), [])


def trim_count(n: int) -> int:
    """Values dropped at each end per coordinate by ``trimmed_mean`` of n members:
    ``max(1, n // 4)`` for n >= 3 (4 members trim 1 each side, 8 trim 2); 0 for
    n <= 2, where nothing can be told apart."""
    return max(1, n // 4) if n >= 3 else 0


@register
class TrimmedMean(Reducer):
    """Per coordinate, drop the f largest and f smallest values (f = `trim_count`)
    and take the unweighted mean of the rest (Yin et al. 2018, "Byzantine-robust
    distributed learning: towards optimal statistical rates"). Bounds the effect
    of up to f hostile members on every coordinate."""

    name = "trimmed_mean"

    def combine(self, c: Contributions) -> Reduced:
        n = len(c.values)
        f = trim_count(n)
        value = _sum_rows(_middle(c.values, f)).div_(n - 2 * f).add_(0.0)
        return Reduced(value, _judge(c, _distances(c.values, value)))


@register
class Median(Reducer):
    """The unweighted coordinate-wise median (for even n the mean of the two middle
    values, ``0.5 * (a + b)`` in fp32). Robust to fewer than half hostile members."""

    name = "median"

    def combine(self, c: Contributions) -> Reduced:
        value = _coordinate_median(c.values)
        return Reduced(value, _judge(c, _distances(c.values, value)))


@register
class CenteredClip(Reducer):
    """Centered clipping (Karimireddy, He and Jaggi 2021, "Learning from history for
    Byzantine robust optimization"), per shard as BTARD's ButterflyClip (Gorbunov
    et al. 2022). Unweighted:

        v = coordinate-wise median of x_1..x_n
        tau = median_i ||x_i - v||                 (once, from the median start)
        repeat CLIP_ITERATIONS (3) times:
            v = v + (1/n) sum_i (x_i - v) * min(1, tau / ||x_i - v||)

    The paper leaves tau to the user; the median distance from the median start is
    scale-free and lets at least half the members (the closest) move v unclipped.
    A member at distance 0 contributes 0 (no division by zero); tau = 0 (most
    members equal the median) keeps the median.
    """

    name = "centered_clip"

    def combine(self, c: Contributions) -> Reduced:
        n = len(c.values)
        v = _coordinate_median(c.values)
        distances = _distances(c.values, v)
        tau = median(distances)
        step, scratch = torch.empty_like(v), torch.empty_like(v)
        for _ in range(CLIP_ITERATIONS):
            # v += (1/n) sum_i (x_i - v) min(1, tau / d_i), members added in peer order; d = 0 keeps 1
            step.zero_()
            for x, d in zip(c.values, distances):
                torch.sub(x, v, out=scratch)
                if d > tau:
                    scratch.mul_(tau / d)  # a separate product: no fused multiply-add on some CPUs only
                step.add_(scratch)
            v = v.add_(step.div_(n)).add_(0.0)
            distances = _distances(c.values, v)
        return Reduced(v, _judge(c, distances))


@register
class NormClip(Reducer):
    """Before ``then`` (another reducer, ``mean`` by default): scale each contribution
    whose L2 norm exceeds ``NORM_CLIP_FACTOR`` (2) times the group's median norm down
    to that bound, and flag it. A member cannot then weigh more than about twice a
    typical one. A median norm of 0 (most members send zeros) clips every non-zero
    contribution to zero. Outliers: the clipped, the capped and those of ``then``."""

    name = "norm_clip"

    def __init__(self, then: Reducer | None = None):
        if isinstance(then, NormClip):
            raise ValueError("norm_clip takes a rule to apply after it, not another norm_clip")
        self.then = then if then is not None else Mean()

    @property
    def spec(self) -> str:
        return f"{self.name}+{self.then.spec}"

    def combine(self, c: Contributions) -> Reduced:
        norms = [_row_norms(v.unsqueeze(0))[0] for v in c.values]
        bound = NORM_CLIP_FACTOR * median(norms)
        clipped = [p for p, d in zip(c.peers, norms) if d > bound]
        values = [v * (bound / d) if d > bound else v for v, d in zip(c.values, norms)]
        out = self.then.combine(c.replace(values))
        return Reduced(out.value, _judge(c, None, [*clipped, *out.outliers]))
