"""Shared helpers for :mod:`samkit.sharpness`: data handling, parameter lists, flat vectors,
state preservation and batch averaging.

Conventions used by every public function of the package:

* ``data`` is an iterable of ``(inputs, targets)`` batches (a list of tuples or a DataLoader).
  One-shot iterators (generators) are materialised to a list once, so that several passes over
  the data see the same batches.
* ``loss_fn(model(inputs), targets)`` returns the batch's unreduced losses, batch first
  (``reduction="none"``), or their mean (0-dim); both reduce to torch's ``reduction="mean"``
  of the batch (padding left out), by the rule the optimizers' closures use
  (``samkit._losses``).
* Every quantity is averaged over the batches, each batch weighted by its size.
* Only parameters with ``requires_grad=True`` take part.
* The model runs in eval mode unless ``train_mode=True``; its weights, ``requires_grad`` flags,
  gradients, buffers (BatchNorm running statistics) and training flags are restored on exit,
  and the global RNG state is left untouched (forward passes run under a forked RNG that is
  re-seeded per batch, so that a model with dropout in train mode sees the same masks every
  time the same batch is evaluated).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from samkit._losses import LossReduction

from ._distributed import Comm, Space, gather_parameters, unsupported_wrapper, without_fsdp_hooks

LossFn = Callable[[Any, Any], torch.Tensor]
Data = Iterable[tuple[Any, Any]]

__all__ = ["Data", "LossFn"]


# ----------------------------------------------------------------------------- validation


def check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_nonneg_float(name: str, value: Any, *, strictly_positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if strictly_positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
    return value


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")
    return seed


def check_module(model: Any) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def make_generator(seed: int) -> torch.Generator:
    """A local CPU generator (random vectors are drawn on the CPU, then moved, so that results
    do not depend on the device)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(check_seed(seed))
    return gen


# ----------------------------------------------------------------------------- data


def prepare_data(data: Any, allow_empty: bool = False) -> Iterable[Any]:
    """Return a re-iterable view of ``data`` (materialising one-shot iterators) after basic
    checks (empty data is refused unless ``allow_empty``)."""
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)):
        raise TypeError(
            f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}"
        )
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and all(isinstance(x, torch.Tensor) for x in data)
    ):
        raise TypeError(
            "data must be an iterable of (inputs, targets) batches, got a single "
            "(Tensor, Tensor) pair; wrap it as [(inputs, targets)]"
        )
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}"
        )
    if iter(data) is data:  # generator / iterator: one pass only
        data = list(data)
    if not allow_empty and hasattr(data, "__len__") and len(data) == 0:
        raise ValueError("data is empty: it must contain at least one (inputs, targets) batch")
    return data


def _first_leading_dim(obj: Any) -> int | None:
    if isinstance(obj, torch.Tensor):
        return int(obj.shape[0]) if obj.ndim >= 1 else None
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            n = _first_leading_dim(item)
            if n is not None:
                return n
    return None


def batch_size(inputs: Any, targets: Any) -> int:
    """Size of a batch: leading dimension of the first tensor in ``targets``, else ``inputs``."""
    n = _first_leading_dim(targets)
    if n is None:
        n = _first_leading_dim(inputs)
    return 1 if n is None else n


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------- parameters


def trainable_params(model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the parameters that require grad (the ones every measure uses)."""
    names, params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            names.append(name)
            params.append(p)
    if not params:
        raise ValueError("model has no parameter with requires_grad=True: nothing to measure")
    return names, params


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (its hooks are for training steps; a
    measurement reduces over processes itself)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


#: How a ``params=`` selection may be given, for error messages.
PARAMS_FORMS = (
    "None (every parameter that requires grad), a module or parameter name, a submodule, "
    "a parameter, an optimizer parameter group (a dict with 'params') or a list of these"
)


def select_params(model: nn.Module, spec: Any = None) -> tuple[list[str], list[torch.Tensor]]:
    """Names and tensors of the parameters a measure is restricted to, in model order.

    ``spec``: see :data:`PARAMS_FORMS`. A module (or its name) selects its parameters that
    require grad (recursively); the root module is ``""``. Raises ValueError/TypeError naming
    what was not found, and when the selection holds no parameter that requires grad.
    """
    names, params = trainable_params(model)
    if spec is None:
        return names, params
    modules = dict(model.named_modules())
    by_name = dict(model.named_parameters())
    by_id = {id(p): n for n, p in model.named_parameters()}
    if isinstance(spec, Mapping):
        if "params" not in spec:
            raise TypeError(
                f"params: a dict must be a parameter group with 'params', got keys {list(spec)}"
            )
        spec = spec["params"]
    if isinstance(spec, (str, nn.Module, torch.Tensor)):
        spec = [spec]
    if not isinstance(spec, Iterable):
        raise TypeError(f"params must be {PARAMS_FORMS}; got {type(spec).__name__}")
    chosen: set[str] = set()
    for i, item in enumerate(spec):
        if isinstance(item, str):
            if item in modules:
                found = [f"{item}.{n}" if item else n for n, _ in modules[item].named_parameters()]
            elif item in by_name:
                found = [item]
            else:
                owners = [
                    n or '""'
                    for n, m in modules.items()
                    if any(True for _ in m.parameters(recurse=False))
                ]
                raise ValueError(
                    f"params: {item!r} is neither a module nor a parameter of the model; modules "
                    f"with parameters: {owners[:12]}{' ...' if len(owners) > 12 else ''}"
                )
        elif isinstance(item, nn.Module):
            prefix = next((n for n, m in modules.items() if m is item), None)
            if prefix is None:
                raise ValueError(
                    f"params[{i}]: the {type(item).__name__} is not a submodule of the model"
                )
            found = [f"{prefix}.{n}" if prefix else n for n, _ in item.named_parameters()]
        elif isinstance(item, torch.Tensor):
            if id(item) not in by_id:
                raise ValueError(
                    f"params[{i}]: the tensor of shape {tuple(item.shape)} is not a parameter of the model"
                )
            found = [by_id[id(item)]]
            if not item.requires_grad:
                raise ValueError(
                    f"params[{i}] ({found[0]}) does not require grad: it cannot be measured"
                )
        else:
            raise TypeError(
                f"params[{i}] must be a name, a module or a parameter, got {type(item).__name__}"
            )
        chosen.update(found)
    picked = [(n, p) for n, p in zip(names, params) if n in chosen]
    if not picked:
        raise ValueError(
            f"params={spec!r} selects no parameter that requires grad: nothing to measure"
        )
    return [n for n, _ in picked], [p for _, p in picked]


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        n = p.numel()
        out.append(flat[i : i + n].view_as(p).to(p.dtype))
        i += n
    if i != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} entries, parameters have {i}")
    return out


def check_vectors(vectors: Any, params: Sequence[torch.Tensor], name: str = "vectors"):
    if isinstance(vectors, torch.Tensor) or not isinstance(vectors, (list, tuple)):
        raise TypeError(
            f"{name} must be a list of tensors shaped like the parameters that require grad, "
            f"got {type(vectors).__name__}"
        )
    if len(vectors) != len(params):
        raise ValueError(
            f"{name} has {len(vectors)} tensors but the model has {len(params)} parameters "
            "that require grad"
        )
    out = []
    for i, (v, p) in enumerate(zip(vectors, params)):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(v).__name__}")
        if v.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(v.shape)}, expected {tuple(p.shape)}")
        out.append(v.detach().to(device=p.device, dtype=p.dtype))
    return out


def grads_or_zeros(grads: Sequence[torch.Tensor | None], params: Sequence[torch.Tensor]):
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


# ----------------------------------------------------------------------------- attention


def math_attention() -> contextlib.AbstractContextManager:
    """A context in which ``scaled_dot_product_attention`` (and so ``nn.MultiheadAttention`` and
    the ``nn.Transformer*`` layers) runs its *math* implementation.

    The fused kernels (flash and memory-efficient attention, on the CPU as on CUDA) have a
    backward pass that is not itself differentiable: a double backward through them fails with
    "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
    implemented". The math implementation is made of ordinary differentiable operations, so
    Hessian-vector products through it are exact. The kernel is chosen when the forward pass
    runs, so only the forward pass and the first backward need to be inside the context.

    torch >= 2.3: ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``; torch 2.0-2.2:
    ``torch.backends.cuda.sdp_kernel`` with only the math kernel enabled (its switches also
    govern the CPU kernels); older versions have no fused kernel, and nothing is changed.
    """
    api = _sdpa_kernel_api()
    if api is not None:
        sdpa_kernel, backend = api
        return sdpa_kernel(backend.MATH)
    legacy = getattr(torch.backends.cuda, "sdp_kernel", None)
    if legacy is None:
        return contextlib.nullcontext()
    return legacy(enable_flash=False, enable_math=True, enable_mem_efficient=False)


def _sdpa_kernel_api() -> tuple[Any, Any] | None:
    """``(sdpa_kernel, SDPBackend)`` from ``torch.nn.attention`` (torch >= 2.3), else None."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    return sdpa_kernel, SDPBackend


# ----------------------------------------------------------------------------- evaluation


def _seed_for(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7_919 + 12_345) % (2**63 - 1)


class Evaluator:
    """Runs ``loss_fn(model(inputs), targets)`` over the batches of ``data``.

    Use it inside :meth:`session`, which sets the mode, forks the RNG and restores every piece
    of model state on exit.

    ``distributed`` (see :class:`~samkit.sharpness._distributed.Comm`): under
    ``torch.distributed``, the processes compare the call first (``measure``, ``settings``,
    the seed, the parameters, that each has data, and the errors of the arguments, of
    ``checks()`` (before the set-up) and of ``validate(evaluator)`` (after it)), and every
    process raises the same error on a mismatch. ``params`` restricts
    the measured parameters (:func:`select_params`). ``sharded_ok=False`` refuses DTensor
    parameters with the reason ``sharded_reason``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        train_mode: bool = False,
        seed: int = 0,
        params: Any = None,
        distributed: Any = False,
        measure: str = "",
        settings: Any = (),
        checks: Callable[[], None] | None = None,
        validate: Callable[[Evaluator], None] | None = None,
        sharded_ok: bool = True,
        sharded_reason: str = "",
    ) -> None:
        self.comm = Comm.resolve(distributed, measure or "the measurement")
        error: Exception | None = None
        num_batches = 0
        try:
            if checks is not None:
                checks()
            self._setup(model, loss_fn, data, train_mode, seed, params)
            if self.space.sharded and not sharded_ok:
                raise TypeError(
                    f"{measure} cannot run on sharded (DTensor) parameters: {sharded_reason}"
                )
            if validate is not None:
                validate(self)
            num_batches = len(self.data)
        except (TypeError, ValueError) as e:
            if self.comm is None:
                raise
            error = e
        self.offset = 0
        if self.comm is not None:
            self.comm.handshake(
                settings,
                int(seed) % (2**63) if isinstance(seed, int) else 0,
                num_batches,
                self.dim if error is None else 0,
                error,
            )
            self.offset = self.comm.offset

    def _setup(self, model, loss_fn, data, train_mode, seed, params) -> None:
        model = unwrap(check_module(model))
        reason = unsupported_wrapper(model)
        if reason is not None:
            raise TypeError(reason)
        self.model = model
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.reduction = LossReduction(loss_fn)
        # under several processes an empty share is reported by the handshake, for all
        self.data = prepare_data(data, allow_empty=self.comm is not None)
        if self.comm is not None and not hasattr(self.data, "__len__"):
            self.data = list(self.data)  # the processes compare their numbers of batches
        self.train_mode = bool(train_mode)
        self.seed = check_seed(seed)
        self.names, self.params = select_params(model, params)
        self.space = Space(self.params, self.comm)
        self.device = self.space.device
        self.dtype = self.space.dtype
        self.dim = self.space.dim
        #: What the forward and backward passes differentiate: the parameters, or (sharded)
        #: their gathered values during a session.
        self.compute: list[torch.Tensor] = list(self.params)
        self._full: dict[str, torch.Tensor] = {}

    # -- state ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self) -> Iterator[Evaluator]:
        model = self.model
        modes = [(m, m.training) for m in model.modules()]
        saved_params = [
            (p, p.detach().clone(), p.requires_grad, p.grad) for p in model.parameters()
        ]
        saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
        devices = []
        if self.device.type == "cuda":
            devices = [self.device.index if self.device.index is not None else 0]
        hooks = without_fsdp_hooks(model) if self.space.sharded else contextlib.nullcontext()
        try:
            with torch.random.fork_rng(devices=devices), hooks:
                model.train(self.train_mode)
                if self.space.sharded:
                    # the parameters' values, gathered once; the measured ones as leaves
                    self._full = dict(gather_parameters(model))
                    selected = set(self.names)
                    for name in self._full:
                        if name in selected:
                            self._full[name] = self._full[name].requires_grad_(True)
                    self.compute = [self._full.get(n, p) for n, p in zip(self.names, self.params)]
                yield self
        finally:
            self._full = {}
            self.compute = list(self.params)
            with torch.no_grad():
                for p, value, requires_grad, grad in saved_params:
                    if p.requires_grad != requires_grad:
                        p.requires_grad_(requires_grad)
                    p.copy_(value)
                    p.grad = grad
                for b, value in saved_buffers:
                    b.copy_(value)
            for m, training in modes:
                m.training = training

    # -- batches -------------------------------------------------------------------------
    def batches(self) -> Iterator[tuple[int, Any, Any, int]]:
        """Yield ``(index, inputs, targets, size)``, ``index`` counted over the union of the
        processes' batches; raises ValueError if there is no batch."""
        count = 0
        for i, batch in enumerate(self.data):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise TypeError(
                    f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}"
                    + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                )
            inputs, targets = batch
            inputs = to_device(inputs, self.device)
            targets = to_device(targets, self.device)
            count += 1
            yield self.offset + i, inputs, targets, batch_size(inputs, targets)
        if count == 0:
            raise ValueError("data is empty: it must contain at least one (inputs, targets) batch")

    def output_and_loss(
        self,
        index: int,
        inputs: Any,
        targets: Any,
        overrides: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[Any, torch.Tensor]:
        """Forward pass (with optional parameter/buffer overrides) and the scalar mean loss."""
        s = _seed_for(self.seed, index)
        torch.default_generator.manual_seed(s)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(s)
        if self._full:  # sharded: the gathered values stand in for the shards
            out = functional_call(self.model, {**self._full, **(overrides or {})}, (inputs,))
        elif overrides:
            out = functional_call(self.model, dict(overrides), (inputs,))
        else:
            out = self.model(inputs)
        loss = self.reduction.mean(
            self.loss_fn(out, targets), targets, batch_size(inputs, targets)
        )  # the rule shared with the optimizers' closures: torch's reduction="mean"
        return out, loss

    def loss(self, index, inputs, targets, overrides=None) -> torch.Tensor:
        return self.output_and_loss(index, inputs, targets, overrides)[1]

    def perturbed(self, deltas: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Override dict ``{name: w + delta}`` (deltas shaped like :attr:`compute`; they may
        require grad)."""
        return {n: p.detach() + d for n, p, d in zip(self.names, self.compute, deltas)}

    def rand_flat(self, gen: torch.Generator, kind: str = "normal") -> torch.Tensor:
        """A seeded random vector (this process's elements; see ``Space.rand``)."""
        return self.space.rand(gen, kind)


def accuracy_of(output: Any, targets: Any) -> float | None:
    """Fraction of correct argmax predictions when targets look like class labels, else None."""
    if not (isinstance(output, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return None
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        return None
    if output.ndim != 2 or targets.ndim != 1 or output.shape[0] != targets.shape[0]:
        return None
    return float((output.argmax(dim=1) == targets).double().mean().item())
