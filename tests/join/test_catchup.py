"""The catch-up policy: which rounds leave a node out of sync."""

from lowcomm.join.catchup import out_of_sync, take_at_start
from lowcomm.optimizers import Stats


def test_out_of_sync_after_a_round_not_averaged_or_averaged_alone_among_others():
    averaged = Stats(outer_rounds=5, rounds_not_averaged=1, last_group_size=3)
    assert not out_of_sync(averaged, not_averaged_before=1, members=3)
    assert out_of_sync(averaged, not_averaged_before=0, members=3)          # this round was not averaged
    alone = Stats(outer_rounds=5, rounds_not_averaged=1, last_group_size=1)
    assert out_of_sync(alone, not_averaged_before=1, members=2)             # alone while another is live
    assert not out_of_sync(alone, not_averaged_before=1, members=1)         # alone in the swarm: in sync


def test_a_starting_node_takes_the_swarms_state_unless_the_peer_is_behind():
    assert take_at_start(peer_step=120, checkpoint_step=None)   # no checkpoint
    assert take_at_start(peer_step=150, checkpoint_step=100)    # the swarm went on
    # stopped in the round that ended at step 150: the checkpoint holds this node's own,
    # unaveraged global weights at step 150, the swarm averaged that round to 150
    assert take_at_start(peer_step=150, checkpoint_step=150)
    assert not take_at_start(peer_step=100, checkpoint_step=150)  # a peer further behind
