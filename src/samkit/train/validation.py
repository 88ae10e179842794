"""What a run's validation split says: the figures ``summary.json`` records, computed from
the run's ``metrics.jsonl`` rows by pure functions (``samkit report`` calls them too).

Selection reads validation accuracy only: :func:`validation_summary` picks the best epoch by
``val_acc`` and only then looks up that epoch's test accuracy, to report it;
:func:`time_to_target` never reads a test figure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["check_target", "time_to_target", "validation_summary"]

Row = Mapping[str, Any]


def _val_rows(rows: Iterable[Row]) -> list[Row]:
    """The rows that hold a validation accuracy, in their order."""
    return [r for r in rows if r.get("val_acc") is not None]


def validation_summary(rows: Iterable[Row]) -> dict[str, Any]:
    """``val_acc`` and ``val_loss`` of the last epoch, ``best_val_acc`` and its epoch
    ``best_val_epoch`` (ties: the earliest), and ``test_acc_at_best_val``: the test accuracy
    of that epoch. Every value is ``None`` for a run without a validation split.

    ``rows``: ``metrics.jsonl`` rows in epoch order (``epoch``, ``val_acc``, ``val_loss``,
    ``test_acc``).
    """
    rows = list(rows)
    with_val = _val_rows(rows)
    out: dict[str, Any] = {
        "val_acc": None,
        "val_loss": None,
        "best_val_acc": None,
        "best_val_epoch": None,
        "test_acc_at_best_val": None,
    }
    if not with_val:
        return out
    last = rows[-1]
    out["val_acc"] = last.get("val_acc")
    out["val_loss"] = last.get("val_loss")
    best = with_val[0]
    for r in with_val[1:]:
        if r["val_acc"] > best["val_acc"]:  # strict: a tie keeps the earlier epoch
            best = r
    out["best_val_acc"] = best["val_acc"]
    out["best_val_epoch"] = best.get("epoch")
    out["test_acc_at_best_val"] = best.get("test_acc")
    return out


def check_target(target: Any) -> float:
    """``target`` as a float: a validation accuracy in (0, 1] (``ValueError`` otherwise)."""
    ok = isinstance(target, (int, float)) and not isinstance(target, bool)
    if not ok or not math.isfinite(target) or not 0 < target <= 1:
        raise ValueError(
            f"invalid val_target: {target!r} (a validation accuracy, as a fraction in (0, 1])"
        )
    return float(target)


def time_to_target(rows: Iterable[Row], target: float) -> dict[str, Any]:
    """When validation accuracy first reached ``target``.

    Returns ``{"target": target, "epoch": e, "grad_evals": n, "wall_s": t}`` for the first
    epoch ``e`` (in row order) whose ``val_acc >= target``: ``grad_evals`` is the row's
    cumulative count of gradient evaluations (passes) and ``wall_s`` the training time up
    to the end of that epoch, the sum of the rows' ``train_seconds`` (the training steps
    alone: evaluation and sharpness measurement excluded; ``None`` when a row lacks it).
    A run that never reaches the target is censored: ``epoch``, ``grad_evals`` and
    ``wall_s`` are ``None``. ``ValueError`` for a target outside (0, 1].
    """
    target = check_target(target)
    wall: float | None = 0.0
    for r in rows:
        seconds = r.get("train_seconds")
        wall = None if wall is None or seconds is None else wall + float(seconds)
        acc = r.get("val_acc")
        if acc is not None and acc >= target:
            return {
                "target": target,
                "epoch": r.get("epoch"),
                "grad_evals": r.get("grad_evals"),
                "wall_s": wall,
            }
    return {"target": target, "epoch": None, "grad_evals": None, "wall_s": None}
