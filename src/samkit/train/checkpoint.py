"""Checkpoints: written atomically, read with ``weights_only=True``, models rebuilt from them.

A checkpoint is a dict of plain tensors and containers only (no pickled classes), so that
``torch.load(path, weights_only=True)`` reads it::

    {"format": "samkit.train", "version": 1, "epoch": int,
     "config": TrainConfig.to_dict(), "dataset_info": DatasetInfo.to_dict(),
     "model": state_dict, "optimizer": state_dict, "scheduler": state_dict,
     "rng": {"torch": ByteTensor, "cuda": [ByteTensor], "numpy": {...}, "python": [...],
             "loader": ByteTensor, "augment": ByteTensor},
     "history": [metrics rows], "totals": {...}, "versions": {...}}
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import pickletools
import random
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from samkit.train.config import SETTINGS_ADDED, TrainConfig
from samkit.train.data import DatasetInfo
from samkit.train.models import create_model

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "append_bytes",
    "atomic_write_bytes",
    "atomic_write_json",
    "get_rng_state",
    "load_checkpoint",
    "read_checkpoint",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT = "samkit.train"
VERSION = 1
TMP_SUFFIX = ".samkit-tmp"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupted or not samkit's."""


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``write(fileobj)`` to a temp file in the same folder, fsync, rename.

    Readers see the old file or the new one, never a partial one; if anything fails the
    old file is untouched and the temp file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for everyone
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (best effort: not every platform can fsync a folder).
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def append_bytes(path: str | Path, data: bytes) -> None:
    """Append ``data`` to ``path``; if the write fails (a full disk), cut the file back to
    its previous length, so that it never ends in a partial line."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    start = os.fstat(fd).st_size
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
    except BaseException:
        with contextlib.suppress(OSError):
            os.truncate(path, start)
        raise


def remove_stale_temp_files(folder: str | Path) -> None:
    """Delete the temp files of atomic writes that a killed process left in ``folder``."""
    for stale in Path(folder).glob(f".*.*{TMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stale.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    _atomic_write(Path(path), lambda f: f.write(data))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Replace ``path`` with ``obj`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """``torch.save(payload)`` to ``path`` atomically (temp file, flush, fsync, replace)."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    _atomic_write(Path(path), lambda f: torch.save(payload, f))


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True``.

    ``path`` is the file or a run directory holding ``checkpoint.pt``. Raises
    :class:`CheckpointError` naming the file if it is missing, unreadable, truncated, or not
    a samkit training checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # a pickle that is not torch's: refused just below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zip errors, EOF, unpickling errors: say which, never torch's advice
        raise CheckpointError(
            f"cannot use checkpoint {path}: {_what_is_wrong(path, e)}. {_WHAT_TO_DO}"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"cannot use checkpoint {path}: it is a torch file but not a samkit training "
            f"checkpoint (samkit train writes those). {_WHAT_TO_DO}"
        )
    if ckpt.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer samkit (checkpoint version {ckpt['version']})"
        )
    for key in ("epoch", "config", "dataset_info", "model"):
        if key not in ckpt:
            raise CheckpointError(f"{path} is incomplete: no {key!r} entry")
    if isinstance(ckpt["config"], dict):  # an older run: the settings it had, not today's
        ckpt["config"] = {**SETTINGS_ADDED, **ckpt["config"]}
    return ckpt


def run_checkpoint_path(out: str | Path) -> Path:
    """The checkpoint a ``--resume`` of the run directory ``out`` continues from.

    Raises :class:`CheckpointError` in one line when there is nothing to resume: no folder
    (``no run at OUT``), a file, a folder without a run, or a run that stopped before its
    first checkpoint.
    """
    out = Path(out)
    if not out.exists():
        raise CheckpointError(f"no run at {out}: the folder does not exist")
    if not out.is_dir():
        raise CheckpointError(f"no run at {out}: it is a file, not a run directory")
    path = out / CHECKPOINT_NAME
    if path.exists():
        return path
    if any((out / name).exists() for name in ("metrics.jsonl", "config.json")):
        raise CheckpointError(
            f"nothing to resume in {out}: its run stopped before writing {CHECKPOINT_NAME}; "
            "remove the folder or choose another --out"
        )
    raise CheckpointError(f"no run at {out}: the folder holds no {CHECKPOINT_NAME}")


_ZIP_MAGIC = b"PK\x03\x04"
_WHAT_TO_DO = "Start a new run (with another --out) or restore the file from a copy"


def _what_is_wrong(path: Path, error: Exception) -> str:
    """Why ``torch.load(path, weights_only=True)`` failed, from the file itself.

    ``torch.save`` writes a zip archive whose ``data.pkl`` may only build tensors and plain
    containers when loaded with ``weights_only=True``.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"it cannot be read ({e.strerror or e})"
    if size == 0:
        return "the file is empty (0 bytes)"
    zipped = head == _ZIP_MAGIC
    if zipped and not zipfile.is_zipfile(path):
        return (
            f"the file is truncated: a zip archive cut short after {size:,} bytes (its end "
            "record is missing), as an interrupted write or copy leaves it"
        )
    foreign = _foreign_globals(path, zipped)
    if foreign:
        return (
            f"unsafe content: its pickle names {', '.join(foreign[:3])}, not only tensors "
            "and plain containers; samkit reads checkpoints with weights_only=True and never "
            "runs code from one"
        )
    if not zipped:
        return (
            "it is not a torch checkpoint: not a zip archive, which is what torch.save "
            f"writes (it starts with {head!r})"
        )
    if isinstance(error, pickle.UnpicklingError):
        return "the zip archive is damaged: its pickled data cannot be read"
    first = str(error).strip().splitlines()
    return f"the zip archive is damaged ({first[0] if first else type(error).__name__})"


_SCAN_BYTES = 1 << 24  # of a file that is not a zip archive: the globals come first

#: Modules whose classes and functions torch's own checkpoints name (rebuilding tensors,
#: ordered dicts); a pickle naming anything else is not a plain checkpoint.
_CHECKPOINT_MODULES = ("torch", "collections")


def _foreign_globals(path: Path, zipped: bool) -> list[str]:
    """Classes and functions a checkpoint's pickle names outside ``_CHECKPOINT_MODULES``
    (e.g. ``posix.system``), read from its opcodes without running anything."""
    try:
        if zipped:
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            with open(path, "rb") as f:
                data = f.read(_SCAN_BYTES)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return []
    names: list[str] = []
    strings: list[Any] = []  # what the opcodes pushed, strings kept (for STACK_GLOBAL)
    memo: dict[int, Any] = {}
    pos = 0
    try:
        while pos < len(data):  # torch's old format is several pickles in a row
            for op, arg, at in pickletools.genops(data[pos:]):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT") and strings:
                    memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = strings[-1]
                elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(int(arg)))
                elif not op.stack_before and op.stack_after:  # pushes a value
                    strings.append(arg if isinstance(arg, str) else None)
                elif op.name == "STOP":
                    pos += at + 1
    except Exception:  # a damaged pickle: judge what was read before the damage
        pass
    foreign = [n for n in names if n.split(".")[0] not in _CHECKPOINT_MODULES]
    return list(dict.fromkeys(foreign))


def load_checkpoint(
    path: str | Path, map_location: Any = "cpu"
) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """Rebuild the trained model of a run.

    ``path`` is a run directory (``--out`` of ``samkit train``) or a checkpoint file.
    Returns ``(model, config, checkpoint)``: the model with its weights loaded, in eval mode,
    on ``map_location``; the run's :class:`TrainConfig`; the raw checkpoint dict (epoch,
    dataset_info, history, ...). Raises :class:`CheckpointError` for a damaged file.
    """
    ckpt = read_checkpoint(path, map_location=map_location)
    config = TrainConfig.from_dict(ckpt["config"], source=str(path))
    info = DatasetInfo.from_dict(ckpt["dataset_info"])
    model = create_model(ckpt["model_name"], info, **config.model_args)
    model.load_state_dict(ckpt["model"])
    model.to(map_location).eval()
    return model, config, ckpt


# ----------------------------------------------------------------------------- RNG states


def get_rng_state(**generators: torch.Generator) -> dict[str, Any]:
    """Global torch/CUDA/numpy/python RNG states and the given generators', as plain data."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    for name, gen in generators.items():
        state[name] = gen.get_state()
    return state


def set_rng_state(state: dict[str, Any], **generators: torch.Generator) -> None:
    """Inverse of :func:`get_rng_state`."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    for name, gen in generators.items():
        gen.set_state(state[name].cpu())
