"""Every setting of a training run in one dataclass, with validation and JSON round trips,
and the rule that turns a run's settings into the optimizer's keyword arguments.

The dataclass defaults are plain settings (MNIST-1D, the 1-D CNN, SAM over SGD with the
class's own hyperparameters). What ``samkit train`` runs without arguments is the embedded
``default`` recipe (:mod:`samkit.train.recipes`), which sets its tuned values on top.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from samkit.train.validation import check_target

__all__ = [
    "ConfigError",
    "TrainConfig",
    "RESUMABLE_KEYS",
    "SCHEDULES",
    "AMP_MODES",
    "SETTINGS_ADDED",
    "accepted_kwargs",
    "check_optimizer_name",
    "check_resume",
    "optimizer_classes",
    "optimizer_settings",
    "parse_value",
    "parse_key_values",
    "suggest",
]

SCHEDULES = ("cosine", "constant", "step")
AMP_MODES = ("off", "bf16", "fp16")
#: Settings that may differ between a run and its ``--resume``: they change how long or
#: where the run goes, not the computation of the epochs already done.
RESUMABLE_KEYS = frozenset(
    {
        "epochs",
        "stop_after_epoch",
        "checkpoint_every",
        "resume",
        "out",
        "device",
        "compile",
        "data_dir",
        "track_sharpness",
        "sharpness_samples",
        "val_target",  # read after training (summary.json), not by the epochs
    }
)

#: Settings added after checkpoints were first written, with the value that gives the
#: computation an older checkpoint's run made (it has no entry for them): such a run is
#: resumed, measured and compared as what it was.
SETTINGS_ADDED: dict[str, Any] = {"val_fraction": 0.0, "val_target": None}


class ConfigError(ValueError):
    """An invalid setting (reported by the CLI as ``samkit: error: ...``, exit code 2)."""


@dataclasses.dataclass
class TrainConfig:
    """All settings of ``samkit train`` (field names = CLI flags with ``-`` for ``_``).

    Attributes:
        dataset: ``mnist1d``, ``digits``, ``cifar10`` or ``cifar100``.
        data_dir: folder with the CIFAR files (CIFAR only).
        model: model name; ``None`` picks the dataset's default (cnn1d, cnn_small, resnet18).
        model_args: keyword arguments of the model (e.g. ``{"depth": 16, "widen": 4}``).
        optimizer: a name from ``samkit.list_optimizers()``.
        base: base optimizer of a sharpness-aware method (``sgd``, ``adamw``, ...).
        rho: neighbourhood radius; ``None`` = the method's class default. A plain optimizer
            or a method without a ``rho`` refuses a value.
        opt_args: further keyword arguments of the optimizer (method hyperparameters, base
            optimizer settings); a name the optimizer does not take is refused.
        lr, momentum, weight_decay: base optimizer settings (``momentum`` is passed only to
            optimizers that accept it).
        epochs, batch_size: length of the run and samples per step (under torchrun, the
            global batch: each of N processes takes ``batch_size / N`` samples).
        schedule: ``cosine`` (per step, to 0), ``constant`` or ``step`` (×0.1 at 50% and 75%
            of the steps).
        label_smoothing: of the training loss (the test loss is plain cross-entropy).
        label_noise: symmetric label noise on the training labels (other-class convention);
            never on the validation or test labels.
        val_fraction: fraction of the training split held out as the validation split
            (stratified, the same samples for every seed and method; 0 = none); evaluated
            every epoch beside the test split.
        val_target: validation accuracy (a fraction) whose first epoch ``summary.json``
            records as the run's time to target (``None`` = no target; needs a split).
        augment: standard image augmentation; ``None`` = the dataset's default (CIFAR: on).
        cutout: side of the cutout square when augmenting (0 = off).
        seed: seeds model init, shuffling, augmentation, label noise.
        out: run directory (config.json, metrics.jsonl, summary.json, checkpoint.pt);
            ``None`` writes nothing.
        device: ``auto`` (cuda if available, else cpu), ``cpu``, ``cuda``, ``cuda:1`` ...
        amp: ``off``, ``bf16`` (autocast) or ``fp16`` (autocast with a gradient scaler,
            whose state is checkpointed).
        accumulation_steps: split every pass into this many micro-batches.
        track_sharpness: every N epochs measure lambda_1, the Hessian trace and the
            gradient/top-eigenvector alignment on a fixed training subset (0 = off).
        sharpness_samples: size of that subset.
        checkpoint_every: write ``checkpoint.pt`` every N epochs (and at the end; 0 = only
            at the end).
        resume: continue from ``out/checkpoint.pt``.
        stop_after_epoch: stop (with a checkpoint) once this epoch is done, to be resumed
            later — for time-limited jobs; ``None`` runs to ``epochs``.
        limit_train, limit_test: keep only the first N samples of a split (quick runs).
        deterministic: ``torch.use_deterministic_algorithms`` during the run.
        recipe: the recipe(s) the settings came from (``samkit train --recipe``), recorded
            for the reader of ``config.json``; the loop does not read it.
        compile: run the model's forward and backward passes through ``torch.compile``
            (the model only; the optimizer step stays eager).
    """

    dataset: str = "mnist1d"
    data_dir: str | None = None
    model: str | None = None
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    optimizer: str = "sam"
    base: str = "sgd"
    rho: float | None = None
    opt_args: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 30
    batch_size: int = 128
    schedule: str = "cosine"
    label_smoothing: float = 0.0
    label_noise: float = 0.0
    val_fraction: float = 0.1
    val_target: float | None = None
    augment: bool | None = None
    cutout: int = 0
    seed: int = 0
    out: str | None = None
    device: str = "auto"
    amp: str = "off"
    accumulation_steps: int = 1
    track_sharpness: int = 0
    sharpness_samples: int = 512
    checkpoint_every: int = 1
    resume: bool = False
    stop_after_epoch: int | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    deterministic: bool = True
    recipe: str | None = None
    compile: bool = False

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting."""

        def bad(name: str, value: Any, why: str) -> ConfigError:
            return ConfigError(f"invalid {name}: {value!r} ({why})")

        def check_int(
            name: str, minimum: int, allow_none: bool = False, maximum: int | None = None
        ) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, v, "must be an integer")
            if v < minimum:
                raise bad(name, v, f"must be >= {minimum}")
            if maximum is not None and v > maximum:
                raise bad(name, v, f"must be <= {maximum}")

        def check_float(name: str, lo: float, lo_open: bool = False, hi: float | None = None):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, v, "must be a finite number")
            if v < lo or (lo_open and v == lo):
                raise bad(name, v, f"must be {'>' if lo_open else '>='} {lo:g}")
            if hi is not None and v >= hi:
                raise bad(name, v, f"must be < {hi:g}")

        for name in ("dataset", "optimizer", "base", "schedule", "device", "amp"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, getattr(self, name), "must be a string")
        for name in ("data_dir", "model", "out", "recipe"):
            if not isinstance(getattr(self, name), (str, type(None))):
                raise bad(name, getattr(self, name), "must be a string or null")
        for name in ("resume", "deterministic", "augment", "compile"):
            v = getattr(self, name)
            if not isinstance(v, bool) and not (name == "augment" and v is None):
                raise bad(name, v, "must be true or false")
        check_float("lr", 0.0, lo_open=True)
        check_float("momentum", 0.0, hi=1.0)
        check_float("weight_decay", 0.0)
        check_float("label_smoothing", 0.0, hi=1.0)
        check_float("label_noise", 0.0, hi=1.0)
        check_float("val_fraction", 0.0, hi=1.0)
        if self.val_target is not None:
            try:
                check_target(self.val_target)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.rho is not None:
            check_float("rho", 0.0)
        check_int("epochs", 1)
        check_int("batch_size", 1)
        check_int("cutout", 0)
        check_int("seed", 0, maximum=2**32 - 1)  # numpy's seeding range
        check_int("accumulation_steps", 1)
        check_int("track_sharpness", 0)
        check_int("sharpness_samples", 1)
        check_int("checkpoint_every", 0)
        check_int("stop_after_epoch", 1, allow_none=True)
        check_int("limit_train", 1, allow_none=True)
        check_int("limit_test", 1, allow_none=True)
        if self.schedule not in SCHEDULES:
            raise bad("schedule", self.schedule, f"choose from {', '.join(SCHEDULES)}")
        if self.amp not in AMP_MODES:
            raise bad("amp", self.amp, f"choose from {', '.join(AMP_MODES)}")
        for name in ("model_args", "opt_args"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, getattr(self, name), "must be a dict")
        check_resume(self.resume, self.out)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain-container copy of every setting."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every setting."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a dict; keys may use ``-`` or ``_``; unknown keys raise ConfigError."""
        return cls(**cls._settings(d, source))

    @classmethod
    def _settings(cls, d: dict[str, Any], source: Any) -> dict[str, Any]:
        """``d`` with underscored keys; ConfigError naming ``source`` for an unknown key."""
        known = set(cls.field_names())
        out = {}
        for key, value in d.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"{source}: unknown setting {key!r}")
            out[name] = value
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> dict[str, Any]:
        """Read a JSON object of settings (validated keys, underscored); for ``--config``."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON (not UTF-8 text: {e.reason})") from e
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        except RecursionError as e:
            raise ConfigError(f"{path}: not valid JSON (nested too deeply)") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object of settings")
        return cls._settings(d, path)


def check_resume(resume: Any, out: Any) -> None:
    """``--resume`` continues the run in ``--out``: ConfigError without one."""
    if resume is True and not out:
        raise ConfigError("--resume needs --out (the run directory to resume)")


def parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"``/``"1e-3"`` -> float, ``"true"``/``"false"`` -> bool,
    ``"none"``/``"null"`` -> None, anything else -> the string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def parse_key_values(items: list[str], what: str) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: parse_value(v)}``; ConfigError for an item without ``=``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not key.isidentifier():
            raise ConfigError(f"invalid {what} {item!r}: expected KEY=VALUE")
        out[key] = parse_value(value)
    return out


def suggest(word: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to ``word``, else ``""``."""
    close = difflib.get_close_matches(str(word), sorted(set(choices)), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


#: Constructor arguments that are not settings a run can give (the loop passes ``model``;
#: ``params``/``base_optimizer`` are positional, ``defaults`` is the base class's plumbing).
_NOT_SETTINGS = frozenset({"self", "params", "base_optimizer", "defaults", "model"})


def _init_parameters(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:  # a subclass's **kwargs may pass its parent's arguments on
        init = klass.__dict__.get("__init__")
        if init is None or klass is object:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return names - _NOT_SETTINGS


def check_optimizer_name(name: str, what: str) -> str:
    """``name`` in lower case if it is registered, else ConfigError ``"{what} names no
    registered optimizer"`` with the nearest name and the registered ones (for names written
    in a recipe's method table or a ``--optimizers`` spec)."""
    from samkit.optim import list_optimizers

    names = list_optimizers()
    if name.lower() not in names:
        raise ConfigError(
            f"{what} names no registered optimizer{suggest(name.lower(), names)}; "
            f"registered: {', '.join(names)}"
        )
    return name.lower()


def optimizer_classes(optimizer: Any, base: Any) -> tuple[Any, type]:
    """The registry's :class:`~samkit.optim.OptimizerInfo` of ``optimizer`` and the class that
    takes its steps (the base optimizer of a sharpness-aware method, else the optimizer
    itself). ConfigError for a base the command line cannot name or an unknown optimizer."""
    from samkit.optim import BASE_OPTIMIZERS, get_optimizer_info, resolve_base_optimizer

    if isinstance(base, str) and base.lower() not in BASE_OPTIMIZERS:
        raise ConfigError(
            f"invalid base: {base!r} (choose one of {', '.join(sorted(BASE_OPTIMIZERS))})"
        )
    try:
        info = get_optimizer_info(optimizer)
        base_cls = resolve_base_optimizer(base)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from e
    return info, (base_cls if info.sharpness_aware else info.cls)


def accepted_kwargs(optimizer: str, base: str = "sgd") -> set[str]:
    """Keyword arguments ``samkit.create_optimizer(optimizer, base=base, ...)`` takes: a
    method's own and samkit's options plus the base optimizer's (``lr``, ``momentum``,
    ``betas``...); a plain optimizer's own."""
    info, step_cls = optimizer_classes(optimizer, base)
    return _init_parameters(info.cls) | _init_parameters(step_cls)


def optimizer_settings(config: TrainConfig) -> dict[str, Any]:
    """Keyword arguments for ``samkit.create_optimizer`` (without ``model``), every value
    explicit so that ``config.json`` records what the run used.

    In order, later entries winning: the method's class defaults (its
    :attr:`~samkit.optim.OptimizerInfo.hyperparameters`, the paper's values); ``lr`` and
    ``weight_decay``; ``momentum`` when the optimizer that takes the step accepts one (the
    base of a sharpness-aware method, else the optimizer itself); ``rho`` when set;
    ``opt_args``. A ``rho`` or an ``opt_args`` name the optimizer does not take is a
    :class:`ConfigError` (it would have no effect, or fail deep inside the constructor).
    """
    info, step_cls = optimizer_classes(config.optimizer, config.base)
    accepted = accepted_kwargs(config.optimizer, config.base)
    kwargs: dict[str, Any] = dict(info.hyperparameters)
    kwargs.update(lr=config.lr, weight_decay=config.weight_decay)
    if "momentum" in _init_parameters(step_cls):
        kwargs["momentum"] = config.momentum
    if config.rho is not None:
        if "rho" not in accepted:
            kind = "a plain optimizer" if not info.sharpness_aware else "a method"
            raise ConfigError(
                f"rho {config.rho:g} has no effect on optimizer {config.optimizer!r} ({kind} "
                "without a neighbourhood radius); drop it or choose a sharpness-aware method"
            )
        kwargs["rho"] = config.rho
    for key in config.opt_args:
        if key not in accepted:
            raise ConfigError(
                f"optimizer {config.optimizer!r} rejected its settings: it takes no argument "
                f"{key!r}{suggest(key, accepted)}"
            )
    kwargs.update(config.opt_args)
    return kwargs
