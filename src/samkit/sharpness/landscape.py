"""Loss landscapes: filter-normalised random directions, 1-D and 2-D slices, linear
interpolation between checkpoints, and matplotlib plots.

References
----------
* H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the loss landscape of neural
  nets", NeurIPS 2018 (filter normalisation; biases and BatchNorm parameters get a zero
  direction; 1-D/2-D plots in eval mode on a fixed data subset).
* I. Goodfellow, O. Vinyals, A. Saxe, "Qualitatively characterizing neural network
  optimization problems", ICLR 2015 (1-D linear interpolation between two solutions).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ._utils import (
    Evaluator,
    LossFn,
    accuracy_of,
    check_choice,
    check_module,
    check_nonneg_float,
    check_positive_int,
    check_seed,
    check_vectors,
    make_generator,
    trainable_params,
)

__all__ = [
    "Landscape1D",
    "Landscape2D",
    "interpolate",
    "landscape_1d",
    "landscape_2d",
    "plot_landscape_1d",
    "plot_landscape_2d",
    "random_directions",
]


@dataclass
class Landscape1D:
    """Loss (and accuracy, when targets are class labels) along a line ``w + α d`` or along the
    segment ``(1−α) w_a + α w_b`` (``kind="interpolation"``)."""

    alphas: list[float]
    losses: list[float]
    accuracies: list[float] | None
    kind: str = "direction"

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": [float(a) for a in self.alphas],
            "losses": [float(x) for x in self.losses],
            "accuracies": None if self.accuracies is None else [float(x) for x in self.accuracies],
            "kind": self.kind,
        }


@dataclass
class Landscape2D:
    """Loss on the grid ``w + α d₁ + β d₂``: ``losses[i][j]`` is at ``(alphas[i], betas[j])``."""

    alphas: list[float]
    betas: list[float]
    losses: list[list[float]]
    accuracies: list[list[float]] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "alphas": [float(a) for a in self.alphas],
            "betas": [float(b) for b in self.betas],
            "losses": [[float(x) for x in row] for row in self.losses],
            "accuracies": None
            if self.accuracies is None
            else [[float(x) for x in row] for row in self.accuracies],
        }


def random_directions(
    model: nn.Module, seed: int = 0, filter_normalize: bool = True
) -> list[torch.Tensor]:
    """A Gaussian random direction, one tensor per parameter that requires grad.

    With ``filter_normalize=True`` (Li et al. 2018): for every parameter with ``ndim > 1`` each
    output filter (slice ``d[i]`` along dim 0) is rescaled to the norm of the weights' filter,
    ``d[i] ← d[i] · ‖w[i]‖ / ‖d[i]‖``; parameters with ``ndim ≤ 1`` (biases, BatchNorm/LayerNorm
    scales and shifts) get a zero direction. With ``filter_normalize=False`` every entry is
    N(0, 1). Drawn from a local generator seeded with ``seed`` (on the CPU, then moved).
    """
    check_module(model)
    check_seed(seed)
    gen = make_generator(seed)
    _, params = trainable_params(model)
    out = []
    for p in params:
        d = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if filter_normalize:
            if p.ndim <= 1:
                d = torch.zeros_like(d)
            else:
                w = p.detach().to(torch.float64).cpu()
                wn = w.reshape(w.shape[0], -1).norm(dim=1)
                dn = d.reshape(d.shape[0], -1).norm(dim=1)
                factor = wn / (dn + 1e-30)
                d = d * factor.reshape((-1,) + (1,) * (d.ndim - 1))
        out.append(d.to(device=p.device, dtype=p.dtype))
    return out


def _grid(name: str, values: Any, default: np.ndarray) -> list[float]:
    if values is None:
        return [float(x) for x in default]
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {values!r}")
    return [float(x) for x in arr]


def _evaluate(ev: Evaluator, overrides: Mapping[str, torch.Tensor] | None, want_acc: bool):
    total, loss_sum, acc_sum, acc_ok = 0, 0.0, 0.0, want_acc
    for i, x, y, n in ev.batches():
        out, loss = ev.output_and_loss(i, x, y, overrides)
        loss_sum += float(loss) * n
        if acc_ok:
            a = accuracy_of(out, y)
            if a is None:
                acc_ok = False
            else:
                acc_sum += a * n
        total += n
    return loss_sum / total, (acc_sum / total if acc_ok else None)


def _directions_arg(ev: Evaluator, direction: Any, name: str) -> list[torch.Tensor]:
    return check_vectors(direction, ev.params, name)


def landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    direction: Sequence[torch.Tensor] | None = None,
    alphas: Sequence[float] | np.ndarray | None = None,
    *,
    seed: int = 0,
    filter_normalize: bool = True,
    accuracy: bool = True,
    train_mode: bool = False,
) -> Landscape1D:
    """Loss along ``w + α d`` for each ``α`` in ``alphas`` (default ``linspace(-1, 1, 21)``).

    ``direction`` defaults to :func:`random_directions` ``(model, seed, filter_normalize)``.
    ``accuracies`` is filled when ``accuracy`` is true and every batch looks like
    classification (2-D outputs, 1-D integer targets), else None. Cost: one forward per
    ``α`` and batch.
    """
    check_seed(seed)
    grid = _grid("alphas", alphas, np.linspace(-1.0, 1.0, 21))
    ev = Evaluator(model, loss_fn, data, train_mode=train_mode, seed=seed)
    if direction is None:
        direction = random_directions(model, seed, filter_normalize)
    d = _directions_arg(ev, direction, "direction")
    losses, accs = [], []
    with ev.session(), torch.no_grad():
        for a in grid:
            loss, acc = _evaluate(ev, ev.perturbed([a * t for t in d]), accuracy)
            losses.append(loss)
            accs.append(acc)
    acc_out = None if any(a is None for a in accs) else [float(a) for a in accs]
    return Landscape1D(grid, losses, acc_out, "direction")


def landscape_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    directions: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
    *,
    steps: int = 21,
    span: float = 1.0,
    alphas: Sequence[float] | np.ndarray | None = None,
    betas: Sequence[float] | np.ndarray | None = None,
    seed: int = 0,
    filter_normalize: bool = True,
    accuracy: bool = True,
    train_mode: bool = False,
) -> Landscape2D:
    """Loss on the grid ``w + α d₁ + β d₂``.

    The grid defaults to ``linspace(-span, span, steps)`` on both axes (``alphas``/``betas``
    override it). ``directions`` defaults to two independent draws of
    :func:`random_directions` (seeds ``seed`` and ``seed + 1``). Cost: one forward per grid
    point and batch.
    """
    check_seed(seed)
    check_positive_int("steps", steps)
    span = check_nonneg_float("span", span)
    default = np.linspace(-span, span, steps)
    a_grid = _grid("alphas", alphas, default)
    b_grid = _grid("betas", betas, default)
    ev = Evaluator(model, loss_fn, data, train_mode=train_mode, seed=seed)
    if directions is None:
        directions = (
            random_directions(model, seed, filter_normalize),
            random_directions(model, seed + 1, filter_normalize),
        )
    if not isinstance(directions, (tuple, list)) or len(directions) != 2:
        raise TypeError("directions must be a pair (d1, d2) of lists of tensors")
    d1 = _directions_arg(ev, directions[0], "directions[0]")
    d2 = _directions_arg(ev, directions[1], "directions[1]")
    losses, accs = [], []
    with ev.session(), torch.no_grad():
        for a in a_grid:
            row_l, row_a = [], []
            for b in b_grid:
                loss, acc = _evaluate(
                    ev, ev.perturbed([a * u + b * v for u, v in zip(d1, d2)]), accuracy
                )
                row_l.append(loss)
                row_a.append(acc)
            losses.append(row_l)
            accs.append(row_a)
    acc_out = None
    if all(a is not None for row in accs for a in row):
        acc_out = [[float(a) for a in row] for row in accs]
    return Landscape2D(a_grid, b_grid, losses, acc_out)


def _state_of(obj: Any, name: str) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        return obj
    raise TypeError(f"{name} must be a state_dict (Mapping) or an nn.Module, got {type(obj)}")


def interpolate(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    state_a: Mapping[str, torch.Tensor] | nn.Module,
    state_b: Mapping[str, torch.Tensor] | nn.Module,
    alphas: Sequence[float] | np.ndarray | None = None,
    *,
    buffers: str = "interpolate",
    accuracy: bool = True,
    seed: int = 0,
    train_mode: bool = False,
) -> Landscape1D:
    """Loss along the segment ``w(α) = (1 − α) w_a + α w_b`` between two checkpoints.

    ``model`` supplies the architecture (its own weights are left untouched);
    ``state_a``/``state_b`` are state dicts (or modules of the same architecture). ``alphas``
    defaults to ``linspace(0, 1, 11)``; values outside [0, 1] extrapolate. Parameters that
    require grad are interpolated. Buffers (BatchNorm running statistics) and frozen parameters
    follow ``buffers``: ``"interpolate"`` (default; floating tensors interpolated linearly,
    integer ones such as ``num_batches_tracked`` taken from the nearer endpoint, so that both
    endpoints reproduce the two checkpoints exactly), ``"a"`` or ``"b"`` (taken from that
    state). Keys missing from a state keep the model's own tensors. Note that interpolated BN
    statistics do not match the statistics of the interpolated network; re-estimating them is
    left to the caller.
    """
    check_choice("buffers", buffers, ("interpolate", "a", "b"))
    check_seed(seed)
    sa, sb = _state_of(state_a, "state_a"), _state_of(state_b, "state_b")
    grid = _grid("alphas", alphas, np.linspace(0.0, 1.0, 11))
    ev = Evaluator(model, loss_fn, data, train_mode=train_mode, seed=seed)
    trainable = set(ev.names)
    entries: list[tuple[str, torch.Tensor, torch.Tensor, bool]] = []
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in named:
        if name not in sa and name not in sb:
            continue
        if name not in sa or name not in sb:
            raise ValueError(f"{name!r} is in only one of state_a and state_b")
        a = sa[name].detach().to(device=t.device)
        b = sb[name].detach().to(device=t.device)
        if a.shape != t.shape or b.shape != t.shape:
            raise ValueError(
                f"shape mismatch for {name!r}: model {tuple(t.shape)}, state_a "
                f"{tuple(a.shape)}, state_b {tuple(b.shape)}"
            )
        entries.append((name, a, b, name in trainable))
    missing = [n for n in ev.names if n not in sa]
    if missing:
        raise ValueError(f"parameters missing from the states: {missing}")

    def at(alpha: float) -> dict[str, torch.Tensor]:
        out = {}
        for name, a, b, is_trainable in entries:
            if is_trainable or (buffers == "interpolate" and a.is_floating_point()):
                out[name] = (
                    (1.0 - alpha) * a + alpha * b
                    if alpha not in (0.0, 1.0)
                    else (a.clone() if alpha == 0.0 else b.clone())
                )
            elif buffers == "interpolate":
                out[name] = (a if alpha < 0.5 else b).clone()
            else:
                out[name] = (a if buffers == "a" else b).clone()
        return out

    losses, accs = [], []
    with ev.session(), torch.no_grad():
        for alpha in grid:
            loss, acc = _evaluate(ev, at(alpha), accuracy)
            losses.append(loss)
            accs.append(acc)
    acc_out = None if any(a is None for a in accs) else [float(a) for a in accs]
    return Landscape1D(grid, losses, acc_out, "interpolation")


# ----------------------------------------------------------------------------- plots


def _figure():
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "plotting needs matplotlib (an optional dependency): pip install matplotlib"
        ) from exc
    # A bare Figure renders with the Agg canvas on savefig, without pyplot or a global backend.
    return Figure(figsize=(5.0, 4.4), dpi=100)


#: Endpoint names longer than this are shortened to their end in plots.
_LONG_NAME = 50
#: Up to this many characters for both names, they also go into the title and axis label.
_SHORT_NAMES = 36


def _shorten(name: str) -> str:
    return name if len(name) <= _LONG_NAME else "…" + name[-(_LONG_NAME - 1) :]


def _endpoint_names(names: Any) -> tuple[str, str]:
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) != 2:
        raise TypeError(f"names must be a pair of strings (name_a, name_b), got {names!r}")
    a, b = names
    if not isinstance(a, str) or not isinstance(b, str):
        raise TypeError(f"names must be a pair of strings (name_a, name_b), got {names!r}")
    return a, b


def _figure_1d(
    result: Landscape1D, *, title: str | None, log: bool, names: Sequence[str] | None
) -> Any:
    if not isinstance(result, Landscape1D):
        raise TypeError(f"result must be a Landscape1D, got {type(result).__name__}")
    interpolation = result.kind == "interpolation"
    if names is not None and not interpolation:
        raise ValueError(
            "names are the endpoints of an interpolation; this result is a "
            f"{result.kind!r} landscape (its alpha = 0 is the model's own weights)"
        )
    name_a, name_b = _endpoint_names(names) if names is not None else ("state_a", "state_b")
    name_a, name_b = _shorten(name_a), _shorten(name_b)
    short = len(name_a) + len(name_b) <= _SHORT_NAMES
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    alphas = np.asarray(result.alphas, dtype=np.float64)
    losses = np.asarray(result.losses, dtype=np.float64)
    curves = ax.plot(alphas, losses, color="tab:blue", marker="o", ms=3, label="loss")
    handles = []
    if log:
        ax.set_yscale("log")
    # the special points: alpha = 0 (the trained weights; the first endpoint) and alpha = 1
    marks = [(0.0, name_a if interpolation else "trained weights", "tab:red", "*")]
    if interpolation:
        marks.append((1.0, name_b, "tab:green", "D"))
    for at, label, color, marker in marks:
        ax.axvline(at, color=color, lw=0.8, ls=":", zorder=1)
        hit = np.flatnonzero(alphas == at)
        if hit.size:
            handles += ax.plot(
                [at], [losses[hit[0]]], ls="none", marker=marker, ms=10, color=color,
                zorder=3, label=f"alpha = {at:g}: {label}",
            )  # fmt: skip
        else:  # the grid misses the point: the dotted line alone marks it
            handles += ax.plot(
                [], [], color=color, lw=0.8, ls=":", label=f"alpha = {at:g}: {label}"
            )
    if interpolation:
        ax.set_xlabel(
            f"alpha: (1 - alpha) * {name_a} + alpha * {name_b}"
            if short
            else "alpha: interpolation from alpha = 0 to alpha = 1"
        )
    else:
        ax.set_xlabel("alpha (weights + alpha * direction)")
    ax.set_ylabel("loss", color="tab:blue")
    if result.accuracies is not None:
        ax2 = ax.twinx()
        curves += ax2.plot(alphas, result.accuracies, color="tab:orange", ls="--", label="accuracy")
        ax2.set_ylabel("accuracy", color="tab:orange")
    # below the axes, where it cannot hide a curve of either y-axis
    ax.legend(
        handles=curves + handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16),
        ncol=2 if short else 1, frameon=False,
    )  # fmt: skip
    if title is None:
        title = "1-D loss landscape"
        if interpolation:
            title = f"interpolation: {name_a} → {name_b}" if short else "interpolation"
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_landscape_1d(
    result: Landscape1D,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    log: bool = False,
    names: Sequence[str] | None = None,
) -> str:
    """Plot a :class:`Landscape1D` (loss, and accuracy on a twin axis when present) to a PNG.

    The point α = 0 is marked: the model's own (trained) weights for a slice along a
    direction, the first state for an interpolation, whose second state (α = 1) is marked too.
    ``names``: the two states' names for an interpolation (default ``("state_a", "state_b")``,
    the argument names of :func:`interpolate`); they appear in the legend, the axis label and
    the default title. Giving ``names`` for a slice along a direction is a ``ValueError``.
    """
    fig = _figure_1d(result, title=title, log=log, names=names)
    path = os.fspath(path)
    fig.savefig(path, format="png")
    return path


def _figure_2d(result: Landscape2D, *, title: str | None, levels: int) -> Any:
    if not isinstance(result, Landscape2D):
        raise TypeError(f"result must be a Landscape2D, got {type(result).__name__}")
    check_positive_int("levels", levels, minimum=2)
    if len(result.alphas) < 2 or len(result.betas) < 2:
        raise ValueError("a contour plot needs at least 2 alphas and 2 betas")
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    z = np.asarray(result.losses, dtype=np.float64).T  # rows: betas, columns: alphas
    filled = ax.contourf(result.alphas, result.betas, z, levels=levels, cmap="viridis")
    # thin iso-loss lines on the same levels; values are read on the colour bar, not on
    # inline labels (which overlap where the levels crowd together)
    ax.contour(
        result.alphas, result.betas, z, levels=filled.levels, colors="k", linewidths=0.3,
        alpha=0.5,
    )  # fmt: skip
    fig.colorbar(filled, ax=ax, label="loss")
    ax.plot([0.0], [0.0], ls="none", marker="+", ms=12, mew=2, color="tab:red",
            label="trained weights")  # fmt: skip
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
    ax.set_xlabel("alpha (direction 1)")
    ax.set_ylabel("beta (direction 2)")
    ax.set_title(title or "2-D loss landscape")
    fig.tight_layout()
    return fig


def plot_landscape_2d(
    result: Landscape2D, path: str | os.PathLike, *, title: str | None = None, levels: int = 20
) -> str:
    """Filled contour plot of a :class:`Landscape2D` (loss over the (α, β) grid) to a PNG.

    ``levels`` iso-loss levels (at most; matplotlib picks round values), read on the colour
    bar; the contours carry no inline labels, which overlap where the levels crowd together.
    The trained weights (α = β = 0) are marked with a red cross.
    """
    fig = _figure_2d(result, title=title, levels=levels)
    path = os.fspath(path)
    fig.savefig(path, format="png")
    return path
