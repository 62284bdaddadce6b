"""The catch-up policy: which rounds leave a node out of sync."""

from lowcomm.join.catchup import out_of_sync
from lowcomm.optimizers import Stats


def test_out_of_sync_after_a_round_not_averaged_or_averaged_alone_among_others():
    averaged = Stats(outer_rounds=5, rounds_not_averaged=1, last_group_size=3)
    assert not out_of_sync(averaged, not_averaged_before=1, members=3)
    assert out_of_sync(averaged, not_averaged_before=0, members=3)          # this round was not averaged
    alone = Stats(outer_rounds=5, rounds_not_averaged=1, last_group_size=1)
    assert out_of_sync(alone, not_averaged_before=1, members=2)             # alone while another is live
    assert not out_of_sync(alone, not_averaged_before=1, members=1)         # alone in the swarm: in sync
