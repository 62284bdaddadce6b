"""Hostile workers on LocalSwarm (DiLoCo, codeclass): what each aggregator protects.

The full matrix (4 and 8 workers, every rule and attack) is
`scripts/bench_robust.py`; these are the cells the acceptance names, at 4
workers (one at 8), 400 steps.
"""

import pytest
import torch

from lowcomm.sim.attacks import ATTACKS, HostileAverager, train_under_attack
from lowcomm.sim.swarm import LocalSwarm
from lowcomm.tasks import load_task


@pytest.fixture(scope="module")
def task():
    return load_task("codeclass")


@pytest.fixture(scope="module")
def clean(task):
    return {agg: train_under_attack(task, 4, agg, None, steps=400) for agg in ("mean", "trimmed_mean",
                                                                                "centered_clip")}


def test_robust_rules_cost_at_most_2_percent_without_an_attacker(clean):
    for agg in ("trimmed_mean", "centered_clip"):
        assert clean[agg] <= 1.02 * clean["mean"], agg


@pytest.mark.parametrize("agg,attack", [("trimmed_mean", "scale100"), ("trimmed_mean", "flip10"),
                                        ("centered_clip", "weight1e6"), ("centered_clip", "noise10"),
                                        ("trimmed_mean", "alternate")])
def test_honest_loss_stays_within_5_percent_of_the_clean_run(task, clean, agg, attack):
    assert train_under_attack(task, 4, agg, ATTACKS[attack], steps=400) <= 1.05 * clean[agg]


def test_eight_workers_two_sign_flippers_trimmed(task):
    base = train_under_attack(task, 8, "trimmed_mean", None, steps=400)
    hit = train_under_attack(task, 8, "trimmed_mean", ATTACKS["flip10"], steps=400, attackers=2)
    assert hit <= 1.05 * base


def test_the_mean_has_no_defence(task, clean):
    # the threat, recorded: one sign-flipper ruins the run, one x100 or weight-1e6 worker hurts it
    assert train_under_attack(task, 4, "mean", ATTACKS["flip10"], steps=400) > 10 * clean["mean"]
    assert train_under_attack(task, 4, "mean", ATTACKS["weight1e6"], steps=400) > 1.3 * clean["mean"]


def test_hostile_averager_changes_only_what_it_sends():
    swarm = LocalSwarm(2)
    xs = [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0])]

    def worker(rank, av):
        if rank == 1:
            av = HostileAverager(av, ATTACKS["flip10"])
        return av.average("k", [xs[rank]], round=0).result().tensors[0]

    a, b = swarm.run(worker)
    assert torch.equal(a, b) and torch.equal(a, (xs[0] - 10 * xs[1]) / 2)
