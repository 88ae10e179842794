"""Memory of one optimizer step, in units of P (one parameter-sized buffer), for every method.

Usage::

    python benchmarks/memory.py                                   # CPU, every registered method
    python benchmarks/memory.py --methods sam fsam ssam:num_samples=128
    python benchmarks/memory.py --device cuda --width 64 --batch 128 --size 32

Every method trains its own copy of one model (``step_time.py``'s small ResNet, BatchNorm
included) on the same batches through ``samkit.make_closure``, as ``samkit train`` drives it,
with SGD (momentum 0.9) as the base; SGD itself and pytorch-optimizer's SAM (when installed)
run in the same process on the same batches. After ``--warmup`` steps, ``--steps`` steps are
measured (every step starts a new epoch, so per-epoch work such as SSAM's mask refresh and
SAF's logit records happens in each; LookSAM's refresh step falls among them at k = 5):

* **held**: the bytes of every tensor reachable from the optimizer after a step (its
  ``state``, the base optimizer's, caches outside ``state_dict``, any attribute), except the
  model's parameters, their gradients and the model's buffers: what the optimizer keeps
  allocated between steps, here as the step begins (after the step before it).
* **peak**: the most memory in use during a step above what was in use when it began. On CPU
  from the allocator's own events: ``torch.profiler`` with ``profile_memory=True`` records
  every allocation and free, in order, and their running sum is the memory in use after
  each one; on CUDA, ``torch.cuda.max_memory_allocated`` over the memory allocated at the
  step's start.
* **total** = held + peak *of the same step*: the most memory the optimizer needs at once.
  The step with the largest total is reported (its held and its peak); for a method whose
  state grows and shrinks across steps (SSAM-F's Fisher sum) the largest held and the
  largest peak can fall in different steps, and adding those would count memory that is
  never in use at once. ``max_held`` (JSON) is the largest held over the steps. The excess
  **over SGD**'s total is in units of P (the bytes of the model's parameters). SGD's total counts its momentum buffer (held) and what a
  forward/backward pass needs above the step's start (peak), so the excess is what the
  method adds.

Each method's figures also come with the bytes held between steps that its ``state_dict``
does not declare (``undeclared``: caches; 0 at the floor). Prints a table and saves JSON
(``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import samkit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_cost import parse_spec  # noqa: E402
from step_time import small_resnet  # noqa: E402

PEER = "pytorch-optimizer sam"
#: Issue 21's targets: total over SGD's, in P.
TARGETS = {"sam": 1.1, "esam": 1.5, "fsam": 2.1, "gsam": 2.1, "looksam": 2.1}
SSAM_TARGET = 2.5  # every ssam row (SSAM-F at num_samples = 4 and 128)


# ---------------------------------------------------------------------------- held
_ATOMS = (str, bytes, int, float, complex, bool, type(None), type, types.ModuleType)


def _storage(t: torch.Tensor) -> tuple[Any, int] | None:
    """(key, bytes) of a tensor's storage (a DTensor's local shard's); None if it has none."""
    t = getattr(t, "_local_tensor", t)
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.nbytes() == 0:
        return None
    return (storage.device, storage.data_ptr()), storage.nbytes()


def reachable_storages(root: Any) -> dict[Any, int]:
    """Every tensor storage reachable from ``root`` through attributes, slots, containers and
    closures: storage key -> bytes (a storage counts once, whatever views reach it)."""
    found: dict[Any, int] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if isinstance(obj, _ATOMS) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            entry = _storage(obj)
            if entry is not None:
                found[entry[0]] = entry[1]
            continue
        if isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif isinstance(obj, types.MethodType):
            stack.append(obj.__self__)
        elif isinstance(obj, types.FunctionType):
            stack.extend(c.cell_contents for c in obj.__closure__ or () if _filled(c))
        else:
            state = getattr(obj, "__dict__", None)
            if isinstance(state, dict):
                stack.append(state)
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if isinstance(slot, str) and hasattr(obj, slot):
                        stack.append(getattr(obj, slot))
    return found


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:  # an empty cell
        return False
    return True


def model_storages(model: nn.Module) -> set[Any]:
    """The storages of the model's parameters, their gradients and its buffers."""
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    return {entry[0] for t in tensors if (entry := _storage(t)) is not None}


def held_bytes(optimizer: Any, model: nn.Module) -> int:
    """Bytes of the tensors reachable from ``optimizer``, the model's own tensors excluded."""
    own = model_storages(model)
    return sum(n for key, n in reachable_storages(optimizer).items() if key not in own)


def undeclared_storages(optimizer: Any, model: nn.Module) -> dict[Any, int]:
    """The storages held (as in :func:`held_bytes`) that ``optimizer.state_dict()`` does not
    hold: storage key -> bytes."""
    skip = model_storages(model) | set(reachable_storages(optimizer.state_dict()))
    return {k: n for k, n in reachable_storages(optimizer).items() if k not in skip}


# ---------------------------------------------------------------------------- peak
class CpuSteps:
    """The CPU allocator's events during a run, and the peak of each step marked in it.

    ``torch.profiler`` with ``profile_memory=True`` records every allocation and free, in
    order; their running sum since the profile began is the memory in use after each event.
    The profile covers the whole run, warm-up included, so that a step freeing what an
    earlier step allocated is seen (the profiler does not see frees of memory allocated
    before it started).
    """

    def __init__(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.names: list[str] = []

    def __enter__(self) -> CpuSteps:
        self.profile.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.profile.__exit__(*exc)

    def step(self, name: str, step: Callable[[], Any]) -> None:
        with torch.profiler.record_function(name):
            step()
        self.names.append(name)

    def peaks(self) -> dict[str, int]:
        """Per marked step: the most memory in use during it above its start."""
        events = list(self.profile.profiler.kineto_results.events())
        windows = {
            e.name(): (e.start_ns(), e.start_ns() + e.duration_ns())
            for e in events
            if e.name() in self.names
        }
        memory = sorted(
            (e.start_ns(), i, e.nbytes())
            for i, e in enumerate(events)
            if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
        )
        out = {}
        for name, (begin, end) in windows.items():
            in_use = peak = 0
            start: int | None = None
            for t, _, nbytes in memory:
                if t > end:
                    break
                if t >= begin and start is None:
                    start = peak = in_use
                in_use += nbytes
                if start is not None:
                    peak = max(peak, in_use)
            out[name] = 0 if start is None else peak - start
        return out


def cuda_peak(step: Callable[[], Any], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start


# ---------------------------------------------------------------------------- the run
def build(spec: str, model: nn.Module, kw: dict[str, Any]) -> Any:
    if spec == PEER:
        import pytorch_optimizer as po

        return po.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **kw)
    name, hp = parse_spec(spec)
    return samkit.create_optimizer(name, model.parameters(), model=model, **kw, **hp)


def step_fn(spec: str, opt: Any, model: nn.Module, batch: tuple, loss_fn: Any) -> Callable:
    x, y, idx = batch
    if spec == PEER:  # its protocol: the clean backward before step()

        def closure():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y).mean()
            loss.backward()
            return loss

        return lambda: (closure(), opt.step(closure))
    return lambda: opt.step(samkit.make_closure(model, loss_fn, x, y, indices=idx))


def measure(
    spec: str, template: nn.Module, batches: list[tuple], args: argparse.Namespace
) -> dict[str, Any]:
    device = torch.device(args.device)
    model = small_resnet(args.width).to(device)
    model.load_state_dict(template.state_dict())
    opt = build(spec, model, dict(lr=0.05, momentum=0.9, weight_decay=5e-4))
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    undeclared = 0
    helds: list[int] = []  # before each measured step (after the step before it)
    peaks: list[int] = []
    cpu = CpuSteps() if device.type == "cpu" else None
    with cpu if cpu is not None else contextlib.nullcontext():
        for s in range(args.warmup + args.steps):
            if hasattr(opt, "set_epoch"):
                opt.set_epoch(args.first_epoch + s)
            step = step_fn(spec, opt, model, batches[s % len(batches)], loss_fn)
            if s >= args.warmup:
                helds.append(held_bytes(opt, model))
            if s < args.warmup:
                step()
            elif cpu is not None:
                cpu.step(f"measured step {s}", step)
            else:
                peaks.append(cuda_peak(step, device))
            if s >= args.warmup and spec != PEER:
                undeclared = max(undeclared, sum(undeclared_storages(opt, model).values()))
    if cpu is not None:
        peaks = list(cpu.peaks().values())
    worst = max(range(len(peaks)), key=lambda i: helds[i] + peaks[i])  # one step's held + peak
    return {
        "held_bytes": helds[worst],
        "peak_bytes": peaks[worst],
        "max_held_bytes": max([*helds, held_bytes(opt, model)]),  # after the last step too
        "undeclared_bytes": undeclared,
    }


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=None,
                    help="registry names, NAME:key=value,... (default: every method, and "
                    "mSAM's loop, SSAM-F at num_samples 4 and 128)")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=40, help="channels of the first stage")
    ap.add_argument("--size", type=int, default=16, help="input height/width")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--first-epoch", type=int, default=10,
                    help="epoch of the first step (past SAF's and MESA's start_epoch)")  # fmt: skip
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/memory_cpu.json")
    args = ap.parse_args(None if argv is None else list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("memory.py: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    specs = args.methods or [
        n for n in samkit.list_optimizers(sharpness_aware=True) if n != "ssam"
    ] + ["msam:vectorize=false", "ssam:num_samples=4", "ssam:num_samples=128"]
    specs = list(dict.fromkeys(["sgd", *specs]))
    try:
        import pytorch_optimizer  # noqa: F401

        specs.append(PEER)
    except ImportError:
        pass

    torch.manual_seed(0)
    template = small_resnet(args.width).to(device)
    batches = []
    for i in range(4):
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)
        batches.append((x, y, torch.arange(i * args.batch, (i + 1) * args.batch, device=device)))
    p_bytes = sum(p.numel() * p.element_size() for p in template.parameters())
    rows = {spec: measure(spec, template, batches, args) for spec in specs}
    sgd_total = rows["sgd"]["held_bytes"] + rows["sgd"]["peak_bytes"]
    print(
        f"small_resnet(width={args.width}): P = {p_bytes / 2**20:.2f} MiB "
        f"({p_bytes // 4} float32 parameters), batch {args.batch}x3x{args.size}x{args.size}, "
        f"{args.device}"
    )
    print(
        f"{'method':<24} {'held P':>7} {'peak P':>7} {'total P':>8} {'over SGD':>9} {'target':>7}"
    )
    for spec, row in rows.items():
        total = row["held_bytes"] + row["peak_bytes"]
        row.update(
            held_P=row["held_bytes"] / p_bytes,
            peak_P=row["peak_bytes"] / p_bytes,
            total_P=total / p_bytes,
            over_sgd_P=(total - sgd_total) / p_bytes,
            undeclared_P=row["undeclared_bytes"] / p_bytes,
        )
        target = SSAM_TARGET if spec.startswith("ssam") else TARGETS.get(spec)
        if target is not None:
            row["target_over_sgd_P"] = target
            row["met"] = row["over_sgd_P"] <= target
        mark = "" if target is None else f"<= {target}" + ("" if row["met"] else " NOT met")
        print(
            f"{spec:<24} {row['held_P']:7.2f} {row['peak_P']:7.2f} {row['total_P']:8.2f} "
            f"{row['over_sgd_P']:+9.2f} {mark}"
        )
    record = {
        "command": "python benchmarks/memory.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": vars(args),
        "parameter_bytes": p_bytes,
        "results": rows,
        "torch": torch.__version__,
        "samkit": samkit.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
