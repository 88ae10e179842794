"""Statistics of a sweep: mean, sample standard deviation, Student-t 95 % intervals, and
differences paired by seed.

With n seeds the 95 % confidence interval of a mean is ``mean ± t(0.975, n-1)·s/√n``; a
difference to a reference method is computed per seed (same seed = same initialisation,
data order and label noise), so the spread that both methods share cancels.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

__all__ = ["Summary", "Paired", "t_quantile_975", "summarize", "paired_difference"]

# Two-sided 95 % quantiles t(0.975, df) of Student's t distribution, df = 1..30.
_T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)  # fmt: skip
# Beyond 30: the table's values at 40, 60, 120 and the normal limit.
_T975_TAIL = ((40, 2.0211), (60, 2.0003), (120, 1.9799), (math.inf, 1.9600))


def t_quantile_975(df: int) -> float:
    """``t(0.975, df)``: exact to 4 decimals for df <= 30, interpolated in 1/df beyond."""
    if df < 1:
        raise ValueError(f"Invalid degrees of freedom: {df}")
    if df <= 30:
        return _T975[df - 1]
    lo_df, lo_t = 30, _T975[-1]
    for hi_df, hi_t in _T975_TAIL:
        if df <= hi_df:
            # linear in 1/df between the two table entries
            x, x0 = 1 / df, 1 / lo_df
            x1 = 0.0 if math.isinf(hi_df) else 1 / hi_df
            return lo_t + (hi_t - lo_t) * (x0 - x) / (x0 - x1)
        lo_df, lo_t = hi_df, hi_t
    return 1.96  # pragma: no cover


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
    """Mean of per-seed differences ``a[s] - b[s]`` over the seeds both have."""

    n: int
    mean: float
    ci: float
    seeds: tuple[int, ...]

    @property
    def significant(self) -> bool:
        """The 95 % interval excludes 0 (False when it cannot be computed)."""
        return self.n >= 2 and abs(self.mean) > self.ci


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> Paired | None:
    """Differences paired by seed; ``None`` when no seed is in both."""
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    s = summarize([a[k] - b[k] for k in seeds])
    return Paired(s.n, s.mean, s.ci, seeds)
