"""Search spaces: the range of each hyperparameter a tuning study draws from.

Every registered optimizer declares its space once, in its registry record
(:attr:`~samkit.optim.OptimizerInfo.search_space`): a sharpness-aware method its own
hyperparameters, a plain optimizer (``sgd``, ``adamw``) its learning rate, which a method
over that base inherits. A recipe may override a range for a task (``[search.NAME]``).
:func:`samkit.train.search.draw_trials` draws quasi-random trials from a space.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

__all__ = ["SCALES", "SearchDim"]

#: How a dimension maps a uniform draw ``u`` in [0, 1) to a value.
SCALES = ("linear", "log", "int", "choice")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclasses.dataclass(frozen=True)
class SearchDim:
    """One hyperparameter's range.

    Attributes:
        name: the keyword argument (``rho``, ``lr``, ...).
        low, high: the range, ``low < high`` (inclusive bounds).
        scale: ``"linear"`` (uniform), ``"log"`` (log-uniform: ``0 < low``), ``"int"``
            (uniform over the integers ``low..high``) or ``"choice"`` (one of ``choices``,
            with equal probability; ``low``/``high`` unused).
        choices: the values of a ``"choice"`` dimension (at least two, distinct).
        source: where the range comes from (a paper, a measurement), for the docs.

    Raises ``ValueError`` naming the problem for an empty or inverted range, a log range
    touching 0, an unknown scale, or a choice without choices.
    """

    name: str
    low: float | None = None
    high: float | None = None
    scale: str = "linear"
    choices: tuple[Any, ...] = ()
    source: str = ""

    def __post_init__(self) -> None:
        where = f"search range of {self.name!r}"
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"search dimension name {self.name!r}: not a keyword argument name")
        if self.scale not in SCALES:
            raise ValueError(f"{where}: unknown scale {self.scale!r} (one of {', '.join(SCALES)})")
        if self.scale == "choice":
            object.__setattr__(self, "choices", tuple(self.choices))
            if len(self.choices) < 2:
                raise ValueError(f"{where}: a choice needs at least two values, got {self.choices!r}")  # fmt: skip
            if len(set(map(repr, self.choices))) != len(self.choices):
                raise ValueError(f"{where}: repeated values in {self.choices!r}")
            if self.low is not None or self.high is not None:
                raise ValueError(f"{where}: a choice takes choices, not low/high")
            return
        if self.choices:
            raise ValueError(f"{where}: choices need scale 'choice', not {self.scale!r}")
        if not (_number(self.low) and _number(self.high)):
            raise ValueError(
                f"{where}: low and high must be finite numbers, got {self.low!r} and {self.high!r}"
            )
        if self.low >= self.high:
            kind = "empty" if self.low == self.high else "inverted"
            raise ValueError(f"{where}: {kind} range [{self.low:g}, {self.high:g}] (low < high)")
        if self.scale == "log" and self.low <= 0:
            raise ValueError(
                f"{where}: a log range must stay above 0, got [{self.low:g}, {self.high:g}]"
            )
        if self.scale == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):  # fmt: skip
            raise ValueError(
                f"{where}: an int range needs integer bounds, got [{self.low:g}, {self.high:g}]"
            )

    @classmethod
    def choice(cls, name: str, values: Sequence[Any], source: str = "") -> SearchDim:
        """A ``"choice"`` dimension over ``values``."""
        return cls(name, scale="choice", choices=tuple(values), source=source)

    def value(self, u: float) -> Any:
        """The value at ``u`` in [0, 1): ``low + u (high - low)`` (linear), its log-space
        equivalent (log), an equal-width bin of ``low..high`` (int) or of ``choices``."""
        if not 0.0 <= u < 1.0:
            raise ValueError(f"search draw {u!r} outside [0, 1)")
        if self.scale == "choice":
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        low, high = float(self.low), float(self.high)  # type: ignore[arg-type]
        if self.scale == "int":
            n = int(high - low) + 1
            return int(low) + min(int(u * n), n - 1)
        if self.scale == "log":
            return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        return low + u * (high - low)

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is a point of this dimension."""
        if self.scale == "choice":
            return any(value == c and type(value) is type(c) for c in self.choices)
        if self.scale == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            return False
        return _number(value) and self.low <= value <= self.high  # type: ignore[operator]

    def describe(self) -> str:
        """``rho: log-uniform [0.01, 0.5]``, ``ratio: one of max_min, one``."""
        if self.scale == "choice":
            return f"{self.name}: one of {', '.join(map(str, self.choices))}"
        kind = {"linear": "uniform", "log": "log-uniform", "int": "integer"}[self.scale]
        return f"{self.name}: {kind} [{self.low:g}, {self.high:g}]"
