"""samkit.bench.stats against hand computations and closed forms: t quantiles, paired
differences (matched by seed), their p-values, Holm's step-down, the median time-to-target
with censored runs, performance profiles."""

from __future__ import annotations

import math

import pytest

from samkit.bench import (
    holm,
    median_time,
    paired_difference,
    performance_profile,
    summarize,
    t_quantile_975,
)


def test_t_quantiles_are_the_printed_table():
    # Student's t table, two-sided 95 %, to 4 decimals.
    table = {1: 12.7062, 4: 2.7764, 10: 2.2281, 30: 2.0423, 60: 2.0003, 120: 1.9799}
    for df, t in table.items():
        assert t_quantile_975(df) == pytest.approx(t, abs=5e-5), df
    assert t_quantile_975(10**9) == pytest.approx(1.959964, abs=1e-6)
    with pytest.raises(ValueError, match="degrees of freedom: 0"):
        t_quantile_975(0)


def test_summary_and_paired_difference_by_hand():
    s = summarize([90.0, 91.0, 92.0, 93.0, 94.0])
    # mean 92, squared deviations 4+1+0+1+4 = 10, / (n-1) = 2.5
    assert (s.n, s.mean, s.std) == (5, 92.0, math.sqrt(2.5))
    assert s.ci == pytest.approx(2.7764 * math.sqrt(2.5) / math.sqrt(5), rel=2e-5)
    # per-seed differences 1, -0.5, 2, 1, 1 -> mean 0.9; deviations .1 -1.4 1.1 .1 .1
    # -> squares sum 3.2, / 4 = 0.8, standard error sqrt(0.8 / 5) = 0.4
    a = {0: 91.0, 1: 90.5, 2: 94.0, 3: 94.0, 4: 95.0}
    b = {0: 90.0, 1: 91.0, 2: 92.0, 3: 93.0, 4: 94.0}
    d = paired_difference(a, b)
    assert d.n == 5 and d.mean == pytest.approx(0.9, abs=1e-12) and d.judged
    assert d.ci == pytest.approx(2.7764 * 0.4, rel=2e-5)
    # t = 0.9 / 0.4 = 2.25 on 4 degrees of freedom; closed form of t_4's CDF:
    # F(t) = 1/2 + 3x/4 - x^3/4 with x = t / sqrt(4 + t^2); p = 2 (1 - F(t)).
    x = 2.25 / math.sqrt(4 + 2.25**2)
    assert d.p == pytest.approx(2 * (1 - (0.5 + 0.75 * x - 0.25 * x**3)), rel=1e-9)
    assert paired_difference({0: 1.0}, {1: 2.0}) is None
    one = summarize([3.0])
    assert one.n == 1 and math.isnan(one.std) and math.isnan(one.ci)
    # No spread in the differences: p is 1 for none, 0 for a constant one (not scipy's nan).
    assert paired_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 2: 3.0}).p == 1.0
    assert paired_difference({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0}).p == 0.0


def test_paired_difference_matches_seeds_by_key_when_the_seed_sets_differ():
    # Other seeds on each side and another insertion order: pairing by position (zip of
    # the values) or by rank would give other numbers.
    a = {3: 95.0, 1: 90.0, 2: 91.0}
    b = {2: 90.0, 4: 80.0, 1: 91.0, 0: 70.0, 3: 92.0}
    d = paired_difference(a, b)
    assert d.seeds == (1, 2, 3)
    # seed 1: 90 - 91 = -1; seed 2: 91 - 90 = 1; seed 3: 95 - 92 = 3 -> mean 1, std 2
    assert d.n == 3 and d.mean == pytest.approx(1.0)
    assert d.ci == pytest.approx(4.302653 * 2 / math.sqrt(3), rel=1e-6)  # t(0.975, 2)
    assert not paired_difference({0: 1.0, 1: 2.0}, {0: 0.0, 1: 0.0}).judged  # 2 seeds


def test_holm_by_hand():
    # m = 4, sorted p: 0.005 <= .05/4 (reject), 0.01 <= .05/3 (reject), 0.03 > .05/2: stop;
    # 0.04 is not rejected either although 0.04 < 0.05 (unadjusted) and < .05/1.
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.005}
    assert holm(p) == {"a": True, "b": False, "c": False, "d": True}
    # Every step passes: 0.001 <= .0167, 0.02 <= .025, 0.04 <= .05.
    assert holm({"x": 0.04, "y": 0.001, "z": 0.02}) == {"x": True, "y": True, "z": True}
    # The first step fails: nothing is rejected, whatever follows.
    # (0.018 > .05/3 although every p is below 0.05.)
    assert holm({"x": 0.02, "y": 0.03, "z": 0.018}) == {"x": False, "y": False, "z": False}
    assert holm({"x": 0.02, "y": 0.03, "z": 0.018}, alpha=0.1) == {
        "x": True, "y": True, "z": True
    }  # fmt: skip
    assert holm({"x": 0.02, "y": 0.02}) == {"x": True, "y": True}
    assert holm({"x": 0.03, "y": 0.04}) == {"x": False, "y": False}
    # A nan p-value (a difference that cannot be tested) counts in m, is never rejected.
    assert holm({"x": 0.02, "y": math.nan}) == {"x": True, "y": False}
    assert holm({"x": 0.03, "y": math.nan}) == {"x": False, "y": False}
    assert holm({}) == {}


def test_median_time_with_censored_runs():
    assert median_time([3, None, 5]) == 5  # 2 of 3 reached: the 2nd smallest
    assert median_time([5, 3, 4]) == 4
    assert median_time([None, None, 4]) is None  # more than half censored
    assert median_time([4, 2, 6, None]) == 4  # even n: the lower middle (Kaplan-Meier)
    assert median_time([1, None, None, 2]) == 2  # exactly half reached: reached
    assert median_time([1, None, None, None]) is None
    assert median_time([]) is None


def test_performance_profile_by_hand():
    times = {
        "x": {"A": 10.0, "B": None, "C": None},
        "y": {"A": 20.0, "B": 30.0, "C": None},
        "z": {"A": None, "B": 15.0, "C": None},
        "w": {"A": 50.0, "B": 45.0, "C": None},
    }
    prof = performance_profile(times)
    # A: fastest 10 -> x 1, y 2, z inf, w 5; B: fastest 15 -> y 2, z 1, w 3; C: nobody.
    assert prof.ratios["y"] == {"A": 2.0, "B": 2.0, "C": math.inf}
    assert prof.ratios["w"] == {"A": 5.0, "B": 3.0, "C": math.inf}
    # score = sum over tasks of max(0, 4 - r) / (3 * 3 tasks)
    assert prof.scores["x"] == pytest.approx(3 / 9)
    assert prof.scores["y"] == pytest.approx(4 / 9)
    assert prof.scores["z"] == pytest.approx(3 / 9)
    assert prof.scores["w"] == pytest.approx(1 / 9)  # A is beyond 4x: nothing
    assert prof.rho("y", 1.99) == 0 and prof.rho("y", 2.0) == pytest.approx(2 / 3)
    assert prof.rho("w", 4.0) == pytest.approx(1 / 3)
    # The score is the area under rho from 1 to 4 over 3: check by a fine Riemann sum.
    for m in times:
        n = 6000
        area = sum(prof.rho(m, 1 + 3 * (i + 0.5) / n) for i in range(n)) * 3 / n
        assert prof.scores[m] == pytest.approx(area / 3, abs=1e-3), m
