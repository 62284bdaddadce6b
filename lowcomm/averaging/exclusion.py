"""Leaving out members that are outliers round after round.

A robust reducer (`lowcomm.averaging.reduce`) flags the members it trimmed or
clipped as outliers, or whose claimed weight it capped. One flag proves
little (an honest member with unlucky data can be far from the others once);
a member flagged in ``after`` consecutive rounds it took part in is left out
of groups for ``cooldown`` rounds, then given another chance. Rounds are
counted per node: every `observe` call is one.
"""

from __future__ import annotations

from typing import Sequence


class Exclusions:
    """Consecutive outlier flags per member and the members left out now."""

    def __init__(self, after: int = 3, cooldown: int = 20):
        if type(after) is not int or after < 1:
            raise ValueError(f"after must be a positive integer (rounds), got {after!r}")
        if type(cooldown) is not int or cooldown < 1:
            raise ValueError(f"cooldown must be a positive integer (rounds), got {cooldown!r}")
        self.after, self.cooldown = after, cooldown
        self.rounds = 0
        self._streak: dict[str, int] = {}
        self._until: dict[str, int] = {}  # member -> the round count at which it may take part again

    def observe(self, group: Sequence[str], outliers: Sequence[str], me: str) -> list[str]:
        """Count one round of ``group`` (``me`` never judges itself); returns the
        members excluded by this round (sorted)."""
        self.rounds += 1
        flagged, newly = set(outliers), []
        for peer in group:
            if peer == me:
                continue
            self._streak[peer] = self._streak.get(peer, 0) + 1 if peer in flagged else 0
            if self._streak[peer] >= self.after and not self.is_excluded(peer):
                self._until[peer] = self.rounds + self.cooldown
                self._streak[peer] = 0
                newly.append(peer)
        return sorted(newly)

    def is_excluded(self, peer: str) -> bool:
        return self._until.get(peer, 0) > self.rounds

    def excluded(self) -> list[str]:
        """The members left out now, sorted."""
        return sorted(p for p in self._until if self.is_excluded(p))
