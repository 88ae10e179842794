"""The shared machinery of every sharpness-aware optimizer in samkit.

:class:`SharpnessAwareOptimizer` wraps any ``torch.optim.Optimizer`` (the *base* optimizer)
and owns everything the variants have in common:

* the closure protocol: ``step(closure)`` calls the closure for every pass the method needs
  (including the first) and returns the clean loss; the manual protocol
  ``first_step()`` / ``second_step()`` gives the same guarantees;
* saving, perturbing and restoring the weights with ``torch._foreach_*`` kernels grouped by
  device and dtype (a plain loop with ``foreach=False``); restoring copies the saved weights
  back, so it is exact, and it also happens when a pass raises;
* the global gradient norm, ASAM's elementwise scaling ``T = |w| + eta``, per-group radii;
* BatchNorm running statistics frozen during every perturbed pass
  (:func:`~samkit.optim.batchnorm.frozen_bn_stats`), ``no_sync()`` for the ascent pass under
  DistributedDataParallel;
* FSDP2's sharded (``DTensor``) parameters: the tensor kernels act on local shards and every
  norm is that of the whole model (:mod:`samkit.optim._tensors`);
* gradient clipping of the final update gradient (``max_grad_norm``);
* one random state for every pass of a step (the same dropout masks in each pass, as in the
  original SAM code), unless ``share_rng=False``;
* non-finite losses and gradients (``on_nonfinite``), decided by every process together
  under DDP and FSDP2, and clear errors for closures that forget ``backward()`` or return
  nothing;
* ``state_dict()`` that contains the base optimizer's state (momentum buffers) and every
  samkit buffer, so a resumed run continues exactly; warm starts from and to a plain
  torch optimizer's state (``load_state_dict``, :meth:`~SharpnessAwareOptimizer.base_state_dict`);
  ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the whole optimizer.

A method overrides one small hook: :meth:`ascent_direction` (the direction to normalise,
default the clean gradient) or, for methods with a different sequence of passes,
:meth:`sharpness_step`. See ``docs/adding_a_method.md``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import types
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import required

from samkit.optim import _tensors as T
from samkit.optim.batchnorm import bn_layers, frozen_bn_stats
from samkit.optim.closure import BatchClosure

__all__ = [
    "SharpnessAwareOptimizer",
    "NonFiniteError",
    "BASE_OPTIMIZERS",
    "resolve_base_optimizer",
    "GroupParams",
    "invalid_value",
    "is_finite_nonnegative",
]

#: Base optimizers that can be named by a string.
BASE_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "adagrad": torch.optim.Adagrad,
}

_NO_CLOSURE_MESSAGE = (
    "{name}.step() needs a closure, because it evaluates the loss more than once per step. "
    "Either pass a standard closure:\n"
    "    def closure():\n"
    "        optimizer.zero_grad()\n"
    "        loss = loss_fn(model(inputs), targets)\n"
    "        loss.backward()\n"
    "        return loss\n"
    "    loss = optimizer.step(closure)\n"
    "(or closure = samkit.make_closure(model, loss_fn, inputs, targets)), or drive the passes "
    "yourself: loss.backward(); optimizer.first_step(zero_grad=True); "
    "loss_fn(model(inputs), targets).backward(); optimizer.second_step(zero_grad=True)."
)

_STANDARD_CLOSURE = (
    "def closure(): optimizer.zero_grad(); loss = loss_fn(model(inputs), targets); "
    "loss.backward(); return loss"
)

#: Group keys of torch optimizers that newer torch versions added (an older state may lack
#: them; torch's own ``__setstate__`` fills them in), so they do not identify a class.
_OPTIONAL_BASE_KEYS = frozenset(
    {"foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"}
)

#: Per-step scratch attributes: never pickled or copied, rebuilt empty.
_TRANSIENT_ATTRIBUTES = frozenset(
    {
        "_backup",
        "_perturbed",
        "_grad_scaler",
        "_pending_checks",
        "_unchecked",
        "_on_accept",
        "_bn_cache",
        "_plan_key",
        "_plan",
        "_local_grads",
        "_replica_group",
        "_manual_step",
        "_rng",
        "_pass_model",
        "_mesh_groups",
        "last_grad_norm",
        "_opt_called",  # set by torch's LR schedulers on the optimizer they drive
    }
)

#: Options with their defaults, for objects pickled before an option existed.
_OPTION_DEFAULTS = {
    "share_rng": True,
    "sync_ascent": False,
    "on_nonfinite": "raise",
    "max_grad_norm": None,
}


def is_finite_nonnegative(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool) in ``[0, inf)``."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < math.inf
    )


def invalid_value(name: str, value: Any, expected: str) -> ValueError:
    """The ``ValueError`` for an invalid hyperparameter, PyTorch style, with the value's repr.

    ``expected`` says what is allowed (``"a finite number >= 0"``). A value that is not a
    number is named with its type, so that ``rho="0.1"`` reads
    ``Invalid rho value: '0.1' (must be a finite number >= 0, got str)``::

        if not is_finite_nonnegative(rho):
            raise invalid_value("rho", rho, "a finite number >= 0")
    """
    message = f"Invalid {name} value: {value!r} (must be {expected}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        message += f", got {type(value).__name__}"
    return ValueError(message + ")")


class NonFiniteError(FloatingPointError):
    """A pass produced a NaN or infinite loss or gradient."""


class _SkipStep(Exception):
    """Internal: abandon the current step (on_nonfinite='skip')."""


class GroupParams:
    """The parameters of one param group that take part in a step, with their gradients."""

    __slots__ = ("group", "params", "grads")

    def __init__(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]):
        self.group = group
        self.params = params
        self.grads = grads


def resolve_base_optimizer(base_optimizer: Any) -> type[Optimizer]:
    """A base optimizer class from a class or one of the names in ``BASE_OPTIMIZERS``.

    Optimizers whose ``step()`` requires a closure (``torch.optim.LBFGS``) are refused: a
    sharpness-aware optimizer hands its base optimizer gradients it has already computed.
    """
    if isinstance(base_optimizer, str):
        key = base_optimizer.lower()
        if key not in BASE_OPTIMIZERS:
            raise ValueError(
                f"Unknown base optimizer {base_optimizer!r}; "
                f"choose one of {sorted(BASE_OPTIMIZERS)} or pass a torch.optim.Optimizer class"
            )
        return BASE_OPTIMIZERS[key]
    if isinstance(base_optimizer, Optimizer):
        raise TypeError(
            f"base_optimizer must be an optimizer class, not an instance "
            f"({type(base_optimizer).__name__}(...)); pass {type(base_optimizer).__name__} "
            "and its keyword arguments instead"
        )
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
        raise TypeError(
            f"base_optimizer must be a torch.optim.Optimizer subclass or a name, "
            f"got {base_optimizer!r}"
        )
    if _step_needs_closure(base_optimizer):
        raise ValueError(
            f"base_optimizer {base_optimizer.__name__} is not supported: its step() requires "
            "a closure (it evaluates the loss itself), while a sharpness-aware optimizer hands "
            "its base optimizer gradients it has already computed. Use a base optimizer whose "
            f"step() works without a closure, e.g. one of {sorted(BASE_OPTIMIZERS)}"
        )
    return base_optimizer


def _step_needs_closure(cls: type[Optimizer]) -> bool:
    """Whether ``cls.step`` has a ``closure`` argument without a default (LBFGS)."""
    try:
        parameters = inspect.signature(cls.step).parameters  # follows torch's hook wrapper
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    closure = parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


# ---------------------------------------------------------------------------- random state
def _get_rng(cuda_devices: list[torch.device]) -> tuple[Tensor, list[Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda_devices]


def _set_rng(state: tuple[Tensor, list[Tensor]], cuda_devices: list[torch.device]) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for device, s in zip(cuda_devices, cuda):
        torch.cuda.set_rng_state(s, device)


class _SharedRandomState:
    """One step's random state: every pass after the first replays the first one's.

    The first pass records the global generators' state (CPU and the CUDA devices of the
    parameters); before each later pass the current state is kept aside and the recorded
    one set, and after the pass the kept state is set back. So every pass draws the same
    random numbers (the same dropout masks), and the stream outside the passes advances as
    if only the first pass had drawn: after a step the generators stand where one plain
    forward/backward pass would have left them.
    """

    __slots__ = ("devices", "first")

    def __init__(self, cuda_devices: list[torch.device]) -> None:
        self.devices = cuda_devices
        self.first: tuple[Tensor, list[Tensor]] | None = None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        if self.first is None:  # the step's first pass draws freely; remember where it began
            self.first = _get_rng(self.devices)
            yield
            return
        resume = _get_rng(self.devices)
        _set_rng(self.first, self.devices)
        try:
            yield
        finally:
            _set_rng(resume, self.devices)


@contextlib.contextmanager
def _without_global_step_hooks() -> Iterator[None]:
    """Inside, optimizer steps do not fire torch's global step hooks.

    torch fires the hooks of ``torch.optim.optimizer.register_optimizer_step_pre_hook`` /
    ``..._post_hook`` around every optimizer's ``step``. A sharpness-aware step fires them
    once, around its own ``step``; its base optimizer's step, inside it, must not fire them a
    second time. Hooks registered on the base optimizer itself still fire. The registries
    are emptied for the duration of the base step only when they hold hooks (otherwise this
    costs nothing); like torch's registries themselves, this is not meant for optimizers
    stepping concurrently in several threads.
    """
    from torch.optim import optimizer as torch_optimizer

    registries = [
        getattr(torch_optimizer, "_global_optimizer_pre_hooks", None),
        getattr(torch_optimizer, "_global_optimizer_post_hooks", None),
    ]
    registries = [r for r in registries if r]
    if not registries:
        yield
        return
    saved = [list(r.items()) for r in registries]
    for registry in registries:
        registry.clear()
    try:
        yield
    finally:
        for registry, items in zip(registries, saved):
            added = list(registry.items())  # registered by the base step itself (rare)
            registry.clear()
            registry.update(items)
            registry.update(added)


def _mesh_groups(param_groups: list[dict[str, Any]]) -> list[Any]:
    """The process groups of every dimension of the meshes of DTensor parameters."""
    import torch.distributed as dist

    params = [p for g in param_groups for p in g["params"]]
    if not T.is_sharded(params):
        return []
    meshes: list[Any] = []
    for p in params:
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None and mesh not in meshes:
            meshes.append(mesh)
    groups: list[Any] = []
    for mesh in meshes:
        for d in range(mesh.ndim):
            group = mesh.get_group(d)
            if group not in groups and dist.get_world_size(group) > 1:
                groups.append(group)
    return groups


class SharpnessAwareOptimizer(Optimizer):
    """Base class: a sharpness-aware wrapper around a torch optimizer.

    Args:
        params: parameters or param groups (named parameters work too). Groups may carry
            their own values of the method's hyperparameters (e.g. ``rho``).
        base_optimizer: a ``torch.optim.Optimizer`` class or a name from
            ``BASE_OPTIMIZERS`` (``"sgd"``, ``"adamw"``, ...). Optimizers whose ``step``
            requires a closure (``LBFGS``) are refused.
        defaults: the method's per-group hyperparameters and their default values.
        model: the model being trained. Optional; when given (or when the closure is a
            :class:`~samkit.BatchClosure`, which knows its model) BatchNorm running
            statistics are frozen during perturbed passes and, under DDP, the ascent pass
            runs inside ``no_sync()``.
        foreach: use ``torch._foreach_*`` kernels (default) or a plain loop.
        on_nonfinite: ``"raise"`` (default) raises :class:`NonFiniteError` naming the method
            and the pass when a loss or gradient is NaN/inf; ``"skip"`` restores the weights,
            skips the update and counts it in ``skipped_steps``; ``"ignore"`` does not check
            (saves one device synchronisation per step). The manual ``first_step`` /
            ``second_step`` path gives the same guarantees.
        sync_ascent: under DDP, also all-reduce the ascent pass's gradients (default
            ``False``: each replica perturbs with its own gradient, as in the original SAM).
            Under FSDP2 (``fully_shard``) it has no effect: FSDP2 reduce-scatters the
            gradients of every backward pass, so the ascent gradient is always the
            synchronised one (the whole batch's, as with ``sync_ascent=True``).
        max_grad_norm: clip the gradient the base optimizer applies (the method's final
            update gradient, after every pass and, under DDP, after the all-reduce) to this
            global L2 norm, right before the base step, as
            ``torch.nn.utils.clip_grad_norm_`` would (``g *= min(1, max_grad_norm /
            (‖g‖ + 1e-6))``). The norm is over every parameter with a gradient, of the whole
            model under FSDP2 (sharded norm). The pre-clip norm is kept in
            :attr:`last_grad_norm`. ``None`` (default): no clipping. Applies to
            ``step(closure)`` and to ``first_step``/``second_step``.
        share_rng: every pass of a step draws the same random numbers as the first (the same
            dropout masks at the clean and the perturbed weights, as the original SAM code,
            which evaluates both passes with one random key); afterwards the global
            generators stand where the first pass left them. ``False`` lets every pass draw
            fresh masks. Covers the CPU generator and the CUDA generators of the parameters'
            devices; it applies to ``step(closure)``, not to ``first_step``/``second_step``.
        perturb_eps: added to the norm in every normalisation (``1e-12``).
        **base_kwargs: passed to the base optimizer (``lr``, ``momentum``, ...).
    """

    #: Registry-style name used in messages.
    method_name = "sharpness-aware optimizer"

    #: Whether ``first_step``/``second_step`` implement the method. ``None``: only when the
    #: class keeps SAM's sequence of passes (it does not override :meth:`sharpness_step`).
    supports_manual_steps: bool | None = None

    #: Why the method cannot run on sharded (``DTensor``, e.g. FSDP2) parameters, or ``None``
    #: if it can. When set, a step on such parameters raises a ``TypeError`` that gives this
    #: reason (e.g. per-sample gradients through ``torch.func``, which need whole tensors).
    #: A method whose support depends on its options may define it as a property.
    fsdp_unsupported: str | None = None

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        defaults: dict[str, Any] | None = None,
        *,
        model: nn.Module | None = None,
        foreach: bool | None = None,
        on_nonfinite: str = "raise",
        sync_ascent: bool = False,
        share_rng: bool = True,
        perturb_eps: float = 1e-12,
        max_grad_norm: float | None = None,
        **base_kwargs: Any,
    ) -> None:
        base_cls = resolve_base_optimizer(base_optimizer)
        if on_nonfinite not in ("raise", "skip", "ignore"):
            raise ValueError(
                f"Invalid on_nonfinite value: {on_nonfinite!r} (use 'raise', 'skip' or 'ignore')"
            )
        if not is_finite_nonnegative(perturb_eps):
            raise invalid_value("perturb_eps", perturb_eps, "a finite number >= 0")
        if max_grad_norm is not None and not (
            is_finite_nonnegative(max_grad_norm) and max_grad_norm > 0
        ):
            raise invalid_value("max_grad_norm", max_grad_norm, "None or a finite number > 0")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if "foreach" in base_kwargs:
            raise ValueError(
                "foreach is samkit's own option; it is not passed to the base optimizer"
            )
        self._method_defaults = dict(defaults or {})
        super().__init__(params, dict(self._method_defaults))
        self.base_optimizer: Optimizer = base_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.model = model
        self.foreach = True if foreach is None else bool(foreach)
        self.on_nonfinite = on_nonfinite
        self.sync_ascent = bool(sync_ascent)
        self.share_rng = bool(share_rng)
        self.perturb_eps = float(perturb_eps)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        #: Counters saved in ``state_dict()``: optimizer steps taken and steps skipped.
        self.samkit_state: dict[str, Any] = {"step": 0, "skipped_steps": 0, "epoch": None}
        self._reset_transient()
        self._link_base()

    def _reset_transient(self) -> None:
        """Empty the per-step scratch state (also after unpickling)."""
        self._backup: dict[Tensor, Tensor] = {}
        self._perturbed: list[Tensor] = []
        self._grad_scaler: Any = None
        self._pending_checks: list[tuple[str, Any, list[Tensor]]] = []
        self._unchecked: tuple[str, Any] | None = None
        self._on_accept: list[Callable[[], None]] = []
        self._bn_cache: tuple[Any, list[Any]] = (None, [])
        self._plan_key: tuple[int, ...] | None = None
        self._plan: tuple[T.Buckets, list[Tensor]] = (T.Buckets([]), [])
        #: Set by :meth:`run_pass`: the last backward pass ran inside DDP's ``no_sync()``.
        self._local_grads = False
        self._replica_group: Any = None
        #: The model of the last pass's closure (a DDP module tells the replicas' group).
        self._pass_model: Any = None
        #: Process groups of the meshes of sharded (DTensor) parameters; None: not computed.
        self._mesh_groups: list[Any] | None = None
        #: The global norm of the update gradient before clipping (``max_grad_norm``), a 0-dim
        #: tensor on the parameters' device; ``None`` until a step has clipped.
        self.last_grad_norm: Tensor | None = None
        #: Between first_step() and second_step().
        self._manual_step = False
        #: The shared random state of the step in progress (``share_rng``).
        self._rng: _SharedRandomState | None = None

    # ------------------------------------------------------------------ hyperparameters
    def validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for invalid per-group hyperparameters (override to extend)."""
        if "rho" in group and not is_finite_nonnegative(group["rho"]):
            raise invalid_value("rho", group["rho"], "a finite number >= 0")
        # ASAM scaling options, read by perturb() for every method that offers ``adaptive``.
        if "eta" in group and not is_finite_nonnegative(group["eta"]):
            raise invalid_value("eta", group["eta"], "a finite number >= 0")
        choice = group.get("weight_scaling")
        if choice not in (None, True, False):
            raise ValueError(f"Invalid weight_scaling value: {choice!r} (use None, True or False)")

    def _check_group(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer parameters must be tensors, got {type(p).__name__}")
        self.validate_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (with the method's and the base optimizer's defaults filled in).

        The group is validated first and appended only if it is valid: after an error the
        optimizer is exactly as before.
        """
        if not hasattr(self, "base_optimizer"):
            # Called by Optimizer.__init__: build the group with the method's defaults.
            super().add_param_group(param_group)
            return
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if params is not None and not isinstance(params, (Tensor, set)):
            param_group["params"] = list(params)  # a generator is read once, here
        candidate = dict(self._method_defaults)
        candidate.update(
            (k, v) for k, v in self.base_optimizer.defaults.items() if v is not required
        )
        candidate.update(param_group)
        self.validate_group(candidate)  # may complete the group (e.g. initial_lr)
        for key, value in candidate.items():
            param_group.setdefault(key, value)
        # torch's own checks (tensors, leaves, duplicates) also run before it appends.
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list
        self._mesh_groups = None

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run every pass of the method through ``closure`` and update the weights.

        ``closure`` is a standard torch closure (zero the gradients, compute the loss, call
        ``backward()``, return the loss) or a :class:`~samkit.BatchClosure`. Returns the
        loss at the clean weights (the closure's first return value).
        """
        if closure is None:
            raise RuntimeError(_NO_CLOSURE_MESSAGE.format(name=type(self).__name__))
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        if self._perturbed or self._manual_step:
            raise RuntimeError(
                f"{type(self).__name__}.step() called between first_step() and "
                "second_step(): finish that step with second_step() (or abandon it with "
                "restore()) first"
            )
        if self.needs_epoch:
            self.current_epoch()  # a clear error before any pass runs
        self._check_sharding()
        self._begin_step()
        self._grad_scaler = getattr(closure, "grad_scaler", None)
        if isinstance(closure, BatchClosure):
            closure.begin_step()  # its metrics come from this step's first full-batch pass
        if self.share_rng:
            self._rng = _SharedRandomState(self._cuda_devices())
        try:
            return self.sharpness_step(closure)
        except _SkipStep as skip:
            self.restore()
            if self._grad_scaler is not None and self._grad_scaler.is_enabled():
                # Let the scaler see the overflowing gradients: it skips the update and
                # lowers its scale at the user's grad_scaler.update().
                self._base_optimizer_step()
            self.zero_grad(set_to_none=True)
            self.samkit_state["skipped_steps"] += 1
            return skip.args[0] if skip.args else None
        finally:
            self.restore()
            self._end_step()

    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        """The passes of one step. Default: SAM's two passes.

        Override for methods with another sequence of passes, using :meth:`run_pass`,
        :meth:`perturb`, :meth:`restore` and :meth:`base_step`.
        """
        loss = self.run_pass(closure, "clean")
        self.perturb()
        self.run_pass(closure, "perturbed", perturbed=True)
        self.restore()
        self.base_step()
        return loss

    def _begin_step(self) -> None:
        self._pending_checks = []
        self._unchecked = None
        self._on_accept = []  # drop updates of a step that never completed

    def _end_step(self) -> None:
        self._grad_scaler = None
        self._pending_checks = []
        self._unchecked = None
        self._on_accept = []
        self._rng = None

    def _cuda_devices(self) -> list[torch.device]:
        """The CUDA devices holding parameters (their generators are shared by the passes)."""
        if not torch.cuda.is_initialized():  # no parameter can be on a GPU: skip the walk
            return []
        devices = {p.device for g in self.param_groups for p in g["params"] if p.is_cuda}
        return sorted(devices, key=lambda d: d.index or 0)

    # ------------------------------------------------------------------ by hand
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Move to the perturbed weights using the clean gradients already in ``.grad``.

        The manual form of a SAM step::

            loss = loss_fn(model(x), y)
            loss.backward()
            opt.first_step(zero_grad=True, loss=loss)
            with samkit.frozen_bn_stats(model):
                loss2 = loss_fn(model(x), y)
                loss2.backward()
            opt.second_step(zero_grad=True, loss=loss2)

        ``loss`` (optional, a tensor or a number) is checked for NaN/inf like the loss a
        closure returns; the gradients are always checked. As with ``step(closure)`` the
        checks are read once, in :meth:`second_step`, which raises :class:`NonFiniteError`
        or (``on_nonfinite="skip"``) skips the step: a NaN found in the clean pass means
        ``second_step`` restores the weights and applies nothing.

        Only for methods with SAM's two passes (SAM, ASAM, F-SAM, ...); methods with their
        own sequence of passes need ``step(closure)``.
        """
        self._check_manual_steps_supported()
        self._check_sharding()
        if self._perturbed or self._manual_step:
            raise RuntimeError(
                f"{type(self).__name__}.first_step() called twice: the weights are already "
                "perturbed; call second_step() to finish the step (or restore() to abandon it)"
            )
        if not self._has_gradients():
            raise RuntimeError(
                f"{type(self).__name__}.first_step() found no gradient: call loss.backward() "
                "on the loss at the clean weights before first_step()"
            )
        self._begin_step()
        if self.on_nonfinite != "ignore":
            self._record_finite("clean", loss, check_grads=True)
        try:
            self.perturb()
        except BaseException:
            self.restore()
            self._end_step()
            raise
        self._manual_step = True
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False, *, loss: Any = None) -> None:
        """Restore the clean weights and apply the base optimizer with the current ``.grad``.

        ``.grad`` must hold the gradient at the perturbed weights (a backward pass after
        :meth:`first_step`); ``loss`` (optional) is that pass's loss, checked for NaN/inf.
        Raises :class:`NonFiniteError` (weights restored, nothing applied) or, with
        ``on_nonfinite="skip"``, skips the step (counted in :attr:`skipped_steps`) if either
        pass was not finite. ``zero_grad=True`` clears the gradients in every case, an error
        included, so that a loop that catches it does not accumulate onto them.
        """
        if not self._manual_step:
            raise RuntimeError(
                f"{type(self).__name__}.second_step() called without first_step(): the "
                "weights are not perturbed, so this would be a plain base-optimizer step. Call "
                "first_step() after the clean backward pass, or use step(closure)"
            )
        self._manual_step = False
        try:
            if self.on_nonfinite != "ignore":
                self._record_finite("perturbed", loss, check_grads=True)
            has_grads = self._has_gradients()
            self.restore()
            if not has_grads:
                raise RuntimeError(
                    f"{type(self).__name__}.second_step() found no gradient: after "
                    "first_step(), compute the loss again (at the perturbed weights) and call "
                    "loss.backward() before second_step()"
                )
            self.base_step()
        except _SkipStep:
            self.zero_grad(set_to_none=True)
            self.samkit_state["skipped_steps"] += 1
        finally:
            self.restore()
            self._end_step()
            if zero_grad:  # also when raising: a loop that goes on must not accumulate on them
                self.zero_grad(set_to_none=True)

    def _check_manual_steps_supported(self) -> None:
        supported = self.supports_manual_steps
        if supported is None:
            supported = type(self).sharpness_step is SharpnessAwareOptimizer.sharpness_step
        if not supported:
            raise RuntimeError(
                f"{type(self).__name__} has its own sequence of passes: drive it with "
                "step(closure). first_step()/second_step() implement SAM's two passes only"
            )

    def _has_gradients(self) -> bool:
        """Whether any trainable parameter has a gradient (stops at the first one)."""
        return any(
            p.grad is not None and p.requires_grad for g in self.param_groups for p in g["params"]
        )

    # ------------------------------------------------------------------ building blocks
    def run_pass(
        self,
        closure: Callable[[], Any],
        name: str,
        *,
        perturbed: bool = False,
        sync: bool | None = None,
        subset: Tensor | None = None,
        backward: bool = True,
        per_sample: bool = False,
        extra_loss: Callable[..., Tensor] | None = None,
    ) -> Any:
        """Evaluate one pass through the closure and check it.

        ``perturbed=True`` freezes BatchNorm running statistics. ``sync`` (default: ``True``
        for perturbed passes, ``sync_ascent`` for the clean pass) controls DDP gradient
        synchronisation. ``subset``, ``backward=False``, ``per_sample`` and ``extra_loss`` need
        a :class:`~samkit.BatchClosure`.

        Inside :meth:`step` (with ``share_rng``), every pass after the step's first one runs
        with the random state the first one started from. A backward pass that leaves no
        parameter with a gradient (a closure without ``loss.backward()``) and a standard
        closure that returns ``None`` raise a clear error.
        """
        if sync is None:
            sync = True if perturbed else self.sync_ascent
        is_batch = isinstance(closure, BatchClosure)
        needs_batch = subset is not None or not backward or per_sample or extra_loss is not None
        if needs_batch and not is_batch:
            raise TypeError(
                f"{type(self).__name__} needs per-sample or sub-batch evaluations: build the "
                "closure with samkit.make_closure(model, loss_fn, inputs, targets)"
            )
        if backward:
            self._check_unchecked_grads()  # before this pass overwrites them
            self.zero_grad(set_to_none=True)
        if perturbed:
            model = self.model if self.model is not None else getattr(closure, "model", None)
            bn: Any = frozen_bn_stats(self._bn_layers_of(model))
        else:
            bn = contextlib.nullcontext()
        model_of_pass = getattr(closure, "model", None)
        self._pass_model = model_of_pass
        if backward:
            self._local_grads = not sync and is_batch and hasattr(model_of_pass, "no_sync")
            if self._local_grads:
                self._replica_group = getattr(model_of_pass, "process_group", None)
        rng = self._rng.replay() if self._rng is not None else contextlib.nullcontext()
        with rng, bn, torch.enable_grad():
            if is_batch:
                loss = closure.evaluate(  # type: ignore[attr-defined]
                    subset,
                    backward=backward,
                    per_sample=per_sample,
                    sync_gradients=sync,
                    extra_loss=extra_loss,
                )
            else:
                loss = closure()
        if loss is None:
            raise TypeError(
                f"{type(self).__name__}: the closure returned None in the {name} pass; it must "
                "return the loss (the step returns the clean loss and checks every loss for "
                f"NaN/inf): {_STANDARD_CLOSURE}"
            )
        if backward and not self._has_gradients():
            raise RuntimeError(
                f"{type(self).__name__}: the {name} pass left no parameter with a gradient. "
                f"The closure must call loss.backward() before returning the loss "
                f"({_STANDARD_CLOSURE}); if it does, check that the loss depends on the "
                "optimizer's parameters"
            )
        if self.on_nonfinite != "ignore":
            self._record_finite(name, loss, backward)
        return loss

    def _bn_layers_of(self, model: nn.Module | None) -> list[Any]:
        """BatchNorm layers of ``model``, cached per model object."""
        if model is None:
            return []
        if self._bn_cache[0] is not model:
            self._bn_cache = (model, bn_layers(model))
        return self._bn_cache[1]

    def _record_finite(self, name: str, loss: Any, check_grads: bool) -> None:
        """Queue on-device finiteness flags for this pass; :meth:`verify_finite` reads them.

        Nothing is synchronised here: on a GPU the flags are read once per step, just
        before the base step, so the passes queue without stalls. The gradients' flag is
        taken lazily: from the norm :meth:`perturb` computes of them anyway, or just before
        the next pass or the base step (one norm fewer per step for SAM). ``loss`` may be a
        tensor, a Python number or ``None`` (not checked).
        """
        if isinstance(loss, Tensor):
            self._pending_checks.append((name, loss, [torch.isfinite(loss.detach()).all()]))
        elif isinstance(loss, (int, float)):
            self._pending_checks.append((name, loss, [torch.tensor(math.isfinite(loss))]))
        if check_grads:
            self._unchecked = (name, loss)

    def _check_unchecked_grads(self, norm: Tensor | None = None) -> None:
        """Queue the finiteness flag of the last pass's gradients (``norm``: of them)."""
        if self._unchecked is None:
            return
        name, loss = self._unchecked
        self._unchecked = None
        if norm is None:
            grads = [g for gp in self.collect() for g in gp.grads]
            if not grads:
                return
            norm = T.global_norm(grads, self.foreach)
        self._pending_checks.append((name, loss, [torch.isfinite(norm)]))

    def verify_finite(self) -> None:
        """Raise (or skip the step) if any pass so far in this step was not finite.

        Called by :meth:`base_step`; one device synchronisation for all passes.

        In several processes (a ``DistributedDataParallel`` model, or sharded parameters
        under FSDP2) every process takes the same decision: the flags are combined over the
        processes with one ``all_reduce`` of a single number, so a NaN in one process's loss,
        or in a pass whose gradients stayed local (the ascent pass in ``no_sync()``), makes
        every process raise or skip the same step. The DDP model is found through
        ``model=`` or the closure (a :class:`~samkit.BatchClosure`); a plain closure over a
        DDP model needs ``model=`` for this.
        """
        self._check_unchecked_grads()
        pending, self._pending_checks = self._pending_checks, []
        if self.on_nonfinite == "ignore":
            return
        groups = self._agreement_groups()
        if not pending and not groups:
            return
        flags = [f for _, _, fs in pending for f in fs]
        device = next((f.device for f in flags if f.device.type != "cpu"), None)
        if device is None:
            device = flags[0].device if flags else torch.device("cpu")
        local = (
            torch.stack([f.to(device) for f in flags])
            if flags
            else torch.ones(0, dtype=torch.bool, device=device)
        )
        if groups:
            everyone = self._all_processes_ok(local, groups)
            ok = torch.cat([local.to(everyone.dtype), everyone.to(local.device).view(1)]).tolist()
            ok, everyone_ok = ok[:-1], bool(ok[-1])
        else:
            ok, everyone_ok = local.tolist(), True
        if all(ok) and everyone_ok:
            return
        scaler = self._grad_scaler
        first_loss = pending[0][1] if pending else None
        if self.on_nonfinite == "skip" or (scaler is not None and scaler.is_enabled()):
            # With a GradScaler, overflowing scaled gradients are routine: skip the step.
            raise _SkipStep(first_loss)
        if all(ok):
            raise NonFiniteError(
                f"{type(self).__name__}: non-finite loss or gradient in another process of "
                "the distributed group (every process stops at this step); the weights were "
                "left unchanged. Pass on_nonfinite='skip' to skip such steps."
            )
        k = 0
        name, loss = pending[-1][0], pending[-1][1]
        for name, loss, pass_flags in pending:  # noqa: B007 (the first failing one is reported)
            if not all(ok[k : k + len(pass_flags)]):
                break
            k += len(pass_flags)
        if isinstance(loss, Tensor):
            loss_text = f"{float(loss.detach().float().mean()):g}"
        elif isinstance(loss, (int, float)):
            loss_text = f"{loss:g}"
        else:
            loss_text = "?"
        raise NonFiniteError(
            f"{type(self).__name__}: non-finite loss or gradient in the {name} pass "
            f"(loss={loss_text}); the weights were left unchanged. Pass on_nonfinite='skip' "
            "to skip such steps."
        )

    def _agreement_groups(self, models: tuple[Any, ...] | None = None) -> list[Any]:
        """The process groups whose members must take this step's decisions together.

        The group of each multi-process DDP model among ``models`` (default: ``model=`` and
        the last closure's model; ``()``: none), and every dimension's group of the device
        meshes of sharded (DTensor) parameters. Empty in a single process.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return []
        groups: list[Any] = []
        for model in (self.model, self._pass_model) if models is None else models:
            if model is not None and hasattr(model, "no_sync"):
                group = getattr(model, "process_group", None)
                if group not in groups and dist.get_world_size(group) > 1:
                    groups.append(group)
        if self._mesh_groups is None:
            self._mesh_groups = _mesh_groups(self.param_groups)
        groups.extend(g for g in self._mesh_groups if g not in groups)
        return groups

    def agree(self, values: Tensor, model: Any = None, replicas: bool = True) -> Tensor:
        """``values`` as the first process has them, in every process that must agree.

        For random draws that decide which tensors a synchronised pass computes (ESAM's
        weight mask): under FSDP2 every pass is synchronised, so the processes sharing a
        sharded parameter's mesh always take the first one's draw; under DDP the processes
        of ``model``'s group (or of ``model=``) do too when ``replicas`` is true (a method
        passes ``replicas=self.sync_ascent``: local ascent passes may differ). One
        ``broadcast`` per process group; a single process returns ``values`` unchanged.
        """
        import torch.distributed as dist

        out = values
        for group in self._agreement_groups((model, self.model) if replicas else ()):
            buf = out
            if dist.get_backend(group) == "nccl" and buf.device.type != "cuda":
                buf = buf.to(torch.device("cuda", torch.cuda.current_device()))
            dist.broadcast(buf, src=dist.get_global_rank(group, 0) if group else 0, group=group)
            out = buf.to(values.device)
        return out

    @staticmethod
    def _all_processes_ok(local: Tensor, groups: list[Any]) -> Tensor:
        """1 if every flag of every process in ``groups`` is true, else 0 (an int32 tensor)."""
        import torch.distributed as dist

        everyone = local.all().to(torch.int32).reshape(1)
        for group in groups:
            flag = everyone
            if dist.get_backend(group) == "nccl" and flag.device.type != "cuda":
                flag = flag.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
            everyone = flag.to(everyone.device)
        return everyone[0]

    def _check_sharding(self) -> None:
        """Refuse sharded parameters for a method that sets :attr:`fsdp_unsupported`."""
        reason = self.fsdp_unsupported
        if reason is None:
            return
        if T.is_sharded([p for g in self.param_groups for p in g["params"]]):
            raise TypeError(
                f"{type(self).__name__} cannot run on sharded (DTensor) parameters such as "
                f"those of an FSDP2 (fully_shard) model: {reason}"
            )

    def collect(self) -> list[GroupParams]:
        """Per param group, the parameters that have a gradient (frozen ones are skipped)."""
        out = []
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                g = p.grad
                if g is None or not p.requires_grad:
                    continue
                if g.is_sparse:
                    raise RuntimeError(
                        f"{type(self).__name__} does not support sparse gradients "
                        f"(parameter of shape {tuple(p.shape)})"
                    )
                params.append(p)
                grads.append(g)
            out.append(GroupParams(group, params, grads))
        return out

    def ascent_direction(self, groups: list[GroupParams]) -> list[list[Tensor]]:
        """The direction to normalise into the perturbation, per group. Default: ``g``."""
        return [gp.grads for gp in groups]

    @torch.no_grad()
    def perturb(
        self,
        directions: list[list[Tensor]] | None = None,
        *,
        radius: str | Callable[[dict[str, Any]], float] = "rho",
        sign: float = 1.0,
        norm_of: list[list[Tensor]] | None = None,
    ) -> Tensor:
        """Save the weights and move them to ``w + sign·ε``.

        ``ε = r_g · d / (‖d‖ + eps)`` or, for groups with ``adaptive=True`` (ASAM),
        ``ε = r_g · T²d / (‖T d‖ + eps)`` with ``T = |w| + eta`` on weight tensors and 1
        elsewhere. ``d`` is ``directions`` or :meth:`ascent_direction`; the norm is global over
        every group; ``r_g`` is the group's ``radius`` entry (or ``radius(group)``). Returns the
        norm ‖d‖ (or ‖T d‖) as a 0-dim tensor.

        ``norm_of`` (per group, parallel to ``directions``) normalises by the norm of other
        tensors than the directions: ``ε = r_g · d / (‖n‖ + eps)``. Sparse SAM uses it to
        perturb along the masked gradient scaled by the norm of the whole gradient.
        """
        if self._perturbed:
            raise RuntimeError("the weights are already perturbed: call restore() first")
        groups = self.collect()
        from_grads = directions is None
        if from_grads:
            directions = self.ascent_direction(groups)
        # Flatten over groups: td = T ⊙ d (T = 1 outside adaptive weight tensors).
        params: list[Tensor] = []
        t_dirs: list[Tensor] = []
        t_norms: list[Tensor] = []  # the tensors whose norm normalises (T ⊙ norm_of)
        t_scales: list[Tensor | None] = []
        radii: list[float] = []
        norm_src = directions if norm_of is None else norm_of
        for gp, d, n in zip(groups, directions, norm_src):
            if not gp.params:
                continue
            r = float(radius(gp.group) if callable(radius) else gp.group[radius])
            if gp.group.get("adaptive", False):
                t = self._asam_scales(gp)
                t_dirs.extend(di if ti is None else ti * di for ti, di in zip(t, d))
                if norm_of is not None:
                    t_norms.extend(ni if ti is None else ti * ni for ti, ni in zip(t, n))
                t_scales.extend(t)
            else:
                t_dirs.extend(d)
                if norm_of is not None:
                    t_norms.extend(n)
                t_scales.extend([None] * len(d))
            params.extend(gp.params)
            radii.extend([sign * r] * len(gp.params))
        plan, buffers = self._plan_for(params)
        norm = T.global_norm(t_dirs if norm_of is None else t_norms, self.foreach, plan)
        if from_grads:  # d is derived from the gradients: a NaN/inf there shows in ‖d‖
            self._check_unchecked_grads(norm)
        if not params:
            return norm
        denom = norm + self.perturb_eps
        if all(r == radii[0] for r in radii):
            eps = T.scaled(t_dirs, radii[0] / denom, self.foreach, plan)
        else:  # per-group radii: one global normalisation, then each tensor's radius
            eps = T.scaled(t_dirs, 1.0 / denom, self.foreach, plan)
            for e, r in zip(eps, radii):
                e.mul_(r)
        for e, t in zip(eps, t_scales):
            if t is not None:
                e.mul_(t)
        T.copy_(buffers, params, self.foreach, plan)
        self._perturbed = params
        T.add_(params, eps, foreach=self.foreach, buckets=plan)
        return norm

    def _plan_for(self, params: list[Tensor]) -> tuple[T.Buckets, list[Tensor]]:
        """The (device, dtype) plan and the backup buffers of a parameter list (cached)."""
        key = tuple(map(id, params))
        if key != self._plan_key:
            buffers = []
            for p in params:
                buf = self._backup.get(p)
                if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                    buf = torch.empty_like(p, memory_format=torch.preserve_format)
                    self._backup[p] = buf
                buffers.append(buf)
            self._plan_key, self._plan = key, (T.Buckets(params), buffers)
        return self._plan

    def _asam_scales(self, gp: GroupParams) -> list[Tensor | None]:
        """ASAM's T = |w| + eta for weight tensors, None (T = 1) for the others."""
        eta = gp.group.get("eta", 0.0)
        choice = gp.group.get("weight_scaling")  # None: automatic rule
        names = gp.group.get("param_names")
        if names is not None:
            name_of = dict(zip((id(p) for p in gp.group["params"]), names))
        out: list[Tensor | None] = []
        for p in gp.params:
            if choice is None:
                is_weight = name_of[id(p)].endswith("weight") if names is not None else p.dim() > 1
            else:
                is_weight = bool(choice)
            out.append(p.detach().abs().add_(eta) if is_weight else None)
        return out

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved clean weights back (exact); does nothing if not perturbed.

        Also abandons a manual step begun with :meth:`first_step`.
        """
        self._manual_step = False
        if not self._perturbed:
            return
        params = self._perturbed
        self._perturbed = []
        plan, buffers = self._plan_for(params)
        T.copy_(params, buffers, self.foreach, plan)

    @property
    def is_perturbed(self) -> bool:
        """Whether the weights currently sit at a perturbed point."""
        return bool(self._perturbed)

    def base_step(self) -> None:
        """Apply the base optimizer with the gradients in ``.grad`` (at the clean weights)."""
        if self._perturbed:
            raise RuntimeError("base_step() called while the weights are perturbed")
        if self.max_grad_norm is None:
            self.verify_finite()
        else:
            grads = self._update_gradients()
            self.verify_finite()  # includes the finiteness of the update gradient's norm
            self._clip(grads)
        self._base_optimizer_step()
        self.samkit_state["step"] += 1
        hooks, self._on_accept = self._on_accept, []
        for hook in hooks:
            hook()

    def _update_gradients(self) -> list[Tensor]:
        """The gradients the base step will apply, unscaled; their norm in last_grad_norm.

        With a GradScaler the gradients are unscaled first (``scaler.unscale_`` on the base
        optimizer; its ``step`` then does not unscale them again), so the norm and the clip
        are those of the true gradient. The norm's finiteness joins this step's checks: it
        is the check of the last pass's gradients when that is still due (one norm, not two).
        """
        scaler = self._grad_scaler
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(self.base_optimizer)
        grads = [g for gp in self.collect() for g in gp.grads]
        norm = T.global_norm(grads, self.foreach)
        self.last_grad_norm = norm
        if self._unchecked is not None:
            self._check_unchecked_grads(norm)
        elif self.on_nonfinite != "ignore":
            self._pending_checks.append(("update gradient", None, [torch.isfinite(norm)]))
        return grads

    @torch.no_grad()
    def _clip(self, grads: list[Tensor]) -> None:
        """``g *= min(1, max_grad_norm / (‖g‖ + 1e-6))``, as ``clip_grad_norm_`` (no sync)."""
        if not grads:
            return
        assert self.last_grad_norm is not None and self.max_grad_norm is not None
        coef = torch.clamp(self.max_grad_norm / (self.last_grad_norm + 1e-6), max=1.0)
        T.mul_(grads, coef, self.foreach)

    def _base_optimizer_step(self) -> None:
        """The wrapped optimizer's step (through the GradScaler if there is one).

        torch's global step hooks already fire around this optimizer's own ``step``; they do
        not fire a second time for the base optimizer (its own hooks do fire).
        """
        with _without_global_step_hooks():
            if self._grad_scaler is not None:
                self._grad_scaler.step(self.base_optimizer)
            else:
                self.base_optimizer.step()

    # ------------------------------------------------------------------ replicas (DDP)
    @property
    def local_gradients(self) -> bool:
        """Whether the gradients of the last backward pass are this replica's own.

        True after a pass that ran inside DDP's ``no_sync()`` (by default the clean pass of a
        :class:`~samkit.BatchClosure` on a ``DistributedDataParallel`` model). Only the
        *perturbation* may come from such gradients: any quantity built from them that
        enters the *update* (Bilateral SAM's ``g0``, GSAM's ``g``, LookSAM's cached
        direction) must first go through :meth:`all_reduce_mean_`, or the replicas drift
        apart.
        """
        return self._local_grads

    @torch.no_grad()
    def all_reduce_mean_(self, tensors: list[Tensor]) -> None:
        """In place: average ``tensors`` over the DDP replicas of the last local pass.

        Does nothing unless the last backward pass was local (:attr:`local_gradients`) and
        ``torch.distributed`` is initialised, so single-process code can call it freely.
        The tensors are flattened into one buffer per (device, dtype): one all-reduce each.
        """
        if not self._local_grads or not tensors:
            return
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        group = self._replica_group
        world = dist.get_world_size(group)
        if world == 1:
            return
        for bucket in T.Buckets(tensors).split(tensors):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, group=group)
            flat.div_(world)
            offset = 0
            for t in bucket:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n

    # ------------------------------------------------------------------ epochs
    #: Methods that act on epoch boundaries (SAF, MESA, SSAM) set this to ``True``; their
    #: steps then refuse to run until :meth:`set_epoch` has been called.
    needs_epoch = False

    def set_epoch(self, epoch: int) -> None:
        """Tell the optimizer that epoch ``epoch`` (counted from 0) starts.

        Call it at the start of every epoch, as with ``DistributedSampler.set_epoch``
        (``samkit train`` does). Every samkit optimizer accepts it; methods that do not act
        on epochs ignore it. The epoch is part of :meth:`state_dict`.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Invalid epoch value: {epoch!r} (an integer >= 0)")
        self.samkit_state["epoch"] = epoch

    @property
    def epoch(self) -> int | None:
        """The epoch given to :meth:`set_epoch` last (``None`` if it was never called)."""
        return self.samkit_state.get("epoch")

    def current_epoch(self) -> int:
        """The current epoch; a clear ``RuntimeError`` if :meth:`set_epoch` was never called."""
        epoch = self.samkit_state.get("epoch")
        if epoch is None:
            raise RuntimeError(
                f"{type(self).__name__} acts on epoch boundaries: call "
                "optimizer.set_epoch(epoch) at the start of every epoch (epochs counted from "
                "0; samkit train does this)"
            )
        return int(epoch)

    def on_accept(self, update: Callable[[], None]) -> None:
        """Run ``update`` once this step is accepted (after the finiteness check).

        Methods that keep state across steps (an EMA of gradients, a cache) register its
        update here instead of applying it during the passes, so a step that raises or is
        skipped (``on_nonfinite="skip"``) leaves their state untouched.
        """
        self._on_accept.append(update)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because of non-finite values (``on_nonfinite='skip'``)."""
        return int(self.samkit_state["skipped_steps"])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The method's state, the base optimizer's state and samkit's counters.

        ``state`` holds the method's own buffers (e.g. F-SAM's gradient average); the base
        optimizer's moments are in ``base_optimizer`` (live: ``opt.base_optimizer.state``).
        For a state a plain torch optimizer can load, use :meth:`base_state_dict`.
        """
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        sd["samkit"] = dict(self.samkit_state)
        return sd

    def base_state_dict(self) -> dict[str, Any]:
        """The base optimizer's state, for a plain torch optimizer (a warm start the other way).

        ``torch.optim.AdamW(model.parameters()).load_state_dict(opt.base_state_dict())``
        gives a plain AdamW with this optimizer's moments and step counts and the groups'
        base hyperparameters (``lr``, ``betas``, ...), without samkit's keys (``rho``, ...).
        """
        sd = self.base_optimizer.state_dict()
        own = set(self._method_defaults)
        sd["param_groups"] = [
            {k: v for k, v in group.items() if k not in own} for group in sd["param_groups"]
        ]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict`, or a plain base optimizer's state.

        * A samkit state restores the method's buffers, the base optimizer's state, the
          hyperparameters of every group and samkit's counters (a resumed run continues
          bit-exactly).
        * A plain torch optimizer's state (e.g. ``adamw.state_dict()``, a warm start) must come
          from the base optimizer's class with the same param groups: it loads into the base
          optimizer (moments, step counts and base hyperparameters such as ``lr``, as torch's
          ``load_state_dict`` does) and keeps the method's hyperparameters (``rho``, ...).

        Either way the param groups stay shared with the base optimizer (LR schedulers on
        this optimizer keep acting). A state of another optimizer class, or with another
        number or size of param groups, is refused before anything changes.
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if "base_optimizer" not in state_dict:
            if "state" in state_dict and "param_groups" in state_dict:
                self._check_base_state(state_dict)
                self.base_optimizer.load_state_dict(state_dict)  # re-linked by the hook
                self._reset_transient()
                return
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: this is neither a samkit optimizer's "
                "state (no 'base_optimizer' entry) nor a torch optimizer's (no 'state' and "
                f"'param_groups'); its keys are {sorted(map(str, state_dict))}"
            )
        sd = dict(state_dict)
        base_sd = sd.pop("base_optimizer")
        counters = sd.pop("samkit", {})
        self._check_layout(sd.get("param_groups"), "the state")
        missing = sorted(
            {k for k in self._method_defaults for g in sd["param_groups"] if k not in g}
        )
        if missing:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state's param groups have no "
                f"{missing}: it was saved by another method; load it into that method's class"
            )
        self._check_base_state(base_sd)
        shared = self.param_groups
        Optimizer.load_state_dict(self, sd)  # the method's buffers; new group dicts
        loaded, self.param_groups = self.param_groups, shared
        for group, new in zip(shared, loaded):
            group.update(new)
        self.base_optimizer.load_state_dict(base_sd)
        self.samkit_state.update(counters)
        self._reset_transient()

    def _check_layout(self, groups: Any, what: str) -> None:
        """Refuse param groups that differ in number or size from this optimizer's."""
        name = type(self).__name__
        if not isinstance(groups, list) or not all(
            isinstance(g, dict) and "params" in g for g in groups
        ):
            raise ValueError(f"{name}.load_state_dict: {what} has no valid 'param_groups' list")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"{name}.load_state_dict: {what} has {len(groups)} param group(s), this "
                f"optimizer has {len(self.param_groups)}"
            )
        for i, (saved, own) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(own["params"]):
                raise ValueError(
                    f"{name}.load_state_dict: param group {i} of {what} has "
                    f"{len(saved['params'])} parameter(s), this optimizer's has "
                    f"{len(own['params'])}"
                )

    def _check_base_state(self, state_dict: Any) -> None:
        """Refuse a state that the base optimizer cannot take as its own."""
        name = type(self).__name__
        base = type(self.base_optimizer).__name__
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict:
            raise ValueError(f"{name}: not an optimizer state dict (no 'param_groups')")
        if "base_optimizer" in state_dict or "samkit" in state_dict:
            raise ValueError(
                f"{name}: this is a samkit optimizer's state; load it with "
                "opt.load_state_dict(...), not opt.base_optimizer.load_state_dict(...)"
            )
        self._check_layout(state_dict["param_groups"], f"the {base} state")
        needed = [k for k in self.base_optimizer.defaults if k not in _OPTIONAL_BASE_KEYS]
        for i, (saved, own) in enumerate(zip(state_dict["param_groups"], self.param_groups)):
            missing = [k for k in needed if k not in saved]
            if missing:
                raise ValueError(
                    f"{name}: the state was saved by another optimizer class: its param group "
                    f"{i} has no {missing}, which {base} has. Load a {base} state, or build "
                    "the samkit optimizer with that class as base_optimizer"
                )
            key = "decoupled_weight_decay"  # Adam and AdamW share every other key
            if key in saved and key in own and bool(saved[key]) != bool(own[key]):
                raise ValueError(
                    f"{name}: the state was saved by another optimizer class ({key}="
                    f"{saved[key]} in its param group {i}, {own[key]} in {base}): Adam and "
                    "AdamW states do not mix"
                )

    def _link_base(self) -> None:
        """Keep the base optimizer's param groups the shared ones whatever it loads."""
        self.base_optimizer.register_load_state_dict_pre_hook(self._before_base_load)
        self.base_optimizer.register_load_state_dict_post_hook(self._after_base_load)

    def _before_base_load(self, base: Optimizer, state_dict: dict[str, Any]) -> None:
        self._check_base_state(state_dict)

    def _after_base_load(self, base: Optimizer) -> None:
        """torch's ``load_state_dict`` built new group dicts: copy them into the shared ones.

        Keys the loaded state does not have (the method's ``rho``, ...) keep their values.
        """
        shared, loaded = self.param_groups, base.param_groups
        if loaded is shared:
            return
        for group, new in zip(shared, loaded):
            group.update(new)
        base.param_groups = shared

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """Everything but per-step scratch state and hooks (as torch, hooks are not copied).

        ``copy.deepcopy(opt)``, ``pickle`` and ``torch.save(opt)`` give a working optimizer
        whose next step is bit-identical (copy the model with it, e.g.
        ``copy.deepcopy((model, opt))``, so that both refer to the same new parameters).
        """
        if self._perturbed or self._manual_step:
            raise RuntimeError(
                f"cannot copy or pickle {type(self).__name__} in the middle of a step (the "
                "weights are perturbed): copy it before first_step() or after second_step(); "
                "to save a checkpoint, use opt.state_dict()"
            )
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in _TRANSIENT_ATTRIBUTES
            and not k.startswith("_optimizer_")  # torch's hook registries
            and not isinstance(v, (types.FunctionType, types.MethodType))  # patched methods
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "base_optimizer" not in state:
            return  # torch's load_state_dict updating ``state`` and ``param_groups``
        for key, value in _OPTION_DEFAULTS.items():
            self.__dict__.setdefault(key, value)
        self._reset_transient()
        self._link_base()

    def __repr__(self) -> str:
        text = super().__repr__()  # torch's: every group's hyperparameters
        head = f"{type(self).__name__} ("
        return text.replace(
            head, f"{head}\nbase_optimizer: {type(self.base_optimizer).__name__}", 1
        )
