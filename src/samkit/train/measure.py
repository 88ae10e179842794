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
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from samkit.train.checkpoint import CHECKPOINT_NAME, atomic_write_json, load_checkpoint
from samkit.train.config import ConfigError
from samkit.train.distributed import check_launch_device, device_for, launch_from_env, processes
from samkit.train.loop import build_dataset
from samkit.train.progress import count

__all__ = [
    "format_table",
    "landscape",
    "measure_sharpness",
    "measure_subset",
    "run_dir_of",
    "run_label",
]


def run_dir_of(path: str | Path) -> Path:
    """The run directory of a run directory or of a checkpoint file."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    bad = isinstance(value, bool) or not isinstance(value, int) or value < minimum
    if maximum is not None and not bad and value > maximum:
        raise ConfigError(
            f"invalid {name}: {value!r} (must be an integer from {minimum} to {maximum})"
        )
    if bad:
        raise ConfigError(f"invalid {name}: {value!r} (must be an integer >= {minimum})")
    return value


#: Most grid points per axis of a landscape (a 2-D grid of this size is a million points).
MAX_STEPS = 1001


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
    usage = "use cpu, cuda, cuda:N or auto"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"invalid device {name!r}: {usage}") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"device {name!r} requested but there are {count} CUDA devices (cuda:0 to "
                f"cuda:{count - 1})"
            )
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError(f"device {name!r} requested but MPS is not available")
    elif dev.type != "cpu":
        raise ConfigError(f"invalid device {name!r}: {usage}")
    return dev


def _check_json_path(path: Path) -> None:
    """Refuse an output file that cannot be written, before spending minutes measuring."""
    parent = path.parent
    if path.is_dir():
        reason = "it is a folder; give a file name"
    elif not parent.is_dir():
        reason = f"the folder {parent} does not exist" if not parent.exists() else (
            f"{parent} is not a folder"
        )  # fmt: skip
    elif not os.access(parent, os.W_OK):
        reason = f"the folder {parent} is not writable"
    else:
        return
    raise ConfigError(f"--json {path}: cannot write the results there: {reason}")


def _output_folder(folder: Path) -> Path:
    """Create the output folder (and its parents) or refuse it, before measuring."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(
            f"--out {folder}: cannot write there: it exists and is not a folder"
        ) from None
    except OSError as e:
        raise ConfigError(f"--out {folder}: cannot create the folder: {e.strerror or e}") from e
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"--out {folder}: cannot write there: the folder is not writable")
    return folder


def _write_json(path: Path, record: dict[str, Any], flag: str) -> None:
    try:
        atomic_write_json(path, record)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write the results: {e.strerror or e}") from e


def run_label(path: str | Path) -> str:
    """A short name for a run: its directory name (also for ``RUN/checkpoint.pt``), else the
    checkpoint's file name."""
    p = Path(path).resolve()
    if p.is_dir() or p.name == CHECKPOINT_NAME:
        p = p if p.is_dir() else p.parent
        return p.name or str(p)
    return p.name


def _endpoint_labels(path: str | Path, other: str | Path) -> tuple[str, str]:
    """Names of the two ends of an interpolation; the paths as given when the names clash."""
    a, b = run_label(path), run_label(other)
    if a == b:
        a, b = str(path), str(other)
    return a, b


def _subset_bounds(data: Any, batches: int, batch_size: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` of each batch of the subset: the first ``batches × batch_size`` training
    samples (fewer if the training set is smaller) in batches of ``batch_size``."""
    n = min(batches * batch_size, int(data.y_train.shape[0]))
    return [(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size)]


def _load_batches(
    data: Any, bounds: list[tuple[int, int]], dev: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [
        (data.prepare(data.x_train[lo:hi]).to(dev), data.y_train[lo:hi].to(dev))
        for lo, hi in bounds
    ]


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
    subset = _load_batches(data, _subset_bounds(data, batches, batch_size), dev)
    return model, subset, config, ckpt


def _describe(path: str | Path, config: Any, ckpt: dict[str, Any], sizes: list[int]) -> dict:
    """The run and the subset (``sizes``: the samples of each batch) of a measurement."""
    return {
        "checkpoint": str(path),
        "epoch": int(ckpt.get("epoch", 0)),
        "dataset": config.dataset,
        "model": ckpt.get("model_name", config.model),
        "optimizer": config.optimizer,
        "seed": config.seed,
        "samples": sum(sizes),
        "batches": len(sizes),
        "subset": "first samples of the training split, no augmentation, eval mode",
    }


def _check_shares(
    batches: int, batch_size: int, world: int, bounds: list[tuple[int, int]] | None = None
) -> None:
    """ConfigError unless the subset has a batch for each of ``world`` processes (a process
    measures whole batches: splitting them would change m, the batch size). Without
    ``bounds`` (before the data is loaded) it checks ``batches``; with them, the batches
    the training set fills."""
    have = batches if bounds is None else len(bounds)
    if have >= world:
        return
    why = (
        f"each process measures whole batches of --batch-size {batch_size} (the m of "
        "m-sharpness), at least one"
    )
    if bounds is None:
        raise ConfigError(
            f"--batches {batches}: the subset has {count(have, 'batch', 'batches')} for "
            f"{world} processes; {why}: use --batches {world} or more"
        )
    n = bounds[-1][1]
    raise ConfigError(
        f"--batch-size {batch_size}: the training set has {n} samples, "
        f"{count(have, 'batch', 'batches')} for {world} processes; {why}: use --batch-size "
        f"{max(n // world, 1)} or less"
    )


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

    ``iters`` caps the Lanczos iterations for λ₁ (``lanczos_iter``); the worst- and
    ascent-direction sharpness use radius ``rho`` and are m-sharpness with m = ``batch_size``
    (the average-direction sharpness, also of radius ``rho``, does not depend on the split).
    Writes ``{"run": ..., "settings": ..., "measures": ...}`` to ``json_path`` (default
    ``RUN_DIR/sharpness.json``; its folder must exist, and is checked before measuring) and
    returns it, with ``"json": path`` added. A measure that fails is ``None`` with its error
    in ``measures["errors"]`` (see :func:`samkit.sharpness.measure_all`); the others are kept.

    Launched by torchrun (or inside a process group the caller joined), every process calls
    this with the same arguments: each one loads the model and measures a contiguous block
    of the subset's batches (:func:`samkit.sharpness.shard_batches`), the measures are over
    the union of the blocks — the whole subset, in batches of ``batch_size`` whatever the
    number of processes, so m stays ``batch_size`` — and rank 0 alone writes the JSON;
    every process returns the same record. The subset must have at least one batch per
    process (:class:`ConfigError` otherwise). Errors are raised on every process alike
    (``samkit_agreed``: the CLI reports them once).
    """
    import samkit.sharpness as S

    try:  # the same on every process, before any of them joins the others
        rho = _check_float("rho", rho, positive=False)
        _check_int("iters", iters, 1)
        _check_int("seed", seed, 0)
        _check_int("batches", batches, 1)
        _check_int("batch_size", batch_size, 1)
        launch = launch_from_env()
        check_launch_device(launch, device)
        _check_shares(batches, batch_size, launch.world_size)
        dev = _device(device_for(launch, device))
    except ConfigError as e:
        e.samkit_agreed = True  # type: ignore[attr-defined]
        raise

    with processes(launch, dev) as procs:

        def prepare() -> tuple[Any, ...]:
            out_path = Path(json_path) if json_path is not None else None
            if out_path is not None and procs.is_main:  # rank 0 alone writes
                _check_json_path(out_path)
            model, config, ckpt = load_checkpoint(path, map_location=dev)
            if out_path is None:
                out_path = run_dir_of(path) / "sharpness.json"
                if procs.is_main:
                    _check_json_path(out_path)
            data = build_dataset(config)
            bounds = _subset_bounds(data, batches, batch_size)
            _check_shares(batches, batch_size, procs.world_size, bounds)
            mine = S.shard_batches(bounds, procs.rank, procs.world_size)
            return model, config, ckpt, bounds, _load_batches(data, mine, dev), out_path

        model, config, ckpt, bounds, mine, out_path = procs.agree(prepare)
        sizes = [hi - lo for lo, hi in bounds]
        with warnings.catch_warnings(), procs.measuring():
            # a failed measure is reported in the record (and by format_table), not as a warning
            warnings.filterwarnings("ignore", message="measure_all: ", category=RuntimeWarning)
            measures = S.measure_all(
                model, nn.CrossEntropyLoss(), mine, rho=rho, lanczos_iter=iters, seed=seed
            )
        record = {
            "run": {**_describe(path, config, ckpt, sizes), "processes": procs.world_size},
            "settings": {
                "rho": rho,
                "batches": batches,
                "batch_size": batch_size,
                "iters": iters,
                "seed": seed,
            },  # fmt: skip
            "measures": measures,
        }
        # rank 0 writes; a failure to write ends every process with rank 0's error
        procs.agree(lambda: _write_json(out_path, record, "--json") if procs.is_main else None)
    return {**record, "json": str(out_path)}


#: A Monte-Carlo estimate whose magnitude is below this many standard errors is reported as
#: "within noise": it cannot be told apart from 0 with the samples drawn (≈ 95% two-sided).
NOISE_STANDARD_ERRORS = 2.0


def _estimate(value: Any, std_error: Any) -> Any:
    """``value ± standard error``, flagged when the value is inside its noise."""
    if not isinstance(value, float):
        return value
    if not isinstance(std_error, float) or not math.isfinite(std_error):
        return f"{value:.6g}"
    text = f"{value:.6g} ± {std_error:.2g}"
    if abs(value) < NOISE_STANDARD_ERRORS * std_error:
        text += f"  (within noise: |value| < {NOISE_STANDARD_ERRORS:g} standard errors)"
    return text


def format_table(record: dict[str, Any]) -> str:
    """The measures of :func:`measure_sharpness` as an aligned two-column table.

    The Monte-Carlo estimates (Hessian trace, average-direction sharpness) are shown as
    ``value ± standard error`` and flagged "within noise" when ``|value|`` is below
    ``NOISE_STANDARD_ERRORS`` (2) standard errors. A measure that failed reads
    ``failed (see errors)`` and its error is listed below the table; one that is undefined
    (the gradient is exactly zero) reads ``undefined (zero gradient)``.
    """
    run, m = record["run"], record["measures"]
    errors = m.get("errors") or {}
    rho = f"rho {m['rho']:g}"
    rows = [
        ("loss", None, m.get("loss")),
        ("lambda_max", "lambda_max", m.get("lambda_max")),
        ("lambda_max converged", "lambda_max", m.get("lambda_max_converged")),
        ("Hessian trace", "trace", _estimate(m.get("trace"), m.get("trace_std_error"))),
        (f"worst-direction ({rho})", "worst_direction", m.get("worst_direction")),
        (f"ascent-direction ({rho})", "ascent_direction", m.get("ascent_direction")),
        (
            f"average-direction ({rho})",
            "average_direction",
            _estimate(m.get("average_direction"), m.get("average_direction_std_error")),
        ),
        ("grad / top-eigenvector |cos|", "alignment", m.get("alignment")),
        ("Hessian-vector products", None, m.get("num_hvp")),
        ("seconds", None, m.get("seconds")),
    ]
    head = (
        f"{run['checkpoint']} | {run['optimizer']} on {run['dataset']} ({run['model']}), "
        f"epoch {run['epoch']} | {run['samples']} training samples in {run['batches']} batches"
    )
    if run.get("processes", 1) > 1:
        head += f", measured by {run['processes']} processes"
    width = max(len(name) for name, _, _ in rows)
    lines = [head]
    for name, key, value in rows:
        if key is not None and key in errors:
            text = "failed (see errors below)"
        elif isinstance(value, float):
            text = f"{value:.6g}"
        elif value is None:
            text = (
                "undefined (zero gradient)" if key in ("ascent_direction", "alignment") else "n/a"
            )
        else:
            text = str(value)
        lines.append(f"  {name:<{width}}  {text}")
    lines.append(
        "  (± is one standard error of the Monte-Carlo estimate; 'within noise': not "
        f"distinguishable from 0 at {NOISE_STANDARD_ERRORS:g} standard errors)"
    )
    if errors:
        lines.append("errors (these measures failed; the others are unaffected):")
        lines.extend(f"  {name}: {message}" for name, message in errors.items())
    return "\n".join(lines)


def landscape(
    path: str | Path,
    *,
    two_d: bool = False,
    other: str | Path | None = None,
    steps: int = 21,
    span: float | None = None,
    out: str | Path | None = None,
    batches: int = 4,
    batch_size: int = 128,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Loss landscape around a checkpoint (Li et al. 2018) or between two (Goodfellow et al.).

    * default: 1-D slice ``w + αd``, ``d`` a filter-normalised random direction, ``α`` in
      ``steps`` points over ``[-span, span]`` (``span`` default 1) → ``landscape_1d.png`` +
      ``landscape_1d.json``; the plot marks α = 0, the checkpoint's own weights;
    * ``two_d``: 2-D grid ``w + αd₁ + βd₂`` (``steps × steps``) → ``landscape_2d.png``
      (filled contours, values on the colour bar, the checkpoint marked) +
      ``landscape_2d.json``;
    * ``other``: linear interpolation from this checkpoint (α = 0) to ``other`` (α = 1),
      ``steps`` points → ``interpolation.png`` + ``interpolation.json`` (both checkpoints
      must share the architecture). The plot names both ends after their runs
      (:func:`run_label`: the run directory's name, else the checkpoint file's; the paths as
      given when the two names are the same). ``span`` does not apply and is refused.

    ``steps`` is 2 to ``MAX_STEPS`` (1001). ``out`` defaults to the run directory; it is
    created (with its parents) before anything is measured. The JSON holds the grid
    (``alphas``, ``betas``, ``losses``, ``accuracies``) and the settings. Returns
    ``{"png": ..., "json": ..., **grid}``.
    """
    import samkit.sharpness as S

    _check_int("steps", steps, 2, MAX_STEPS)
    if two_d and other is not None:
        raise ConfigError("--2d and --other cannot be combined (interpolation is 1-D)")
    if other is not None and span is not None:
        raise ConfigError(
            "--span does not apply to --other: the interpolation runs from alpha = 0 (this "
            "checkpoint) to alpha = 1 (the other); --steps sets its number of points"
        )
    span = _check_float("span", 1.0 if span is None else span, positive=True)
    _check_int("seed", seed, 0)
    folder = _output_folder(Path(out)) if out is not None else None
    model, subset, config, ckpt = measure_subset(path, batches, batch_size, device)
    folder = folder if folder is not None else _output_folder(run_dir_of(path))
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
        names = _endpoint_labels(path, other)
        name, title = "interpolation", None  # the plot's title names the two runs
    elif two_d:
        result = S.landscape_2d(model, loss_fn, subset, steps=steps, span=span, seed=seed)
        name, title = "landscape_2d", f"{config.optimizer}: 2-D loss landscape"
    else:
        alphas = np.linspace(-span, span, steps)
        result = S.landscape_1d(model, loss_fn, subset, alphas=alphas, seed=seed)
        name, title = "landscape_1d", f"{config.optimizer}: 1-D loss landscape"

    png = folder / f"{name}.png"
    if two_d:
        S.plot_landscape_2d(result, png, title=title)
    elif other is not None:
        S.plot_landscape_1d(result, png, title=title, names=names)
    else:
        S.plot_landscape_1d(result, png, title=title)
    grid = result.to_dict()
    record = {
        "run": _describe(path, config, ckpt, [int(y.shape[0]) for _, y in subset]),
        "settings": {
            "kind": name,
            "steps": steps,
            "span": None if other is not None else span,
            "seed": seed,
            "other": None if other is None else str(other),
            "names": None if other is None else list(names),
            "directions": None if other is not None else "random, filter-normalised",
        },  # fmt: skip
        **grid,
    }
    json_path = folder / f"{name}.json"
    _write_json(json_path, record, "--out")
    return {"png": str(png), "json": str(json_path), **record}
