"""Sharpness and loss landscapes of a trained run: the logic behind ``samkit sharpness`` and
``samkit landscape``.

Both rebuild the model with :func:`samkit.train.load_checkpoint` (a run directory or a
checkpoint file), rebuild the run's training data with :func:`samkit.train.build_dataset` (its
config: dataset, limits, label noise) and measure on a fixed subset: the first
``batches × batch_size`` training samples, prepared as the model sees them but without
augmentation, in eval mode, with the mean cross-entropy (no label smoothing). The measurements
are :func:`samkit.sharpness.measure_all` and the landscape functions of
:mod:`samkit.sharpness.landscape`.

Invalid settings raise :class:`~samkit.train.ConfigError`, unreadable checkpoints
:class:`~samkit.train.CheckpointError` (the CLI turns both into one-line errors).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from samkit.train.checkpoint import atomic_write_json, load_checkpoint
from samkit.train.config import ConfigError
from samkit.train.loop import build_dataset

__all__ = ["format_table", "landscape", "measure_sharpness", "measure_subset", "run_dir_of"]


def run_dir_of(path: str | Path) -> Path:
    """The run directory of a run directory or of a checkpoint file."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"invalid {name}: {value!r} (must be an integer >= {minimum})")
    return value


def _check_float(name: str, value: Any, *, positive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = math.isfinite(value) and (value > 0 if positive else value >= 0)
    if not ok:
        raise ConfigError(f"invalid {name}: {value!r} (must be a finite number {'>' if positive else '>='} 0)")  # fmt: skip
    return value


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"invalid device {name!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


def measure_subset(
    path: str | Path, batches: int, batch_size: int, device: str = "cpu"
) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]], Any, dict[str, Any]]:
    """``(model, data, config, checkpoint)``: the run's model (eval mode, on ``device``) and
    the first ``batches × batch_size`` training samples of its dataset as a list of batches
    (fewer if the training set is smaller)."""
    _check_int("batches", batches, 1)
    _check_int("batch_size", batch_size, 1)
    dev = _device(device)
    model, config, ckpt = load_checkpoint(path, map_location=dev)
    data = build_dataset(config)
    n = min(batches * batch_size, int(data.y_train.shape[0]))
    subset = []
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)
        x = data.prepare(data.x_train[lo:hi]).to(dev)
        subset.append((x, data.y_train[lo:hi].to(dev)))
    return model, subset, config, ckpt


def _describe(path: str | Path, config: Any, ckpt: dict[str, Any], subset: list) -> dict:
    return {
        "checkpoint": str(path),
        "epoch": int(ckpt.get("epoch", 0)),
        "dataset": config.dataset,
        "model": ckpt.get("model_name", config.model),
        "optimizer": config.optimizer,
        "seed": config.seed,
        "samples": int(sum(int(y.shape[0]) for _, y in subset)),
        "batches": len(subset),
        "subset": "first samples of the training split, no augmentation, eval mode",
    }


def measure_sharpness(
    path: str | Path,
    *,
    rho: float = 0.05,
    batches: int = 4,
    batch_size: int = 128,
    iters: int = 30,
    seed: int = 0,
    json_path: str | Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """:func:`samkit.sharpness.measure_all` on the run's fixed training subset.

    ``iters`` caps the Lanczos iterations for λ₁ (``lanczos_iter``); the worst-, ascent- and
    average-direction sharpness use radius ``rho`` and are m-sharpness with
    m = ``batch_size``. Writes ``{"run": ..., "settings": ..., "measures": ...}`` to
    ``json_path`` (default ``RUN_DIR/sharpness.json``) and returns it, with
    ``"json": path`` added.
    """
    import samkit.sharpness as S

    rho = _check_float("rho", rho, positive=False)
    _check_int("iters", iters, 1)
    _check_int("seed", seed, 0)
    model, subset, config, ckpt = measure_subset(path, batches, batch_size, device)
    measures = S.measure_all(
        model, nn.CrossEntropyLoss(), subset, rho=rho, lanczos_iter=iters, seed=seed
    )
    out_path = Path(json_path) if json_path is not None else run_dir_of(path) / "sharpness.json"
    record = {
        "run": _describe(path, config, ckpt, subset),
        "settings": {
            "rho": rho,
            "batches": batches,
            "batch_size": batch_size,
            "iters": iters,
            "seed": seed,
        },  # fmt: skip
        "measures": measures,
    }
    atomic_write_json(out_path, record)
    return {**record, "json": str(out_path)}


def format_table(record: dict[str, Any]) -> str:
    """The measures of :func:`measure_sharpness` as an aligned two-column table."""
    run, m = record["run"], record["measures"]
    rows = [
        ("loss", m.get("loss")),
        ("lambda_max", m.get("lambda_max")),
        ("lambda_max converged", m.get("lambda_max_converged")),
        ("Hessian trace", m.get("trace")),
        ("  std error", m.get("trace_std_error")),
        (f"worst-direction (rho {m['rho']:g})", m.get("worst_direction")),
        (f"ascent-direction (rho {m['rho']:g})", m.get("ascent_direction")),
        (f"average-direction (rho {m['rho']:g})", m.get("average_direction")),
        ("grad / top-eigenvector |cos|", m.get("alignment")),
        ("Hessian-vector products", m.get("num_hvp")),
        ("seconds", m.get("seconds")),
    ]
    head = (
        f"{run['checkpoint']} | {run['optimizer']} on {run['dataset']} ({run['model']}), "
        f"epoch {run['epoch']} | {run['samples']} training samples in {run['batches']} batches"
    )
    width = max(len(name) for name, _ in rows)
    lines = [head]
    for name, value in rows:
        if isinstance(value, float):
            text = f"{value:.6g}"
        else:
            text = "n/a" if value is None else str(value)
        lines.append(f"  {name:<{width}}  {text}")
    return "\n".join(lines)


def landscape(
    path: str | Path,
    *,
    two_d: bool = False,
    other: str | Path | None = None,
    steps: int = 21,
    span: float = 1.0,
    out: str | Path | None = None,
    batches: int = 4,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Loss landscape around a checkpoint (Li et al. 2018) or between two (Goodfellow et al.).

    * default: 1-D slice ``w + αd``, ``d`` a filter-normalised random direction, ``α`` in
      ``steps`` points over ``[-span, span]`` → ``landscape_1d.png`` + ``landscape_1d.json``;
    * ``two_d``: 2-D grid ``w + αd₁ + βd₂`` (``steps × steps``) → ``landscape_2d.png``
      (contour) + ``landscape_2d.json``;
    * ``other``: linear interpolation from this checkpoint (α = 0) to ``other`` (α = 1),
      ``steps`` points → ``interpolation.png`` + ``interpolation.json`` (both checkpoints
      must share the architecture).

    ``out`` defaults to the run directory. The JSON holds the grid (``alphas``, ``betas``,
    ``losses``, ``accuracies``) and the settings. Returns ``{"png": ..., "json": ..., **grid}``.
    """
    import samkit.sharpness as S

    _check_int("steps", steps, 2)
    span = _check_float("span", span, positive=True)
    _check_int("seed", seed, 0)
    if two_d and other is not None:
        raise ConfigError("--2d and --other cannot be combined (interpolation is 1-D)")
    model, subset, config, ckpt = measure_subset(path, batches, batch_size, device)
    loss_fn = nn.CrossEntropyLoss()
    if other is not None:
        model_b, config_b, _ = load_checkpoint(other, map_location=next(model.parameters()).device)
        sa, sb = model.state_dict(), model_b.state_dict()
        if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
            raise ConfigError(
                f"{other} holds a different architecture ({config_b.model or 'default'} on "
                f"{config_b.dataset}) than {path}: cannot interpolate"
            )
        result = S.interpolate(model, loss_fn, subset, sa, sb, np.linspace(0.0, 1.0, steps),
                               seed=seed)  # fmt: skip
        name, title = "interpolation", f"{Path(path).name} → {Path(other).name}"
    elif two_d:
        result = S.landscape_2d(model, loss_fn, subset, steps=steps, span=span, seed=seed)
        name, title = "landscape_2d", f"{config.optimizer}: 2-D loss landscape"
    else:
        alphas = np.linspace(-span, span, steps)
        result = S.landscape_1d(model, loss_fn, subset, alphas=alphas, seed=seed)
        name, title = "landscape_1d", f"{config.optimizer}: 1-D loss landscape"

    folder = Path(out) if out is not None else run_dir_of(path)
    folder.mkdir(parents=True, exist_ok=True)
    png = folder / f"{name}.png"
    if two_d:
        S.plot_landscape_2d(result, png, title=title)
    else:
        S.plot_landscape_1d(result, png, title=title)
    grid = result.to_dict()
    record = {
        "run": _describe(path, config, ckpt, subset),
        "settings": {
            "kind": name,
            "steps": steps,
            "span": span,
            "seed": seed,
            "other": None if other is None else str(other),
            "directions": None if other is not None else "random, filter-normalised",
        },  # fmt: skip
        **grid,
    }
    json_path = folder / f"{name}.json"
    atomic_write_json(json_path, record)
    return {"png": str(png), "json": str(json_path), **record}
