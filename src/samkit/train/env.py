"""What a run records about where it ran: versions and hardware (no hostname, no user)."""

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

__all__ = ["hardware_info", "versions_info", "resolve_device"]


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
