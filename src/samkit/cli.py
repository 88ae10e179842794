"""The ``samkit`` command line: ``samkit train``, ``samkit list``, ``samkit bench``,
``samkit report``, ``samkit sharpness``, ``samkit landscape`` (more subcommands plug in).

Each subcommand is one :class:`Subcommand` entry in :data:`SUBCOMMANDS`: a function that adds
its arguments to its parser and a function that runs it and returns the exit code. Adding a
subcommand is local: write the two functions and append one entry.

Errors the user can fix (bad arguments, invalid values, missing files, unwritable output) are
reported as one line, ``samkit: error: ...``, on stderr with exit code 2 — no traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = ["SUBCOMMANDS", "Subcommand", "UsageError", "build_parser", "main"]

PROG = "samkit"


class UsageError(Exception):
    """A problem the user can fix: reported as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line on stderr (exit code 2), no usage dump."""

    def error(self, message: str) -> NoReturn:
        _fail(message)


def _fail(message: Any, code: int = 2) -> NoReturn:
    _report(message)
    sys.exit(code)


@dataclasses.dataclass(frozen=True)
class Subcommand:
    """One ``samkit NAME`` subcommand."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# ----------------------------------------------------------------------------- run scope


def _add_run_scope_arguments(p: argparse.ArgumentParser) -> None:
    """The settings of one run that ``samkit train`` takes and ``samkit bench`` gives every run
    of its sweep, declared once for both. They default to SUPPRESS (the namespace holds only
    what was given: a run keeps its recipe's value otherwise); :func:`_run_scope` reads back
    the ones given."""
    from samkit.train.data import DATASETS

    S = argparse.SUPPRESS
    with_files = [
        f"{name} ({spec.files})" for name, spec in DATASETS.items() if spec.needs_data_dir
    ]
    tiny = [name for name, spec in DATASETS.items() if spec.cpu_threads == 1]
    g = p.add_argument_group("run scope (samkit bench gives these to every run)")
    actions = [
        g.add_argument("--data-dir", default=S, metavar="DIR",
                       help=f"folder with the files of {', '.join(with_files)}; nothing is "
                            "downloaded"),
        g.add_argument("--device", default=S,
                       help="auto, cpu, cuda, cuda:1, ... (default: the recipe's, else auto)"),
        g.add_argument("--limit-train", default=S, type=int, metavar="N",
                       help="use only the first N training samples (quick runs)"),
        g.add_argument("--limit-test", default=S, type=int, metavar="N",
                       help="use only the first N test samples"),
        g.add_argument("--track-sharpness", default=S, type=int, metavar="N",
                       help="every N epochs record lambda_max, the Hessian trace and the "
                            "gradient/eigenvector alignment in metrics.jsonl (samkit report "
                            "plots lambda_max; default 0: off)"),
        # Not a setting of the run's computation: the process's, never in config.json.
        g.add_argument("--threads", default=S, type=int, metavar="N",
                       help=f"torch CPU threads of a run (default: samkit train: 1 for "
                            f"{', '.join(tiny)} on a CPU, else torch's choice; samkit bench: 1, "
                            "its runs share the cores, or --cpus-per-run with --executor ray)"),
    ]  # fmt: skip
    p.set_defaults(_run_scope=tuple(a.dest for a in actions))


def _run_scope(args: argparse.Namespace) -> dict[str, Any]:
    """The run-scope settings given on the command line (``--threads`` included)."""
    return {dest: getattr(args, dest) for dest in args._run_scope if hasattr(args, dest)}


# ----------------------------------------------------------------------------- samkit train


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    import samkit
    from samkit.optim import BASE_OPTIMIZERS
    from samkit.train import list_models
    from samkit.train.config import AMP_MODES, SCHEDULES
    from samkit.train.data import DATASETS
    from samkit.train.recipes import DEFAULT_RECIPE, recipe_config

    # The defaults shown are the values `samkit train` uses: the default recipe's.
    d = recipe_config(DEFAULT_RECIPE)
    # Every option defaults to SUPPRESS: the namespace holds only what was given, so the
    # layers recipe < checkpoint (--resume) < --config file < flags merge cleanly.
    S = argparse.SUPPRESS

    g = p.add_argument_group("recipe")
    g.add_argument("--recipe", default=None, action="append", metavar="NAME|FILE",
                   help=f"an embedded recipe (`samkit list recipes`) or a TOML file: task, "
                        f"model, training settings and per-method hyperparameters; repeat to "
                        f"layer (later wins); flags override it (default {DEFAULT_RECIPE})")  # fmt: skip

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=S, choices=list(DATASETS), help=f"(default {d.dataset})")
    g.add_argument("--label-noise", default=S, type=float, metavar="P",
                   help="symmetric label noise: each training label becomes a random other "
                        f"class with probability P (default {d.label_noise:g})")  # fmt: skip
    g.add_argument("--augment", default=S, action=argparse.BooleanOptionalAction,
                   help="random crop + flip (default: on for "
                        f"{', '.join(n for n, spec in DATASETS.items() if spec.augment)}, "
                        "off otherwise)")  # fmt: skip
    g.add_argument("--cutout", default=S, type=int, metavar="N", help="cutout square side")
    g.add_argument("--val-fraction", default=S, type=float, metavar="F",
                   help="hold out this fraction of the training data as the validation split "
                        "(stratified, the same samples for every seed and method, clean labels; "
                        f"0: none; default {d.val_fraction:g})")  # fmt: skip
    g.add_argument("--val-target", default=S, type=_float_or_none, metavar="ACC",
                   help="validation accuracy (a fraction) whose first epoch summary.json "
                        "records as time_to_target; none: no target (default: the recipe's, "
                        f"{_or_none(d.val_target)})")  # fmt: skip

    g = p.add_argument_group("model")
    g.add_argument("--model", default=S, choices=list_models(),
                   help=f"(default {d.model}: the recipe's, else the dataset's)")  # fmt: skip
    g.add_argument("--model-arg", default=S, action="append", metavar="KEY=VALUE",
                   help="model keyword argument, e.g. depth=16 (repeatable)")  # fmt: skip

    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=S, choices=samkit.list_optimizers(), metavar="NAME",
                   help=f"one of {', '.join(samkit.list_optimizers())} "
                        f"(default {d.optimizer}; see `samkit list optimizers`)")  # fmt: skip
    g.add_argument("--base", default=S, metavar="NAME",
                   help=f"base optimizer of a sharpness-aware method: one of "
                        f"{', '.join(sorted(BASE_OPTIMIZERS))} (default {d.base})")  # fmt: skip
    g.add_argument("--rho", default=S, type=float,
                   help="neighbourhood radius (default: the recipe's [methods.NAME] value, "
                        "else the class's; `samkit list optimizers` shows both)")  # fmt: skip
    g.add_argument("--opt-arg", default=S, action="append", metavar="KEY=VALUE",
                   help="optimizer keyword argument (int/float/bool/str), repeatable")  # fmt: skip
    per_method = "; a recipe's [methods.NAME] table may set its own"
    g.add_argument("--lr", default=S, type=float, help=f"(default {d.lr:g}{per_method})")
    g.add_argument("--momentum", default=S, type=float,
                   help=f"(default {d.momentum:g}, for optimizers that take one)")  # fmt: skip
    g.add_argument("--weight-decay", default=S, type=float,
                   help=f"(default {d.weight_decay:g}{per_method})")  # fmt: skip
    g.add_argument("--schedule", default=S, choices=SCHEDULES,
                   help=f"lr schedule, per step (default {d.schedule})")  # fmt: skip
    g.add_argument("--label-smoothing", default=S, type=float,
                   help=f"(default {d.label_smoothing:g})")  # fmt: skip

    g = p.add_argument_group("run")
    g.add_argument("--epochs", default=S, type=int, help=f"(default {d.epochs})")
    g.add_argument("--batch-size", default=S, type=int,
                   help=f"samples per step (default {d.batch_size}); under torchrun the global "
                        "batch, split evenly between the processes")  # fmt: skip
    g.add_argument("--seed", default=S, type=int, help=f"(default {d.seed})")
    g.add_argument("--amp", default=S, choices=AMP_MODES, help="autocast dtype (default off)")
    g.add_argument("--accumulation-steps", default=S, type=int, metavar="K",
                   help="split every pass into K micro-batches (default 1)")  # fmt: skip
    g.add_argument("--compile", default=S, action=argparse.BooleanOptionalAction,
                   help="run the model through torch.compile (the model only; the optimizer "
                        "step stays eager; first steps are slower while it compiles)")  # fmt: skip

    g = p.add_argument_group("outputs")
    g.add_argument("--out", default=S, metavar="DIR",
                   help="run directory: config.json, metrics.jsonl, summary.json, "
                        "checkpoint.pt (default: write nothing)")  # fmt: skip
    g.add_argument("--resume", default=S, action="store_true",
                   help="continue the run in --out from its checkpoint.pt")  # fmt: skip
    g.add_argument("--checkpoint-every", default=S, type=int, metavar="N",
                   help="checkpoint every N epochs and at the end (default 1; 0: end only)")  # fmt: skip
    g.add_argument("--stop-after-epoch", default=S, type=int, metavar="E",
                   help="stop after epoch E with a checkpoint; a later --resume continues "
                        "to --epochs unless it gives its own --stop-after-epoch")  # fmt: skip
    g.add_argument("--sharpness-samples", default=S, type=int, metavar="N",
                   help="training samples used for --track-sharpness (default 512)")  # fmt: skip
    g.add_argument("--config", default=None, metavar="FILE.json",
                   help="deprecated (use --recipe FILE.toml): a JSON object of settings, "
                        "above the recipe, below the flags")  # fmt: skip
    g.add_argument("--no-progress", action="store_true",
                   help="one line per epoch instead of a progress bar (the default when the "
                        "output is not a terminal)")  # fmt: skip
    g.add_argument("--quiet", action="store_true", help="print only the final line")
    _add_run_scope_arguments(p)


def _float_or_none(text: str) -> float | None:
    """A number, or ``none``/``null`` for none (for flags whose setting may be unset)."""
    if text.strip().lower() in ("none", "null"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (a number or none)") from None


def _or_none(value: Any) -> str:
    return "none" if value is None else f"{value:g}"


def _train_config_from_args(args: argparse.Namespace) -> Any:
    """TrainConfig from recipe < checkpoint (--resume) < --config file < flags
    (:func:`samkit.train.recipes.run_config`)."""
    from samkit.train import TrainConfig
    from samkit.train.config import parse_key_values
    from samkit.train.recipes import run_config

    flags = {
        k: v
        for k, v in vars(args).items()
        if k not in ("command", "config", "recipe", "no_progress", "quiet", "threads")
        and not k.startswith("_")
    }
    if "model_arg" in flags:
        flags["model_args"] = parse_key_values(flags.pop("model_arg"), "--model-arg")
    if "opt_arg" in flags:
        flags["opt_args"] = parse_key_values(flags.pop("opt_arg"), "--opt-arg")
    file_settings = TrainConfig.from_json_file(args.config) if args.config else {}
    return run_config(args.recipe, {**file_settings, **flags})


def _is_terminal() -> bool:
    """Whether a progress bar can redraw in place: stdout and stderr (the bar's) are ttys."""
    return all(getattr(stream, "isatty", lambda: False)() for stream in (sys.stdout, sys.stderr))


def _run_train(args: argparse.Namespace) -> int:
    """``samkit train``; under torchrun, also decides which process reports what."""
    return _on_every_process(_train, args)


def _on_every_process(run: Callable[[argparse.Namespace, Any], int], args: Any) -> int:
    """``run(args, launch)`` in this process; under torchrun (every process runs the same
    command) its errors end this process as :func:`_exit_one_of_many` says."""
    from samkit.train.distributed import launch_from_env

    launch = launch_from_env()
    if not launch.distributed:
        return run(args, launch)
    import signal

    def stopped(_signum: int, _frame: Any) -> None:
        raise _Stopped()

    # torchrun stops the others when one fails; once the command is over (reported, or the
    # process group being left), SIGTERM ends the process as it would have.
    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        return run(args, launch)
    except BaseException as e:
        _exit_one_of_many(e, launch)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _on_rank_zero(run: Callable[[argparse.Namespace], int], args: Any) -> int:
    """``run(args)`` on rank 0 alone, for a command whose work is not split between
    processes: under torchrun (every process runs the same command) the others do nothing,
    write and print nothing, and end with 0; rank 0 reports its errors as one process."""
    from samkit.train.distributed import launch_from_env

    return run(args) if launch_from_env().is_main else 0


class _Stopped(BaseException):  # like KeyboardInterrupt: not caught by `except Exception`
    """This process was sent SIGTERM (by torchrun, after another process failed)."""


def _exit_one_of_many(error: BaseException, launch: Any) -> NoReturn:
    """How one process of a torchrun launch ends after ``error``: one line each, no hang.

    An error every process raised alike (a setting, a damaged checkpoint; marked
    ``samkit_agreed``) is printed once, by rank 0. An error of this process alone is printed
    with its rank. A process stopped because another one failed says so in one line. A bug
    keeps its traceback.
    """
    from samkit.optim import NonFiniteError
    from samkit.train import CheckpointError, ConfigError, RunWriteError, UnsafePickleError
    from samkit.train.distributed import PeerFailure

    where = f"rank {launch.rank} of {launch.world_size}"
    if isinstance(error, SystemExit):  # already reported (by rank 0 only, see _train)
        raise error
    if getattr(error, "samkit_agreed", False):
        if launch.is_main and not isinstance(error, PeerFailure):
            raise error  # main() reports it as for one process
        if launch.is_main:
            _fail(str(error), code=1)
        sys.exit(2 if isinstance(error, (ConfigError, CheckpointError)) else 1)
    if isinstance(error, RunWriteError):
        _fail(f"{where}: {error.strerror}")
    if isinstance(error, (ConfigError, CheckpointError, UnsafePickleError)):
        _fail(f"{where}: {error}")
    if isinstance(error, NonFiniteError):
        _fail(f"{where}: training diverged: {error}", code=1)
    if isinstance(error, KeyboardInterrupt):
        _fail(f"{where}: interrupted", code=130)
    if isinstance(error, _Stopped):
        _fail(f"{where}: stopped by the launcher (another process failed, or the job was "
              "cancelled)", code=143)  # fmt: skip
    if _lost_a_peer(error):
        _fail(f"{where}: stopped: another process of this run failed (its message is above)")
    raise error


def _lost_a_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another process went away."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    )


def _train(args: argparse.Namespace, launch: Any) -> int:
    import torch

    from samkit.optim import NonFiniteError
    from samkit.train import train
    from samkit.train.data import dataset_spec
    from samkit.train.env import check_threads
    from samkit.train.progress import count

    threads = _run_scope(args).get("threads")
    try:  # every process reads the same flags, files and checkpoint: the same errors
        config = _train_config_from_args(args)
        check_threads(threads)
    except Exception as e:
        e.samkit_agreed = True  # type: ignore[attr-defined]
        raise
    if threads is None and config.device in ("auto", "cpu"):
        threads = dataset_spec(config.dataset).cpu_threads
    if threads is not None:
        torch.set_num_threads(threads)
    log = None if args.quiet else print
    bar = not (args.quiet or args.no_progress) and _is_terminal()
    try:
        summary = train(config, progress=bar, log=log)
    except NonFiniteError as e:
        if launch.distributed:
            raise  # reported with its rank
        _fail(f"training diverged: {e}", code=1)
    except KeyboardInterrupt:  # every process gets Ctrl-C: rank 0 says it
        if not launch.is_main:
            sys.exit(130)
        hint = " (continue with --resume)" if config.out else ""
        _fail(f"interrupted{hint}", code=130)
    if not launch.is_main:
        return 0
    # Nothing here is chosen by test accuracy: the best epoch is the validation split's.
    line = f"test accuracy {100 * summary['test_acc']:.2f}%"
    if summary["val_acc"] is not None:
        line += (
            f" | validation {100 * summary['val_acc']:.2f}% (best "
            f"{100 * summary['best_val_acc']:.2f}% at epoch {summary['best_val_epoch']})"
        )
    reached = summary["time_to_target"]
    if reached is not None:
        target = f"target {100 * reached['target']:.4g}%"
        line += (
            f" | {target} at epoch {reached['epoch']}"
            if reached["epoch"] is not None
            else f" | {target} not reached"
        )
    line += (
        f" | {count(summary['epochs'], 'epoch')}, {summary['train_time_s']:.1f} s training, "
        f"{count(float(summary['grad_evals']), 'gradient evaluation')}"
    )
    if not summary["completed"]:
        line += f" | stopped after epoch {summary['epochs']} of {summary['epochs_planned']}"
    if summary["out"]:
        line += f" | saved in {summary['out']}"
    print(line)
    return 0


# ----------------------------------------------------------------------------- samkit list


def _add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "what",
        nargs="?",
        choices=["optimizers", "recipes", "models", "datasets", "all"],
        default="all",
        help="what to list (default all)",
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="NAME|FILE",
        help="show the optimizer values (and search spaces) this recipe uses (default: the "
        "default recipe)",
    )
    p.add_argument(
        "--search-spaces",
        action="store_true",
        help="with optimizers: each method's search space on the recipe's task (the ranges "
        "samkit bench --trials draws from: the method's own, its base optimizer's lr, the "
        "recipe's [search.NAME] overrides)",
    )


def _run_list(args: argparse.Namespace) -> int:
    from samkit.train.data import DATASETS
    from samkit.train.models import MODELS
    from samkit.train.recipes import (
        DEFAULT_RECIPE,
        defaults_rows,
        format_values,
        list_recipes,
        load_recipe,
    )

    if args.search_spaces and args.what not in ("optimizers", "all"):
        raise UsageError(f"--search-spaces lists optimizers, not {args.what}")
    if args.what in ("optimizers", "all"):
        recipe = load_recipe(args.recipe or DEFAULT_RECIPE)
        common = ", ".join(
            f"{k} {recipe.settings[k]}"
            for k in ("base", "lr", "momentum", "weight_decay")
            if k in recipe.settings
        )
        print(
            "optimizers (samkit train --optimizer NAME)\n"
            "  class:  the class's defaults, the paper's (samkit.create_optimizer(NAME, ...))\n"
            f"  recipe: what `samkit train --recipe {recipe.name}` passes (* = tuned for the "
            f"task); its runs use {common} unless a row says otherwise"
        )
        for row in defaults_rows(recipe.path):
            unit = "pass" if row.passes == 1 else "passes"
            kind = f"{row.passes:.3g} {unit} per step" if row.sharpness_aware else "baseline"
            print(f"  {row.name:<10} {row.description} ({kind})")
            cls = format_values(row.class_defaults) if row.sharpness_aware else "torch's"
            print(f"  {'':<10}   class:  {cls}")
            print(f"  {'':<10}   recipe: {format_values(row.recipe_values, row.class_defaults)}")
            if args.search_spaces:
                print(f"  {'':<10}   search: {'; '.join(d.describe() for d in row.search_space)}")
    if args.what in ("recipes", "all"):
        print("recipes (samkit train --recipe NAME, samkit bench --tasks NAME):")
        for name in list_recipes():
            suffix = " (default)" if name == DEFAULT_RECIPE else ""
            print(f"  {name:<24} {load_recipe(name).description}{suffix}")
    if args.what in ("models", "all"):
        print("models (--model NAME):")
        for name, m in MODELS.items():
            print(f"  {name:<12} {m.description}")
    if args.what in ("datasets", "all"):
        print("datasets (--dataset NAME):")
        for name, spec in DATASETS.items():
            print(f"  {name:<12} {spec.description}")
    return 0


# ----------------------------------------------------------------------------- samkit sharpness


def _add_measure_arguments(p: argparse.ArgumentParser, *, batch_size_help: str) -> None:
    """Options shared by ``samkit sharpness`` and ``samkit landscape``: the fixed subset."""
    p.add_argument("--batches", type=int, default=4, metavar="N",
                   help="number of training batches: the subset is the first N x M training "
                        "samples (default 4)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=128, metavar="M", help=batch_size_help)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, auto")


def _add_sharpness_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="run directory (--out of samkit train) or checkpoint file")  # fmt: skip
    p.add_argument("--rho", type=float, default=0.05,
                   help="radius of the worst/ascent/average-direction sharpness (default 0.05)")  # fmt: skip
    p.add_argument("--iters", type=int, default=30, metavar="K",
                   help="Lanczos iterations for lambda_max (default 30)")  # fmt: skip
    p.add_argument("--json", default=None, metavar="PATH",
                   help="where to write the results (default RUN_DIR/sharpness.json)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random vectors: Lanczos start, the trace's probes "
                        "(Hutch++), random directions (default 0)")  # fmt: skip
    _add_measure_arguments(
        p,
        batch_size_help="samples per batch (default 128); it is the m of m-sharpness: the "
        "worst- and ascent-direction sharpness are maximised per batch, then averaged "
        "(lambda_max, the trace and the average-direction sharpness do not depend on it); "
        "under torchrun each process measures whole batches of M, so m stays M",
    )


def _run_sharpness(args: argparse.Namespace) -> int:
    """``samkit sharpness``; under torchrun every process measures its share of the subset
    and rank 0 prints and writes."""
    return _on_every_process(_sharpness, args)


def _sharpness(args: argparse.Namespace, launch: Any) -> int:
    from samkit.train.measure import format_table, measure_sharpness

    try:
        record = measure_sharpness(
            args.run, rho=args.rho, batches=args.batches, batch_size=args.batch_size,
            iters=args.iters, seed=args.seed, json_path=args.json, device=args.device,
        )  # fmt: skip
    except KeyboardInterrupt:  # every process gets Ctrl-C: rank 0 says it
        if not launch.is_main:
            sys.exit(130)
        _fail("interrupted (nothing was written)", code=130)
    if launch.is_main:
        print(format_table(record))
        print(f"saved {record['json']}")
    return 0


# ----------------------------------------------------------------------------- samkit landscape


def _add_landscape_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="CHECKPOINT", help="run directory or checkpoint file")
    p.add_argument("--2d", dest="two_d", action="store_true",
                   help="2-D contour over two random directions (default: 1-D line)")  # fmt: skip
    p.add_argument("--other", default=None, metavar="CHECKPOINT",
                   help="interpolate linearly from CHECKPOINT (0) to this one (1)")  # fmt: skip
    p.add_argument("--steps", type=int, default=21, metavar="N",
                   help="grid points per axis, 2 to 1001 (default 21)")  # fmt: skip
    p.add_argument("--span", type=float, default=None, metavar="S",
                   help="grid over [-S, S] along each filter-normalised direction (default 1; "
                        "not with --other, which runs from 0 to 1)")  # fmt: skip
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the PNG and the JSON grid (default: the run directory)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random directions (default 0)")  # fmt: skip
    _add_measure_arguments(
        p,
        batch_size_help="samples evaluated at a time (default 128); the loss is the mean over "
        "all N x M samples, so M changes only memory and speed, and the subset's size",
    )


def _run_landscape(args: argparse.Namespace) -> int:
    """``samkit landscape``; under torchrun rank 0 alone measures and writes (the landscapes
    of :mod:`samkit.sharpness` evaluate on one process: the others would only repeat it)."""
    return _on_rank_zero(_landscape, args)


def _landscape(args: argparse.Namespace) -> int:
    from samkit.train.measure import landscape

    try:
        res = landscape(
            args.run, two_d=args.two_d, other=args.other, steps=args.steps, span=args.span,
            out=args.out, batches=args.batches, batch_size=args.batch_size, seed=args.seed,
            device=args.device,
        )  # fmt: skip
    except KeyboardInterrupt:
        _fail("interrupted (the plot and its JSON were not written)", code=130)
    losses = res["losses"]
    flat = [x for row in losses for x in row] if losses and isinstance(losses[0], list) else losses
    print(
        f"{res['settings']['kind']}: {len(flat)} points, loss from {min(flat):.4g} to "
        f"{max(flat):.4g} | saved {res['png']} and {res['json']}"
    )
    return 0


# ----------------------------------------------------------------------------- samkit bench


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from samkit.bench import BUDGETS
    from samkit.bench.executors import EXECUTORS
    from samkit.bench.executors.local import ISOLATIONS
    from samkit.train.recipes import DEFAULT_RECIPE

    p.add_argument("--optimizers", nargs="+", required=True, metavar="NAME[:KEY=VALUE,...]",
                   help="optimizers to compare, the first is the reference of the paired "
                        "differences; e.g. sgd sam fsam:rho=0.05,lr=0.1; `all`: every "
                        "registered one, sgd first")  # fmt: skip
    p.add_argument("--tasks", nargs="+", default=[DEFAULT_RECIPE], metavar="RECIPE",
                   help="tasks: embedded recipes (mnist1d, mnist1d-noisy, digits, cifar10, "
                        "cifar100, ...; `samkit list recipes`) or TOML files (default "
                        f"{DEFAULT_RECIPE}, the recipe of samkit train)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="run seeds 0..N-1 (default 5; with --trials, of the chosen "
                        "settings)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="folder of the sweep")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of every task (default: each recipe's)")  # fmt: skip
    p.add_argument("--budget", choices=[*BUDGETS, "both"], default="equal-epochs",
                   help="equal-epochs (default), equal-grad-evals (cheaper methods run more "
                        "epochs to match the most expensive one's gradient evaluations), or "
                        "both views")  # fmt: skip
    p.add_argument("--recipe", action="append", default=[], metavar="NAME|FILE",
                   help="a recipe laid over every task (e.g. tuned [methods.NAME] tables); "
                        "repeatable")  # fmt: skip
    p.add_argument("--trials", type=int, default=0, metavar="K",
                   help="tune first: K settings per method and task from the method's search "
                        "space (a scrambled Sobol sequence, the same for every method), the "
                        "best validation accuracy chosen, then run with --seeds; records "
                        "DIR/tuning.json (default 0: no tuning, the recipes' values)")  # fmt: skip
    p.add_argument("--time-to-target", action="store_true",
                   help="every task must declare a validation target (checked before any "
                        "run); samkit report then shows time-to-target and a performance "
                        "profile")  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="a first look in seconds (and for tests): 3 seeds, 3 epochs of the "
                        "first 512 training samples in batches of 32, the first 256 test "
                        "samples; each only where not given")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    g = p.add_argument_group("where the runs execute")
    g.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="local (default): worker processes on this machine; ray: one Ray task "
                        "per run on a Ray cluster (pip install \"samkit[ray]\")")  # fmt: skip
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="local: runs in parallel, each in its own process (default 1)")  # fmt: skip
    g.add_argument("--isolation", choices=ISOLATIONS, default=None,
                   help="local: auto (default): fork CPU runs from a process that has the data "
                        "in memory, a fresh Python process otherwise")  # fmt: skip
    g.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="ray: the cluster to use, HOST:PORT of its head node or auto (the one "
                        "`ray start` started on this machine, or $RAY_ADDRESS); default: a Ray "
                        "instance started on this machine for the sweep")  # fmt: skip
    g.add_argument("--cpus-per-run", type=int, default=None, metavar="N",
                   help="ray: CPUs each run reserves, also its torch threads (default 1)")  # fmt: skip
    g.add_argument("--gpus-per-run", type=float, default=None, metavar="G",
                   help="ray: GPUs each run reserves (default 0; 0.5: two runs share one)")  # fmt: skip
    g.add_argument("--max-retries", type=int, default=None, metavar="N",
                   help="ray: times a run whose worker process or node died is started again, "
                        "resuming from its checkpoint (default 2)")  # fmt: skip
    _add_run_scope_arguments(p)


def _run_bench(args: argparse.Namespace) -> int:
    import shlex

    from samkit.bench import SweepError, bench
    from samkit.bench.plan import plural

    settings = _run_scope(args)  # every run gets them; threads are its process's
    threads = settings.pop("threads", None)
    command = shlex.join(["samkit", *args._argv])
    try:
        results = bench(
            args.out, args.tasks, args.optimizers, args.seeds, budget=args.budget,
            epochs=args.epochs, recipes=args.recipe, extra=settings, trials=args.trials,
            time_to_target=args.time_to_target, quick=args.quick, workers=args.workers,
            threads=threads, isolation=args.isolation, executor=args.executor,
            ray_address=args.ray_address, cpus_per_run=args.cpus_per_run,
            gpus_per_run=args.gpus_per_run, max_retries=args.max_retries, command=command,
            progress=not args.quiet,
        )  # fmt: skip
    except SweepError as e:
        raise UsageError(str(e)) from e
    except KeyboardInterrupt as e:  # Stopped (SIGTERM, SIGINT), or Ctrl-C before the sweep
        import signal

        signum = getattr(e, "signum", signal.SIGINT)
        _fail(f"stopped by {signal.Signals(signum).name}: the runs that finished are kept; run "
              f"the same command again to resume the others ({args.out})", code=128 + signum)  # fmt: skip
    failed = [r for r in results if r.status == "failed"]
    skipped = sum(r.status == "skipped" for r in results)
    line = f"{plural(len(results), 'run')}: {len(results) - len(failed)} finished"
    if skipped:
        line += f" ({skipped} before this command)"
    if failed:
        line += f", {len(failed)} failed (see above)"
    # A trial that fails (e.g. diverges at a large learning rate) is an outcome of the
    # search, not of the sweep: the sweep fails when a final run fails, or when a method
    # has no finished trial to choose.
    searches: dict[tuple[str, str], list[bool]] = {}
    for r in results:
        if r.run.tuning:
            searches.setdefault((r.run.task, r.run.spec.text), []).append(r.status == "failed")
    unchosen = [f"{task} {spec}" for (task, spec), fails in searches.items() if all(fails)]
    if unchosen:
        line += f"; no trial finished, nothing chosen: {', '.join(unchosen)}"
    cpu = [r.cpu_seconds for r in results if r.cpu_seconds is not None]
    if cpu:
        line += f" | {sum(cpu) / 60:.1f} CPU minutes"
    print(f"{line} | results in {args.out} | next: samkit report {args.out}")
    return 1 if unchosen or any(not r.run.tuning for r in failed) else 0


# ----------------------------------------------------------------------------- samkit report


def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    from samkit.bench.report import TIME_MEASURES

    p.add_argument("dir", metavar="DIR", help="folder of a samkit bench sweep")
    p.add_argument("--docs", default=None, metavar="FILE.md",
                   help="also write the report into FILE.md between its samkit report "
                        "markers, figures in FILE_figures/")  # fmt: skip
    p.add_argument("--time-measure", choices=list(TIME_MEASURES), default="grad_evals",
                   help="time of the performance profile across tasks: grad_evals "
                        "(default: gradient evaluations, the same on any machine), epoch, "
                        "or wall_s (noisy on a shared machine)")  # fmt: skip
    p.add_argument("--time-to-target", action="store_true",
                   help="require a validation target on every task (default: when the "
                        "sweep was run with --time-to-target)")  # fmt: skip
    p.add_argument("--target", action="append", default=[], metavar="TASK=ACC",
                   help="the validation target of TASK (an accuracy in (0, 1]) instead of "
                        "the one its runs declared, e.g. set from the tuned reference "
                        "after the sweep; repeatable")  # fmt: skip


def _run_report(args: argparse.Namespace) -> int:
    from samkit.bench import SweepError, write_report

    targets = {}
    for item in args.target:
        task, sep, value = item.partition("=")
        try:
            targets[task] = float(value)
        except ValueError:
            sep = ""
        if not sep or not task:
            raise UsageError(f"invalid --target {item!r} (expected TASK=ACC, e.g. mnist1d=0.92)")
    try:
        res = write_report(args.dir, docs=args.docs, time_measure=args.time_measure,
                           time_to_target=args.time_to_target or None,
                           targets=targets)  # fmt: skip
    except (SweepError, ValueError) as e:
        raise UsageError(str(e)) from e
    line = f"wrote {res['markdown']}, {res['html']} and {len(res['figures'])} figures"
    if "docs" in res:
        line += f"; updated {res['docs']}"
    print(line)
    return 0


# ----------------------------------------------------------------------------- registry

#: The subcommands, in ``samkit --help`` order. Add one entry to add a subcommand.
SUBCOMMANDS: list[Subcommand] = [
    Subcommand(
        "train",
        "train a model (default: the embedded MNIST-1D SAM recipe)",
        _add_train_arguments,
        _run_train,
    ),  # fmt: skip
    Subcommand(
        "list",
        "list the registered optimizers, models and datasets",
        _add_list_arguments,
        _run_list,
    ),  # fmt: skip
    Subcommand(
        "bench",
        "train every optimizer x task x seed as resumable runs (parallel), for samkit report",
        _add_bench_arguments,
        _run_bench,
    ),  # fmt: skip
    Subcommand(
        "report",
        "tables (mean, 95% CI, paired differences), plots and an HTML page of a bench folder",
        _add_report_arguments,
        _run_report,
    ),  # fmt: skip
    Subcommand(
        "sharpness",
        "measure the sharpness of a trained run (lambda_max, trace, m-sharpness, alignment)",
        _add_sharpness_arguments,
        _run_sharpness,
    ),  # fmt: skip
    Subcommand(
        "landscape",
        "plot the loss landscape around a checkpoint (1-D, 2-D) or between two",
        _add_landscape_arguments,
        _run_landscape,
    ),  # fmt: skip
]


def build_parser() -> argparse.ArgumentParser:
    """The ``samkit`` parser with every registered subcommand."""
    import samkit

    parser = _Parser(prog=PROG, description="Sharpness-aware training for PyTorch.")
    parser.add_argument("--version", action="version", version=f"samkit {samkit.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in SUBCOMMANDS:
        # argparse formats help strings with %: a literal % in a subcommand's help is escaped
        p = sub.add_parser(cmd.name, help=cmd.help.replace("%", "%%"), description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``samkit`` command; returns the exit code."""
    try:
        return _main(argv)
    finally:
        _release_process_group()


def _release_process_group() -> None:
    """Leave the process group ``samkit train`` or ``samkit sharpness`` joined (under
    torchrun) if an error left it joined, now that the error (which holds the run, whose DDP
    model holds the group) is dropped: its threads are joined while Python is alive, not
    during the interpreter's shutdown (:func:`samkit.train.distributed.processes` says why
    that aborts). A group the caller joined before calling :func:`main` stays joined."""
    if "samkit.train.distributed" not in sys.modules:  # nothing can have joined one
        return
    from samkit.train.distributed import leave_process_group

    leave_process_group()


def _main(argv: Sequence[str] | None) -> int:
    from samkit.train import (
        CheckpointError,
        ConfigError,
        RunWriteError,
        TrainWarning,
        UnsafePickleError,
    )

    parser = build_parser()
    with warnings.catch_warnings():
        warnings.showwarning = _warning_printer(warnings.showwarning, TrainWarning)
        try:
            args = parser.parse_args(argv)
            args._argv = list(sys.argv[1:] if argv is None else argv)
            if getattr(args, "_run", None) is None:
                parser.print_help()
                return 2
            return int(args._run(args))
        except SystemExit as e:  # argparse (--help, errors) and _fail()
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except RunWriteError as e:  # its message names --out, the file and what is intact
            return _report(e.strerror)
        except (UsageError, ConfigError, CheckpointError, UnsafePickleError) as e:
            return _report(e)  # the user can fix these: one line, no traceback
        except OSError as e:
            if e.errno is None:  # raised with a message of its own (e.g. a missing --data-dir)
                return _report(e)
            where = f" {e.filename}" if getattr(e, "filename", None) else ""
            return _report(f"cannot write or read{where}: {e.strerror or e}")


def _warning_printer(default: Callable[..., None], category: type[Warning]) -> Callable[..., None]:
    """``warnings.showwarning`` that prints ``category`` as one line, ``samkit: warning: ...``
    on stderr, and leaves every other warning to ``default``."""

    def show(message: Any, cat: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(cat, category):
            sys.stderr.write(f"{PROG}: warning: {' '.join(str(message).split())}\n")
        else:
            default(message, cat, *args, **kwargs)

    return show


def _report(error: Any) -> int:
    """``samkit: error: ...`` on stderr, one line whatever the message holds; exit code 2."""
    sys.stderr.write(f"{PROG}: error: {' '.join(str(error).split())}\n")
    return 2
