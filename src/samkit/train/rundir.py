"""The run directory (``--out``): what a run writes, when, and what it says when it cannot.

=================  ===========================================================================
``config.json``    written once when the run (or its resumption) starts: every setting, the
                   optimizer's resolved settings, data, model, versions, hardware
``metrics.jsonl``  rewritten from the checkpoint's history on start, then one line appended
                   per epoch (a failed append is cut back: never a partial line)
``checkpoint.pt``  every ``checkpoint_every`` epochs and at the last epoch, atomically
``summary.json``   at the end, atomically
=================  ===========================================================================

A :class:`RunDirectory` without a path writes nothing; one with ``write=False`` only reads
(the ranks other than 0 under distributed training).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from samkit.train.build import Run
from samkit.train.checkpoint import (
    CHECKPOINT_NAME,
    append_bytes,
    atomic_write_bytes,
    atomic_write_json,
    read_checkpoint,
    remove_stale_temp_files,
    run_checkpoint_path,
    save_checkpoint,
)
from samkit.train.config import ConfigError
from samkit.train.env import hardware_info, versions_info

__all__ = ["RunDirectory", "RunWriteError", "run_record"]


class RunWriteError(OSError):
    """A result file of the run could not be written (full disk, folder removed, ...).

    The message names ``--out`` and the file, and says what is still intact.
    """


def run_record(run: Run, resumed_from: int | None) -> dict[str, Any]:
    """What ``config.json`` holds: the run's settings and where it ran."""
    info, opt_info = run.data.info, run.opt_info
    return {
        "config": run.config.to_dict(),
        "optimizer_kwargs": _jsonable(run.opt_settings),
        "optimizer_info": {
            "name": opt_info.name,
            "description": opt_info.description,
            "sharpness_aware": opt_info.sharpness_aware,
            "passes": opt_info.passes,
            "reference": opt_info.reference,
        },
        "dataset": {**info.to_dict(), "label_noise_flipped": run.data.label_noise_flipped},
        "model": {"name": run.config.model, "params": run.num_params},
        "steps_per_epoch": run.steps_per_epoch,
        "world_size": run.procs.world_size,
        "distributed": (
            {
                "world_size": run.procs.world_size,
                "backend": run.procs.backend,
                "batch_per_process": run.config.batch_size // run.procs.world_size,
            }
            if run.procs.distributed
            else None
        ),
        "versions": versions_info(),
        "hardware": hardware_info(run.device),
        "resumed_from_epoch": resumed_from,
    }


class RunDirectory:
    """The files of one run in ``path`` (``None``: write nothing).

    Args:
        path: the run directory (``--out``), or ``None``.
        epochs: the run's planned length (for the messages of failed writes).
        write: ``False`` reads the checkpoint but writes nothing.
    """

    def __init__(self, path: str | Path | None, *, epochs: int, write: bool = True) -> None:
        self.path = Path(path) if path else None
        self.epochs = epochs
        self.write = write and self.path is not None
        self.saved_epoch = 0  # epoch of the checkpoint on disk

    def prepare(self, resume: bool) -> None:
        """Create the folder; refuse one that holds a run unless resuming; clean up the temp
        files of a process killed while writing. ConfigError naming ``--out`` if unusable."""
        out = self.path
        if out is not None and resume:
            run_checkpoint_path(out)  # a run to resume, before anything is created
        if not self.write or out is None:
            return
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create --out {out}: {e.strerror or e}") from e
        if not resume:
            taken = [n for n in (CHECKPOINT_NAME, "metrics.jsonl") if (out / n).exists()]
            if taken:
                raise ConfigError(
                    f"--out {out} already holds a run ({taken[0]}); use --resume to continue "
                    "it or choose another --out"
                )
        if not os.access(out, os.W_OK):
            raise ConfigError(f"cannot write to --out {out}: permission denied")
        remove_stale_temp_files(out)  # left by a process killed while writing

    def read_checkpoint(self) -> dict[str, Any]:
        """The checkpoint to resume from (CheckpointError if missing or damaged); only with a
        path (``TrainConfig.validate``: ``--resume`` needs ``--out``)."""
        assert self.path is not None
        ckpt = read_checkpoint(run_checkpoint_path(self.path), map_location="cpu")
        self.saved_epoch = int(ckpt["epoch"])
        return ckpt

    def start(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Write ``config.json``; rewrite ``metrics.jsonl`` from ``history`` (the checkpoint's:
        this drops epochs that ran after the last checkpoint of an interrupted run)."""
        if not self.write:
            return
        assert self.path is not None
        try:
            atomic_write_json(self.path / "config.json", record)
            text = "".join(json.dumps(row) + "\n" for row in history)
            atomic_write_bytes(self.path / "metrics.jsonl", text.encode())
        except OSError as e:
            raise ConfigError(f"cannot write to --out {self.path}: {e.strerror or e}") from e

    def append_metrics(self, row: dict[str, Any]) -> None:
        self._write(append_bytes, "metrics.jsonl", (json.dumps(row) + "\n").encode())

    def save_checkpoint(self, payload: dict[str, Any]) -> None:
        self._write(save_checkpoint, CHECKPOINT_NAME, payload)
        self.saved_epoch = int(payload["epoch"])

    def write_summary(self, summary: dict[str, Any]) -> None:
        self._write(atomic_write_json, "summary.json", summary)

    def _write(self, write: Callable[[Path, Any], None], name: str, data: Any) -> None:
        """``write(path / name, data)``; an OSError (full disk, folder removed, ...) becomes a
        :class:`RunWriteError` naming ``--out`` and the file and saying what is intact."""
        if not self.write:
            return
        assert self.path is not None
        target = self.path / name
        try:
            write(target, data)
        except OSError as e:
            raise RunWriteError(
                e.errno,
                f"cannot write --out {self.path}: {name}: {e.strerror or e}{self._intact()}",
            ) from e

    def _intact(self) -> str:
        """What is left to the user after a failed write."""
        assert self.path is not None
        if not self.path.is_dir():
            return " (the folder is gone); no result of this run is left"
        saved = self.saved_epoch
        if not saved or not (self.path / CHECKPOINT_NAME).is_file():
            return "; no checkpoint was written yet"
        if saved >= self.epochs:
            return f"; {CHECKPOINT_NAME} of the final epoch {saved} is intact"
        return f"; {CHECKPOINT_NAME} of epoch {saved} is intact: continue with --resume"


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    """Values as JSON can hold them (repr for anything exotic)."""
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            out[k] = repr(v)
    return out
