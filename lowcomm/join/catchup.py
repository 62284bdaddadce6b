"""When a join node is out of sync with its swarm, and what it does about it.

A node is out of sync after an outer round it was left out of: a round that
was not averaged (it was late for the roster, a deadline passed), or one it
averaged alone while other members are live. Then, unless it is stopping or
alone in the swarm, it catches up: it downloads a peer's shared state (global
weights, outer optimizer state, round and step; `JoinProtocol.fetch_state`)
and adopts it. At start a node takes a peer's state only when it is further
along than the node's own checkpoint, or as far: then the swarm's state wins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from lowcomm.join.protocol import Fetched, JoinProtocol
from lowcomm.optimizers import OuterOptimizer, Stats

if TYPE_CHECKING:
    from lowcomm.p2p import Swarm


def out_of_sync(stats: Stats, not_averaged_before: int, members: int) -> bool:
    """Whether the round that just ended (``stats`` after it) left this node out of
    sync: it was not averaged (``rounds_not_averaged`` rose past
    ``not_averaged_before``), or it averaged alone while ``members`` (self
    included) are live."""
    return stats.rounds_not_averaged > not_averaged_before or (stats.last_group_size < 2 and members > 1)


def take_at_start(peer_step: int, checkpoint_step: int | None) -> bool:
    """Whether a starting node adopts a peer's state at ``peer_step`` rather than
    its own checkpoint at ``checkpoint_step`` (None: no checkpoint): when the peer
    is not behind. At an equal step the swarm's state wins: a node stopped during
    a round checkpoints the global weights of a round it did not average (its
    own), while the others averaged that round to the same step; a node that was
    in step holds the same state as the peer, so adopting it changes nothing."""
    return checkpoint_step is None or peer_step >= checkpoint_step


class CatchUp:
    """The catch-up policy of one node (see the module docstring)."""

    def __init__(self, opt: OuterOptimizer, swarm: Swarm, protocol: JoinProtocol, console: Console):
        self.opt, self.swarm, self.protocol, self.console = opt, swarm, protocol, console
        self._not_averaged = opt.stats.rounds_not_averaged

    def at_start(self, checkpoint_step: int | None, have_peers: bool) -> None:
        """Before training: with bootstrap peers, wait (30 s at most) for another
        member and adopt its state unless it is behind ``checkpoint_step`` (None: no
        checkpoint; see `take_at_start`)."""
        if have_peers:
            try:
                self.swarm.wait_for_members(2, timeout=30)
            except TimeoutError:
                self.console.print("[yellow]no other member visible yet; starting on my own[/]")
            else:
                fetched = self.protocol.fetch_state()  # one download: its step decides, and it is what we load
                if fetched is not None and take_at_start(fetched.step, checkpoint_step):
                    self.catch_up(fetched)
        self._not_averaged = self.opt.stats.rounds_not_averaged

    def after_round(self, stopping: bool) -> None:
        """After an outer round ended: catch up if it left this node out of sync."""
        members = len(self.swarm.known_members)
        behind = out_of_sync(self.opt.stats, self._not_averaged, members)
        self._not_averaged = self.opt.stats.rounds_not_averaged
        if behind and members > 1 and not stopping:
            self.catch_up()

    def catch_up(self, fetched: Fetched | None = None) -> bool:
        """Adopt a peer's shared state (``fetched``, or fetched now from the first
        peer that serves one); False if there was none to adopt."""
        fetched = fetched or self.protocol.fetch_state()
        if fetched is None:
            return False
        try:
            self.opt.load_shared_state_dict(fetched.state)
        except (ValueError, LookupError, TypeError, AttributeError) as e:  # other shapes, or another layout
            self.console.print(f"[yellow]could not catch up from {fetched.peer[:16]}…: {escape(str(e))}[/]",
                               highlight=False)
            return False
        self.swarm.forget_rounds()
        self.console.print(f"caught up from {fetched.peer[:16]}… at step {self.opt.step_count}", highlight=False)
        return True
