"""When a join node is out of sync with its swarm, and what it does about it.

A node is out of sync after an outer round it was left out of: a round that
was not averaged (it was late for the roster, a deadline passed), or one it
averaged alone while other members are live. Then, unless it is stopping or
alone in the swarm, it catches up: it downloads a peer's shared state (global
weights, outer optimizer state, round and step; `JoinProtocol.fetch_state`)
and adopts it. At start a node takes a peer's state only when it is further
along than the node's own checkpoint, or as far: then the swarm's state wins.

Which state, after a round: the most advanced one. The round this node
missed ends, for the swarm, at the step this node is at now; its members
publish their state once their exchange is done. So the node waits (up to
``patience`` seconds) until a member serves a state at its own step or later,
then takes the one at the highest step. A member that is itself stuck (in a
round of its own, or far behind) serves an older state: taking that one
would send this node back into a round the others have closed, to miss it
again. If no member gets that far in time, the node takes the highest step
there is, but never the step it caught up to last time: the swarm has not
finished a round since, and adopting the same state again repeats the same
missed round. Then it keeps its own state for a round and tries again after
the next one; it stays out of sync until a catch-up succeeds (a round
averaged with others on weights of its own does not bring it back in step),
and meanwhile its state offers say so: others catching up take a state of a
member in step before one of a member out of step, whatever their steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

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

    def __init__(self, opt: OuterOptimizer, swarm: Swarm, protocol: JoinProtocol, console: Console,
                 patience: float = 15.0, stopping: Callable[[], bool] = lambda: False,
                 load: Callable[[dict], None] | None = None):
        self.opt, self.swarm, self.protocol, self.console = opt, swarm, protocol, console
        #: How a fetched shared state is adopted: ``opt.load_shared_state_dict``, or for a
        #: node of several ranks a broadcast that loads it on every rank (`lowcomm.join.group`).
        self.load = load or opt.load_shared_state_dict
        #: Whether the node is stopping: a catch-up waiting for the swarm's state gives up at once.
        self.stopping = stopping
        #: Seconds a node out of sync waits for a member to serve the state of the round it missed.
        self.patience = patience
        self._not_averaged = opt.stats.rounds_not_averaged
        self.behind = False  # out of sync, and not caught up since
        self._adopted: int | None = None  # the step of the state this node caught up to last

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
        """After an outer round ended: catch up if this node is out of sync (this round
        left it out, or an earlier one did and it has not caught up since)."""
        members = len(self.swarm.known_members)
        behind = self.behind or out_of_sync(self.opt.stats, self._not_averaged, members)
        self._not_averaged = self.opt.stats.rounds_not_averaged
        self.behind = behind and members > 1  # alone in the swarm, a node is in step with it
        if self.behind and not stopping:
            fetched = self.protocol.fetch_state(at_least=self.opt.step_count, patience=self.patience,
                                                cancelled=self.stopping)
            if fetched is not None and self._adopted is not None and fetched.step <= self._adopted:
                self.console.print(f"the swarm's state is at step {fetched.step}, where I caught up last: "
                                   "keeping mine for a round", highlight=False)
            elif fetched is not None:
                self.behind = not self.catch_up(fetched)
        self.protocol.in_step = not self.behind  # what this node's state offers say from now on

    def catch_up(self, fetched: Fetched | None = None) -> bool:
        """Adopt a peer's shared state (``fetched``, or fetched now: the most advanced
        a peer serves); False if there was none to adopt."""
        fetched = fetched or self.protocol.fetch_state()
        if fetched is None:
            return False
        try:
            self.load(fetched.state)
        except (ValueError, LookupError, TypeError, AttributeError) as e:  # other shapes, or another layout
            self.console.print(f"[yellow]could not catch up from {fetched.peer[:16]}…: {escape(str(e))}[/]",
                               highlight=False)
            return False
        self._adopted = fetched.step
        self.swarm.forget_rounds()
        self.console.print(f"caught up from {fetched.peer[:16]}… at step {self.opt.step_count}", highlight=False)
        return True
