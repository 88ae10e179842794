"""What a sharpness-aware optimizer accepts, and the messages that refuse the rest.

* The base optimizer: a ``torch.optim.Optimizer`` class, or a name from
  :data:`BASE_OPTIMIZERS`; never an instance, never one whose ``step`` needs a closure
  (:func:`resolve_base_optimizer`).
* Hyperparameter values: one message format for every method,
  ``Invalid rho value: '0.1' (must be a finite number >= 0, got str)``
  (:func:`invalid_value`), and the rules methods share: a finite number >= 0
  (:func:`is_finite_nonnegative`), a fraction in ``(0, 1]`` (:func:`is_fraction`), a count
  (:func:`is_count`).
* Keyword arguments: one the method, samkit and the base optimizer all lack is refused
  naming the method, with every argument it takes and the nearest to the one given
  (:func:`check_keywords`), before the base optimizer's own ``TypeError`` could name only
  the base optimizer.

Every name here is also importable from :mod:`samkit.optim.base`.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = [
    "BASE_OPTIMIZERS",
    "check_keywords",
    "invalid_value",
    "is_count",
    "is_finite_nonnegative",
    "is_fraction",
    "resolve_base_optimizer",
]

#: Base optimizers that can be named by a string.
BASE_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}


def is_finite_nonnegative(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool) in ``[0, inf)``."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < math.inf
    )


def is_fraction(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool) in ``(0, 1]``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 < value <= 1.0


def is_count(value: Any, minimum: int = 1) -> bool:
    """Whether ``value`` is an integer (not a bool) ``>= minimum``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def invalid_value(name: str, value: Any, expected: str) -> ValueError:
    """The ``ValueError`` for an invalid hyperparameter, PyTorch style, with the value's repr.

    ``expected`` says what is allowed (``"a finite number >= 0"``). A value that is not a
    number is named with its type, so that ``rho="0.1"`` reads
    ``Invalid rho value: '0.1' (must be a finite number >= 0, got str)``::

        if not is_finite_nonnegative(rho):
            raise invalid_value("rho", rho, "a finite number >= 0")
    """
    message = f"Invalid {name} value: {value!r} (must be {expected}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        message += f", got {type(value).__name__}"
    return ValueError(message + ")")


def resolve_base_optimizer(base_optimizer: Any) -> type[Optimizer]:
    """A base optimizer class from a class or one of the names in ``BASE_OPTIMIZERS``.

    Optimizers whose ``step()`` requires a closure (``torch.optim.LBFGS``) are refused: a
    sharpness-aware optimizer hands its base optimizer gradients it has already computed.
    """
    if isinstance(base_optimizer, str):
        key = base_optimizer.lower()
        if key not in BASE_OPTIMIZERS:
            raise ValueError(
                f"Unknown base optimizer {base_optimizer!r}; "
                f"choose one of {sorted(BASE_OPTIMIZERS)} or pass a torch.optim.Optimizer class"
            )
        return BASE_OPTIMIZERS[key]
    if isinstance(base_optimizer, Optimizer):
        raise TypeError(
            f"base_optimizer must be an optimizer class, not an instance "
            f"({type(base_optimizer).__name__}(...)); pass {type(base_optimizer).__name__} "
            "and its keyword arguments instead"
        )
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
        raise TypeError(
            f"base_optimizer must be a torch.optim.Optimizer subclass or a name, "
            f"got {base_optimizer!r}"
        )
    if _step_needs_closure(base_optimizer):
        raise ValueError(
            f"base_optimizer {base_optimizer.__name__} is not supported: its step() requires "
            "a closure (it evaluates the loss itself), while a sharpness-aware optimizer hands "
            "its base optimizer gradients it has already computed. Use a base optimizer whose "
            f"step() works without a closure, e.g. one of {sorted(BASE_OPTIMIZERS)}"
        )
    return base_optimizer


def _step_needs_closure(cls: type[Optimizer]) -> bool:
    """Whether ``cls.step`` has a ``closure`` argument without a default (LBFGS)."""
    try:
        parameters = inspect.signature(cls.step).parameters  # follows torch's hook wrapper
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    closure = parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


def _keywords(function: Any, leave_out: set[str]) -> tuple[list[str], bool]:
    """The named keyword arguments ``function`` takes, and whether it takes any (``**kw``)."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return [], True
    names = [
        p.name
        for p in parameters
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in leave_out
    ]
    return names, any(p.kind is p.VAR_KEYWORD for p in parameters)


def check_keywords(method: type, base: type[Optimizer], given: dict[str, Any]) -> None:
    """Refuse the keywords in ``given`` that neither the base optimizer ``base`` nor samkit
    takes (they reach the base optimizer last), with a ``TypeError`` that names ``method``,
    lists the arguments of the method, of samkit and of ``base``, and suggests the nearest.

    ``SAM(params, rh0=0.1)`` reads ``SAM got an unexpected keyword argument 'rh0' (did you
    mean 'rho'?). SAM's arguments: rho, adaptive, eta; samkit's options: model, ...; SGD's
    arguments: lr, momentum, ...``. A base optimizer that takes ``**kwargs`` is not checked.
    """
    accepted, takes_any = _keywords(base.__init__, {"self", "params", "foreach"})
    unknown = [k for k in given if k not in accepted]
    if takes_any or not unknown:
        return
    from samkit.optim.base import SharpnessAwareOptimizer  # the class that uses this check

    skip = {"self", "params", "base_optimizer", "defaults"}
    options = _keywords(SharpnessAwareOptimizer.__init__, skip)[0]
    own = [] if method is SharpnessAwareOptimizer else _keywords(method.__init__, skip)[0]
    everything = own + options + accepted
    name = unknown[0]
    near = difflib.get_close_matches(name, everything, n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    lists = [f"{method.__name__}'s arguments: {', '.join(own)}"] if own else []
    lists += [f"samkit's options: {', '.join(options)}"]
    lists += [f"{base.__name__}'s arguments: {', '.join(accepted)}"]
    raise TypeError(
        f"{method.__name__} got an unexpected keyword argument {name!r}{hint}. " + "; ".join(lists)
    )
