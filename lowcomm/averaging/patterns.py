"""The group exchange patterns as plain plans: who sends what in each phase,
and the bytes each member moves. The simulator (`lowcomm.sim.exchange`), the
real swarm (`lowcomm.p2p.exchange`) and `lowcomm plan` take shards, backup
reducers and byte counts from here, so the three agree by construction.

- **butterfly** (dense codecs), two phases. The flat vector is cut into one
  shard per member (`shard_bounds`). Phase 1 (reduce-scatter): member i sends
  its shard j to member j. Phase 2 (all-gather): member j sends the reduced
  shard j to every other member. A shard whose reducer fails is reduced by
  `backup_reducer(j, n)` instead.
- **all-gather** (sparse codecs), one phase: every member sends its whole
  payload to every other member, and each reduces the gathered set.

Sizes are wire bytes (`len(encode(payload))` or `wire_size`).
"""

from __future__ import annotations

from typing import Sequence

from lowcomm.averaging import shard_bounds

__all__ = ["allgather_phases", "backup_reducer", "butterfly_phases", "shard_bounds"]

Phase = tuple[int, int]  # (bytes sent, bytes received) by one member


def butterfly_phases(part_sizes: Sequence[Sequence[int]], mean_sizes: Sequence[int], member: int) -> list[Phase]:
    """Member ``member``'s two butterfly phases. ``part_sizes[i][j]``: bytes of
    member i's shard j; ``mean_sizes[j]``: bytes of the reduced shard j."""
    n = len(mean_sizes)
    others = [j for j in range(n) if j != member]
    reduce_scatter = (sum(part_sizes[member][j] for j in others), sum(part_sizes[j][member] for j in others))
    all_gather = ((n - 1) * mean_sizes[member], sum(mean_sizes[j] for j in others))
    return [reduce_scatter, all_gather]


def allgather_phases(sizes: Sequence[int], member: int) -> list[Phase]:
    """Member ``member``'s one all-gather phase; ``sizes[i]``: bytes of member i's payload."""
    n = len(sizes)
    return [((n - 1) * sizes[member], sum(sizes) - sizes[member])]


def backup_reducer(shard: int, n: int) -> int:
    """The member that reduces ``shard`` when its own reducer fails."""
    return (shard + 1) % n
