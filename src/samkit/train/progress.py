"""What a run shows while it trains: a header, then a tqdm bar or one line per epoch.

With a bar, each epoch's bar shows the running training loss and accuracy and, once the epoch
is evaluated, its test accuracy; it stays on screen when the epoch ends. Without one (no
terminal, ``--no-progress``, tqdm not installed) every epoch prints one line. Under
distributed training only rank 0 shows anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["EpochDisplay", "count", "header_lines"]

Log = Callable[[str], None]

#: Steps between two refreshes of the bar's running loss and accuracy (each one syncs).
REFRESH_EVERY = 8


def count(n: float, noun: str, plural: str | None = None) -> str:
    """``count(1, "epoch")`` -> ``"1 epoch"``, ``count(2, "epoch")`` -> ``"2 epochs"``."""
    word = noun if n == 1 else (plural or noun + "s")
    return f"{n:g} {word}" if isinstance(n, float) else f"{n} {word}"


def header_lines(run: Any, record: dict[str, Any], resumed_at: int | None) -> tuple[str, str]:
    """The two lines a run starts with: what it trains, and where."""
    config, info = run.config, run.data.info
    settings = run.opt_settings
    rho_text = f", rho {settings['rho']:g}" if "rho" in settings else ""
    what = (
        f"samkit train | {config.optimizer} (base {config.base}{rho_text}) | "
        f"{info.name} ({_sizes(info)}) | {config.model} "
        f"({run.num_params:,} params) | {count(config.epochs, 'epoch')} x "
        f"{count(run.steps_per_epoch, 'step')} | seed {config.seed}"
    )
    hw, ver, dist = record["hardware"], record["versions"], record.get("distributed")
    processes = (
        f" x {dist['world_size']} processes ({dist['backend']}, DDP, batch "
        f"{dist['batch_per_process']} each)"
        if dist
        else ""
    )
    where = (
        f"  {hw['device']}{processes} | {hw['cpu']} ({count(hw['cpu_cores'], 'core')})"
        + (f" | {hw['gpu']}" if hw["gpu"] else "")
        + f" | torch {ver['torch']} | samkit {ver['samkit']}"
        + (f" | resumed at epoch {resumed_at}" if resumed_at is not None else "")
    )
    return what, where


def _sizes(info: Any) -> str:
    """``3600 train / 400 val / 1000 test`` (no val part without a validation split)."""
    val = f" / {info.num_val} val" if info.num_val else ""
    return f"{info.num_train} train{val} / {info.num_test} test"


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional dependency: fall back to one line per epoch
        return None
    return tqdm


class EpochDisplay:
    """A tqdm bar per epoch (``bar=True`` and tqdm installed), else one line per epoch.

    Call :meth:`start` when an epoch starts, :meth:`step` after every step, :meth:`end`
    with the epoch's metrics row.
    """

    def __init__(self, *, bar: bool, log: Log, epochs: int, steps_per_epoch: int) -> None:
        self._tqdm = _tqdm() if bar else None
        self._log = log
        self._epochs = epochs
        self._steps = steps_per_epoch
        self._bar: Any = None
        self._done = 0

    @property
    def shows_bar(self) -> bool:
        return self._tqdm is not None

    def start(self, epoch: int) -> None:
        self._done = 0
        if self._tqdm is not None:
            self._bar = self._tqdm(
                desc=f"epoch {epoch}/{self._epochs}",
                total=self._steps,
                leave=True,
                dynamic_ncols=True,
                unit="step",
            )

    def step(self, stats: Callable[[], tuple[float, float | None]]) -> None:
        """One step done; ``stats()`` gives the running (loss, accuracy) when shown."""
        if self._bar is None:
            return
        if self._done % REFRESH_EVERY == 0 or self._done == self._steps - 1:
            loss, acc = stats()
            self._bar.set_postfix(loss=f"{loss:.4f}", acc=_fraction(acc), refresh=False)
        self._done += 1
        self._bar.update(1)

    def end(self, row: dict[str, Any]) -> None:
        """The epoch is evaluated: its validation and test accuracies join the bar, or its
        line is printed."""
        train_acc = row["train_acc"]  # None: no pass of the method covered a whole batch
        val_acc = row.get("val_acc")  # None: no validation split
        if self._bar is not None:
            shown = {"loss": f"{row['train_loss']:.4f}", "acc": _fraction(train_acc)}
            if val_acc is not None:
                shown["val_acc"] = f"{val_acc:.4f}"
            self._bar.set_postfix(**shown, test_acc=f"{row['test_acc']:.4f}")
            self._bar.close()
            self._bar = None
            return
        val = f"val acc {100 * val_acc:.2f}% | " if val_acc is not None else ""
        self._log(
            f"epoch {row['epoch']:>3}/{self._epochs} | train loss {row['train_loss']:.4f} "
            f"acc {_percent(train_acc)} | {val}test loss {row['test_loss']:.4f} "
            f"acc {100 * row['test_acc']:.2f}% | lr {row['lr']:.4g} | {row['seconds']:.2f}s"
        )


def _fraction(acc: float | None) -> str:
    """A training accuracy for the bar: ``n/a`` when the method's passes never covered a
    whole batch (no prediction of the batch to count, e.g. AUSAM's sub-batch passes)."""
    return "n/a" if acc is None else f"{acc:.3f}"


def _percent(acc: float | None) -> str:
    return "n/a" if acc is None else f"{100 * acc:.2f}%"
