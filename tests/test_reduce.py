"""Reducers of group averaging: hand-computed cases, outliers, determinism, the registry."""

import math
import random
import time

import pytest
import torch

from lowcomm.averaging import weighted_mean
from lowcomm.averaging.reduce import (CLIP_ITERATIONS, NORM_CLIP_FACTOR, OUTLIER_FACTOR, WEIGHT_CAP, EmptyGroupError,
                                      NormClip, Reduced, _row_norms, get_reducer, reducer_names, trim_count)

RULES = ["mean", "trimmed_mean", "median", "centered_clip"]
SPECS = RULES + ["norm_clip"] + [f"norm_clip+{r}" for r in RULES]


def group(rows, weights=None):
    """Peers "a", "b", ... with the given value rows and weights (default 1)."""
    weights = weights or [1.0] * len(rows)
    return {chr(ord("a") + i): (w, torch.tensor(r, dtype=torch.float32)) for i, (w, r) in enumerate(zip(weights, rows))}


# Three honest members and one attacker ("d").
HONEST_AND_ATTACKER = [[1, 10], [2, 20], [3, 30], [100, -1000]]


def test_constants_are_the_documented_ones():
    assert (WEIGHT_CAP, OUTLIER_FACTOR, NORM_CLIP_FACTOR, CLIP_ITERATIONS) == (2.0, 3.0, 2.0, 3)
    assert [trim_count(n) for n in range(1, 10)] == [0, 0, 1, 1, 1, 1, 1, 2, 2]


def test_mean_by_hand_equals_weighted_mean_and_flags_no_one():
    out = get_reducer("mean").reduce(group(HONEST_AND_ATTACKER))
    assert out.value.tolist() == [26.5, -235.0]  # (1+2+3+100)/4, (10+20+30-1000)/4
    assert out.outliers == []
    parts = {p: (w, torch.randn(100, generator=torch.Generator().manual_seed(i)))
             for i, (p, w) in enumerate(zip("dbca", [1.0, 1.5, 2.0, 0.7]))}  # cap 2 * 1.25: nothing capped
    assert torch.equal(get_reducer("mean").reduce(parts).value, weighted_mean(parts[p] for p in sorted(parts)))


def test_a_claimed_weight_of_1e6_is_capped_at_twice_the_median_weight():
    parts = group(HONEST_AND_ATTACKER, [1, 1, 1, 1e6])  # median weight 1: cap 2
    out = get_reducer("mean").reduce(parts)
    assert torch.allclose(out.value, torch.tensor([206 / 5, -1940 / 5]), rtol=1e-6)  # (1+2+3+2*100)/5, (60-2000)/5
    capped = {**parts, "d": (2.0, parts["d"][1])}
    assert torch.equal(out.value, weighted_mean(capped[p] for p in sorted(capped)))
    assert out.outliers == []  # mean does not judge, even a capped weight
    # every rule that judges flags the capped member; the robust rules ignore weights
    assert get_reducer("norm_clip+mean").reduce(group([[1, 0], [0, 1], [1, 1], [1, 1]], [1, 1, 1, 1e6])).outliers == ["d"]
    for rule in ["trimmed_mean", "median", "centered_clip"]:
        out = get_reducer(rule).reduce(group([[1.0], [2.0], [3.0], [2.5]], [1, 1, 1, 1e6]))
        assert out.outliers == ["d"]
        assert torch.equal(out.value, get_reducer(rule).reduce(group([[1.0], [2.0], [3.0], [2.5]])).value)


def test_non_positive_or_non_finite_weights_drop_the_member():
    rows = [[1.0, 2.0], [3.0, 4.0], [1e9, 1e9], [1e9, 1e9], [1e9, 1e9], [1e9, 1e9]]
    out = get_reducer("mean").reduce(group(rows, [1, 3, 0, -1, math.nan, math.inf]))
    assert out.value.tolist() == [2.5, 3.5]  # (1*1 + 3*3)/4, (1*2 + 3*4)/4: the cap is 2 * 2 = 4
    with pytest.raises(EmptyGroupError, match="positive finite weight"):
        get_reducer("median").reduce(group([[1.0]], [0.0]))
    with pytest.raises(EmptyGroupError):
        get_reducer("mean").reduce({})


def test_values_must_be_1d_fp32_of_one_length():
    with pytest.raises(ValueError, match="one length"):
        get_reducer("mean").reduce({"a": (1.0, torch.zeros(3)), "b": (1.0, torch.zeros(4))})
    with pytest.raises(ValueError, match="1-D float32"):
        get_reducer("mean").reduce({"a": (1.0, torch.zeros(3, dtype=torch.float64))})
    with pytest.raises(ValueError, match="1-D float32"):
        get_reducer("mean").reduce({"a": (1.0, torch.zeros(2, 2))})


def test_trimmed_mean_and_median_by_hand():
    # coordinate 0: drop 1 and 100 -> (2+3)/2; coordinate 1: drop -1000 and 30 -> (10+20)/2
    assert get_reducer("trimmed_mean").reduce(group(HONEST_AND_ATTACKER)).value.tolist() == [2.5, 15.0]
    assert get_reducer("median").reduce(group(HONEST_AND_ATTACKER)).value.tolist() == [2.5, 15.0]
    odd = group([[5.0, 0.0], [1.0, 9.0], [3.0, 4.0], [-7.0, 8.0], [2.0, 1.0]])
    assert get_reducer("median").reduce(odd).value.tolist() == [2.0, 4.0]
    assert get_reducer("trimmed_mean").reduce(odd).value.tolist() == pytest.approx([2.0, 13 / 3], abs=1e-6)  # (1+2+3)/3, (1+4+8)/3
    # 8 members trim 2 each side: mean of the middle 4 of 0..7 (shuffled), weights ignored
    eight = group([[float(v)] for v in [7, 0, 3, 5, 1, 6, 2, 4]], [1, 2, 3, 4, 5, 6, 7, 8])
    assert get_reducer("trimmed_mean").reduce(eight).value.tolist() == [3.5]  # (2+3+4+5)/4
    # 2 members: nothing can be told apart, the unweighted mean of both
    assert get_reducer("trimmed_mean").reduce(group([[1.0], [4.0]], [1, 3])).value.tolist() == [2.5]


def test_centered_clip_by_hand():
    # v0 = median = 1; distances 1, .5, 0, 4, 5 -> tau = 1
    # v1 = 1    + (-1   - .5  + 0   + 1 + 1)/5 = 1.1
    # v2 = 1.1  + (-1   - .6  - .1  + 1 + 1)/5 = 1.16
    # v3 = 1.16 + (-1   - .66 - .16 + 1 + 1)/5 = 1.196
    out = get_reducer("centered_clip").reduce(group([[0.0], [0.5], [1.0], [5.0], [6.0]]))
    assert out.value.item() == pytest.approx(1.196, abs=1e-6)
    assert out.outliers == ["d", "e"]  # distances 1.196, .696, .196, 3.804, 4.804 > 3 * 1.196
    # 3 members on a line: tau is the nearer neighbour's distance, the clipped steps cancel: the median stays
    assert get_reducer("centered_clip").reduce(group([[0.0], [1.0], [7.0]])).value.tolist() == [1.0]
    # a member at the median (distance 0) and tau = 0 (most members agree) keep the median
    assert get_reducer("centered_clip").reduce(group([[2.0], [2.0], [2.0], [9.0]])).value.tolist() == [2.0]


def test_norm_clip_scales_a_10x_norm_down_to_twice_the_median():
    parts = group([[3, 4], [0, 5], [5, 0], [30, 40]])  # norms 5, 5, 5, 50: median 5, bound 10
    out = get_reducer("norm_clip+mean").reduce(parts)
    assert torch.allclose(out.value, torch.tensor([3.5, 4.25]), rtol=1e-6)  # d becomes [6, 8]: (3+0+5+6)/4, (4+5+0+8)/4
    assert out.outliers == ["d"]
    assert torch.equal(get_reducer("norm_clip").reduce(parts).value, out.value)
    # then the named rule: median of [3,0,5,6] and [4,5,0,8]
    assert get_reducer("norm_clip+median").reduce(parts).value.tolist() == pytest.approx([4.0, 4.5], abs=1e-6)
    # nothing above the bound: the rule alone, nothing flagged
    calm = group([[3, 4], [0, 5], [5, 0], [6, 8]])
    assert torch.equal(get_reducer("norm_clip+mean").reduce(calm).value, get_reducer("mean").reduce(calm).value)
    assert get_reducer("norm_clip+mean").reduce(calm).outliers == []


def test_the_attacker_is_flagged_and_the_honest_members_are_not():
    for spec in ["trimmed_mean", "median", "centered_clip", "norm_clip", "norm_clip+trimmed_mean"]:
        assert get_reducer(spec).reduce(group(HONEST_AND_ATTACKER)).outliers == ["d"], spec
    cc = get_reducer("centered_clip").reduce(group(HONEST_AND_ATTACKER)).value
    assert abs(cc[0].item() - 2.5) < 2 and abs(cc[1].item() - 15) < 10  # the attacker moves it little


def test_fewer_than_3_members_flag_nothing():
    for spec in SPECS:
        assert get_reducer(spec).reduce(group([[0.0, 0.0], [1e6, -1e6]], [1, 1e6])).outliers == [], spec


def random_parts(n=6, numel=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    parts = {f"peer-{i}": (1.0 + i / 10, torch.randn(numel, generator=g)) for i in range(n)}
    parts["peer-3"] = (1e3, torch.randn(numel, generator=g) * 100)  # a hostile member: big weight, big values
    return parts


@pytest.mark.parametrize("spec", SPECS)
def test_every_reducer_is_deterministic_in_any_insertion_order(spec):
    parts = random_parts()
    keys = list(parts)
    random.Random(1).shuffle(keys)
    a = get_reducer(spec).reduce(parts)
    b = get_reducer(spec).reduce({k: parts[k] for k in keys})
    c = get_reducer(spec).reduce({k: parts[k] for k in reversed(list(parts))})
    assert torch.equal(a.value, b.value) and torch.equal(a.value, c.value)
    assert a.outliers == b.outliers == c.outliers
    assert a.value.dtype == torch.float32 and a.value.shape == (1000,)
    assert isinstance(a, Reduced) and a.outliers == sorted(a.outliers)
    if spec != "mean":
        assert "peer-3" in a.outliers


@pytest.mark.parametrize("spec", SPECS)
def test_one_member_gives_its_values_and_the_inputs_are_not_changed(spec):
    x = torch.tensor([1.5, -2.0, 0.0])
    out = get_reducer(spec).reduce({"solo": (3.0, x)})
    assert torch.equal(out.value, x) and out.value.data_ptr() != x.data_ptr() and out.outliers == []
    parts = random_parts(n=5, numel=7)
    before = {p: v.clone() for p, (_, v) in parts.items()}
    get_reducer(spec).reduce(parts)
    assert all(torch.equal(parts[p][1], before[p]) for p in parts)


def test_row_norms_match_torch_for_any_length():
    g = torch.Generator().manual_seed(0)
    for numel in [0, 1, 2, 3, 7, 1000, 4097]:
        x = torch.randn(3, numel, generator=g)
        assert torch.allclose(torch.tensor(_row_norms(x)), torch.linalg.vector_norm(x, dim=1), rtol=1e-5)


def test_registry_names_specs_and_errors():
    assert reducer_names() == ["centered_clip", "mean", "median", "norm_clip", "trimmed_mean"]
    for spec in SPECS:
        r = get_reducer(spec)
        assert get_reducer(r.spec).spec == r.spec and repr(r) == f"get_reducer({r.spec!r})"
    assert get_reducer("norm_clip").spec == "norm_clip+mean"
    assert isinstance(get_reducer("norm_clip+median"), NormClip)
    for bad in ["krum", "norm_clip+norm_clip", "mean+median", "median+norm_clip", "norm_clip+", ""]:
        with pytest.raises(ValueError, match="choose one of: centered_clip, mean, median, norm_clip, trimmed_mean"):
            get_reducer(bad)
    with pytest.raises(ValueError, match="not another norm_clip"):
        NormClip(NormClip())


def test_timing_on_4_x_6M_values():
    """Not an assertion of speed: prints each reducer's time (run with -s)."""
    g = torch.Generator().manual_seed(0)
    parts = {f"peer-{i}": (1.0, torch.randn(6_000_000, generator=g)) for i in range(4)}
    for spec in SPECS:
        start = time.perf_counter()
        out = get_reducer(spec).reduce(parts)
        print(f"reduce {spec}: 4 x 6M values, {1e3 * (time.perf_counter() - start):.0f} ms")
        assert out.value.shape == (6_000_000,)


@pytest.mark.parametrize("n", [3, 4, 5, 8, 9])
def test_the_selection_network_agrees_with_a_sort(n):
    g = torch.Generator().manual_seed(n)
    values = [torch.randn(1000, generator=g) * 10 ** (i % 3) for i in range(n)]
    ordered = torch.sort(torch.stack(values), dim=0).values
    f = trim_count(n)
    got = get_reducer("trimmed_mean").reduce({f"p{i}": (1.0, v) for i, v in enumerate(values)}).value
    assert torch.allclose(got, ordered[f:n - f].mean(0), rtol=1e-6, atol=1e-5)
    med = get_reducer("median").reduce({f"p{i}": (1.0, v) for i, v in enumerate(values)}).value
    want = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) * 0.5
    assert torch.equal(med, want)  # the median's values are picked, not summed: exact
