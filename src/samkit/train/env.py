"""Where a run runs: the device, versions and hardware it records (no hostname, no user), and
the warnings about settings that work on this hardware but slowly."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import samkit
from samkit.train.config import ConfigError

__all__ = [
    "TrainWarning",
    "amp_warning",
    "check_threads",
    "hardware_info",
    "resolve_device",
    "versions_info",
]


class TrainWarning(UserWarning):
    """A setting that works but is probably not what the user wants (e.g. slow here).

    The CLI prints these as one line, ``samkit: warning: ...``, on stderr.
    """


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may use
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def hardware_info(device: torch.device | None = None) -> dict[str, Any]:
    """CPU model, usable cores, torch threads, GPU name and memory if one is used."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_cores": _cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": f"{platform.system()} {platform.machine()}",
        "device": str(device) if device is not None else "cpu",
        "gpu": None,
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def _git_commit() -> str | None:
    """The commit of the samkit checkout, when samkit runs from one (else None)."""
    root = Path(samkit.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        res = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def versions_info() -> dict[str, Any]:
    """Versions of samkit, torch, numpy, python (and samkit's git commit if known)."""
    return {
        "samkit": samkit.__version__,
        "samkit_git": _git_commit(),
        "torch": str(torch.__version__),  # TorchVersion is not a plain str
        "numpy": str(np.__version__),
        "python": sys.version.split()[0],
    }


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available else cpu; anything else through ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"invalid device {name!r}") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def check_threads(threads: int | None) -> None:
    """ConfigError for a torch thread count (``--threads``) below 1; ``None``: not given."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):  # fmt: skip
        raise ConfigError(f"invalid --threads: {threads} (must be >= 1)")


def _native_bf16_cpu() -> bool | None:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX); None if unknown."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: absent from some builds
        return None


#: Training time with autocast relative to ``--amp off`` on a CPU without native bfloat16 or
#: float16 arithmetic, measured by ``benchmarks/amp_cpu.py`` (the embedded recipe on MNIST-1D,
#: SAM, 1 thread, 2-core AMD EPYC, torch 2.13): the basis of the warnings below.
CPU_AMP_SLOWDOWN = {"fp16": 9.8, "bf16": 10.2}


def amp_warning(amp: str, device: torch.device) -> str | None:
    """Why ``amp`` is a poor choice on ``device`` and what to use instead; ``None`` if fine.

    On a CPU, float16 autocast is emulated (about 10x slower than float32 in samkit's
    measurement) and bfloat16 is as slow unless the CPU has native bfloat16 arithmetic.
    """
    if device.type != "cpu" or amp == "off":
        return None
    native_bf16 = _native_bf16_cpu()
    if amp == "fp16":
        instead = (
            "--amp off (or --amp bf16, which this CPU computes natively)"
            if native_bf16
            else "--amp off"
        )
        return (
            f"--amp fp16 on a CPU is slow: float16 autocast is emulated there "
            f"(~{CPU_AMP_SLOWDOWN['fp16']:g}x the time of --amp off in samkit's benchmark); "
            f"use {instead} on a CPU, and fp16 on a GPU"
        )
    if amp == "bf16" and native_bf16 is False:
        return (
            f"--amp bf16 on this CPU is slow: it has no native bfloat16 arithmetic "
            f"(AVX512-BF16 or AMX) (~{CPU_AMP_SLOWDOWN['bf16']:g}x the time of --amp off in "
            "samkit's benchmark); use --amp off on this CPU"
        )
    return None
