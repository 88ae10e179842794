"""Statistics of a sweep, from ``scipy.stats``: means with Student-t intervals, differences
paired by seed with their t-test, Holm's step-down correction over many methods against one
reference, medians of time-to-target with censored runs, and performance profiles.

* With n seeds the 95 % confidence interval of a mean is ``mean ± t(0.975, n-1)·s/√n``.
* A difference to a reference method is computed per seed (same seed = same initialisation,
  data order and label noise), so the spread both methods share cancels; its p-value is the
  two-sided one-sample t-test of the per-seed differences against 0 (= the paired t-test).
* m methods tested against one reference: Holm's step-down procedure keeps the chance of any
  false difference (the family-wise error) at 5 %. With fewer than :data:`MIN_SEEDS` paired
  seeds a comparison is not judged at all.
* Time-to-target: a run that never reaches the target is censored; the median over seeds is
  the time by which half of the seeds have reached it (the Kaplan-Meier median: for an even
  number of seeds the lower of the two middle values), "not reached" when more than half are
  censored.
* Performance profiles (Dolan & Moré 2002, as AlgoPerf uses them): for method s on task w,
  ``r = t_sw / min_s' t_s'w``; ``rho_s(tau)`` is the fraction of tasks with ``r <= tau``; the
  score is the area under ``rho_s`` from tau = 1 to 4, divided by 3 (in [0, 1]).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

__all__ = [
    "ALPHA",
    "MIN_SEEDS",
    "TAU_MAX",
    "Paired",
    "Profile",
    "Summary",
    "holm",
    "median_time",
    "paired_difference",
    "performance_profile",
    "summarize",
    "t_quantile_975",
]

#: Family-wise error rate of the marked differences.
ALPHA = 0.05
#: Fewest paired seeds for a difference to be judged at all.
MIN_SEEDS = 3
#: Upper end of the performance profile's tau (AlgoPerf's r_max).
TAU_MAX = 4.0

K = TypeVar("K", bound=Hashable)


def t_quantile_975(df: int) -> float:
    """``t(0.975, df)``, the two-sided 95 % quantile of Student's t (``scipy.stats.t``)."""
    from scipy import stats

    if df < 1:
        raise ValueError(f"Invalid degrees of freedom: {df}")
    return float(stats.t.ppf(0.975, df))


@dataclasses.dataclass(frozen=True)
class Summary:
    """Mean, sample std (ddof 1) and the 95 % interval's half width of ``n`` values."""

    n: int
    mean: float
    std: float
    ci: float  # half width: the interval is mean ± ci (nan for n < 2)


def summarize(values: Sequence[float]) -> Summary:
    """:class:`Summary` of ``values`` (``ValueError`` if empty)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = math.fsum(xs) / n
    if n < 2:
        return Summary(n, mean, math.nan, math.nan)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Summary(n, mean, std, t_quantile_975(n - 1) * std / math.sqrt(n))


@dataclasses.dataclass(frozen=True)
class Paired:
    """Mean of per-seed differences ``a[s] - b[s]`` over the seeds both have, its 95 %
    Student-t interval (``mean ± ci``, per comparison) and the paired t-test's two-sided
    p-value (nan for fewer than 2 seeds)."""

    n: int
    mean: float
    ci: float
    seeds: tuple[int, ...]
    p: float = math.nan

    @property
    def judged(self) -> bool:
        """Enough seeds (:data:`MIN_SEEDS`) to judge the difference."""
        return self.n >= MIN_SEEDS


def _p_value(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the one-sample t-test of ``diffs`` against 0."""
    from scipy import stats

    if len(diffs) < 2:
        return math.nan
    if max(diffs) == min(diffs):  # no spread: scipy returns nan (0/0) or warns
        return 1.0 if diffs[0] == 0 else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nearly identical differences
        return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Paired | None:
    """Differences paired by seed (the key, whatever order or other seeds either side
    has); ``None`` when no seed is in both."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    diffs = [float(a[k]) - float(b[k]) for k in seeds]
    s = summarize(diffs)
    return Paired(s.n, s.mean, s.ci, seeds, _p_value(diffs))


def holm(pvalues: Mapping[K, float], alpha: float = ALPHA) -> dict[K, bool]:
    """Holm's step-down procedure: which hypotheses are rejected at family-wise level
    ``alpha``. The p-values sorted ascending, ``p_(i)`` (i from 1) is rejected while
    ``p_(j) <= alpha / (m - j + 1)`` for every j <= i; the first that fails stops it. A nan
    p-value is never rejected (and still counts in m)."""
    m = len(pvalues)
    order = sorted(pvalues, key=lambda k: (math.isnan(pvalues[k]), pvalues[k]))
    rejected = dict.fromkeys(pvalues, False)
    for i, key in enumerate(order):
        p = pvalues[key]
        if math.isnan(p) or p > alpha / (m - i):
            break
        rejected[key] = True
    return rejected


def median_time(times: Sequence[float | None]) -> float | None:
    """Median over seeds of a time-to-target, ``None`` (censored) for a seed that never
    reached the target: the time by which half of the seeds had reached it (the
    ``ceil(n/2)``-th smallest reached time), ``None`` when more than half are censored."""
    n = len(times)
    reached = sorted(float(t) for t in times if t is not None)
    k = math.ceil(n / 2)
    if n == 0 or len(reached) < k:
        return None
    return reached[k - 1]


@dataclasses.dataclass(frozen=True)
class Profile:
    """A performance profile over tasks: ``ratios[method][task]`` (``inf`` where the method
    did not reach the target) and each method's ``score`` (area under rho / 3)."""

    tasks: tuple[str, ...]
    ratios: dict[str, dict[str, float]]
    scores: dict[str, float]

    def rho(self, method: str, tau: float) -> float:
        """Fraction of the tasks on which ``method`` is within ``tau`` × the fastest."""
        rs = self.ratios[method]
        return sum(r <= tau for r in rs.values()) / len(rs) if rs else 0.0


def performance_profile(
    times: Mapping[str, Mapping[str, float | None]], tau_max: float = TAU_MAX
) -> Profile:
    """``times[method][task]``: each method's time-to-target on each task (``None``: not
    reached, or no run). Tasks no method reached count for every method as unsolved."""
    methods = list(times)
    tasks = tuple(dict.fromkeys(t for m in methods for t in times[m]))
    ratios: dict[str, dict[str, float]] = {m: {} for m in methods}
    for task in tasks:
        reached = [times[m].get(task) for m in methods]
        best = min((t for t in reached if t is not None), default=None)
        for m, t in zip(methods, reached):
            if t is None or best is None:
                ratios[m][task] = math.inf
            elif best <= 0:  # reached at time 0 (e.g. before training): equal footing
                ratios[m][task] = 1.0 if t <= 0 else math.inf
            else:
                ratios[m][task] = t / best
    # rho is a step function: a task with ratio r adds 1/W on [r, tau_max].
    scores = {
        m: math.fsum(max(0.0, tau_max - r) for r in ratios[m].values())
        / ((tau_max - 1.0) * len(tasks))
        if tasks
        else 0.0
        for m in methods
    }
    return Profile(tasks, ratios, scores)
