"""Exclusions: consecutive outlier flags, cool-down, never oneself."""

import pytest

from lowcomm.averaging.exclusion import Exclusions


def test_excluded_after_k_consecutive_flags_for_the_cooldown():
    ex = Exclusions(after=3, cooldown=4)
    group = ["a", "b", "me"]
    assert ex.observe(group, ["b"], "me") == [] and ex.observe(group, ["b"], "me") == []
    assert ex.observe(group, ["b"], "me") == ["b"]            # third in a row (round 3)
    assert ex.excluded() == ["b"] and ex.is_excluded("b")
    for _ in range(3):                                      # rounds 4, 5, 6: still out
        ex.observe(["a", "me"], [], "me")
        assert ex.is_excluded("b")
    ex.observe(["a", "me"], [], "me")                       # round 7 = 3 + 4: back
    assert not ex.is_excluded("b") and ex.excluded() == []


def test_a_clean_round_resets_the_streak_and_nobody_judges_itself():
    ex = Exclusions(after=2, cooldown=10)
    assert ex.observe(["a", "me"], ["a"], "me") == []
    assert ex.observe(["a", "me"], [], "me") == []           # reset
    assert ex.observe(["a", "me"], ["a"], "me") == []
    assert ex.observe(["a", "me"], ["a", "me"], "me") == ["a"]
    for _ in range(5):
        ex.observe(["me"], ["me"], "me")
    assert ex.excluded() == ["a"]


@pytest.mark.parametrize("kw", [{"after": 0}, {"cooldown": 0}, {"after": 1.5}])
def test_bad_settings(kw):
    with pytest.raises(ValueError):
        Exclusions(**kw)
