"""The shared machinery of every sharpness-aware optimizer in samkit.

:class:`SharpnessAwareOptimizer` wraps any ``torch.optim.Optimizer`` (the *base* optimizer)
and owns everything the variants have in common:

* the closure protocol: ``step(closure)`` calls the closure for every pass the method needs
  (including the first) and returns the clean loss;
* saving, perturbing and restoring the weights with ``torch._foreach_*`` kernels grouped by
  device and dtype (a plain loop with ``foreach=False``); restoring copies the saved weights
  back, so it is exact, and it also happens when a pass raises;
* the global gradient norm, ASAM's elementwise scaling ``T = |w| + eta``, per-group radii;
* BatchNorm running statistics frozen during every perturbed pass
  (:func:`~samkit.optim.batchnorm.frozen_bn_stats`), ``no_sync()`` for the ascent pass under
  DistributedDataParallel;
* non-finite losses and gradients (``on_nonfinite``);
* ``state_dict()`` that contains the base optimizer's state (momentum buffers) and every
  samkit buffer, so a resumed run continues exactly.

A method overrides one small hook: :meth:`ascent_direction` (the direction to normalise,
default the clean gradient) or, for methods with a different sequence of passes,
:meth:`sharpness_step`. See ``docs/adding_a_method.md``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from samkit.optim import _tensors as T
from samkit.optim.batchnorm import bn_layers, frozen_bn_stats
from samkit.optim.closure import BatchClosure

__all__ = [
    "SharpnessAwareOptimizer",
    "NonFiniteError",
    "BASE_OPTIMIZERS",
    "resolve_base_optimizer",
    "GroupParams",
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


def is_finite_nonnegative(value: Any) -> bool:
    """Whether ``value`` is a real number (not a bool) in ``[0, inf)``."""
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < math.inf
    )


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
    """A base optimizer class from a class or one of the names in ``BASE_OPTIMIZERS``."""
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
    return base_optimizer


class SharpnessAwareOptimizer(Optimizer):
    """Base class: a sharpness-aware wrapper around a torch optimizer.

    Args:
        params: parameters or param groups (named parameters work too). Groups may carry
            their own values of the method's hyperparameters (e.g. ``rho``).
        base_optimizer: a ``torch.optim.Optimizer`` class or a name from
            ``BASE_OPTIMIZERS`` (``"sgd"``, ``"adamw"``, ...).
        defaults: the method's per-group hyperparameters and their default values.
        model: the model being trained. Optional; when given (or when the closure is a
            :class:`~samkit.BatchClosure`, which knows its model) BatchNorm running
            statistics are frozen during perturbed passes and, under DDP, the ascent pass
            runs inside ``no_sync()``.
        foreach: use ``torch._foreach_*`` kernels (default) or a plain loop.
        on_nonfinite: ``"raise"`` (default) raises :class:`NonFiniteError` naming the method
            and the pass when a loss or gradient is NaN/inf; ``"skip"`` restores the weights,
            skips the update and counts it in ``skipped_steps``; ``"ignore"`` does not check
            (saves one device synchronisation per pass).
        sync_ascent: under DDP, also all-reduce the ascent pass's gradients (default
            ``False``: each replica perturbs with its own gradient, as in the original SAM).
        perturb_eps: added to the norm in every normalisation (``1e-12``).
        **base_kwargs: passed to the base optimizer (``lr``, ``momentum``, ...).
    """

    #: Registry-style name used in messages.
    method_name = "sharpness-aware optimizer"

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
        perturb_eps: float = 1e-12,
        **base_kwargs: Any,
    ) -> None:
        base_cls = resolve_base_optimizer(base_optimizer)
        if on_nonfinite not in ("raise", "skip", "ignore"):
            raise ValueError(
                f"Invalid on_nonfinite value: {on_nonfinite!r} (use 'raise', 'skip' or 'ignore')"
            )
        if not perturb_eps >= 0.0:
            raise ValueError(f"Invalid perturb_eps value: {perturb_eps}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if "foreach" in base_kwargs:
            raise ValueError(
                "foreach is samkit's own option; it is not passed to the base optimizer"
            )
        self._method_defaults = dict(defaults or {})
        super().__init__(params, self._method_defaults)
        self.base_optimizer: Optimizer = base_cls(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        for group in self.param_groups:
            self._check_group(group)
        self.model = model
        self.foreach = True if foreach is None else bool(foreach)
        self.on_nonfinite = on_nonfinite
        self.sync_ascent = bool(sync_ascent)
        self.perturb_eps = float(perturb_eps)
        #: Counters saved in ``state_dict()``: optimizer steps taken and steps skipped.
        self.samkit_state: dict[str, Any] = {"step": 0, "skipped_steps": 0, "epoch": None}
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

    # ------------------------------------------------------------------ hyperparameters
    def validate_group(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for invalid per-group hyperparameters (override to extend)."""
        if "rho" in group and not is_finite_nonnegative(group["rho"]):
            raise ValueError(f"Invalid rho value: {group['rho']}")
        # ASAM scaling options, read by perturb() for every method that offers ``adaptive``.
        if "eta" in group and not is_finite_nonnegative(group["eta"]):
            raise ValueError(f"Invalid eta value: {group['eta']}")
        choice = group.get("weight_scaling")
        if choice not in (None, True, False):
            raise ValueError(f"Invalid weight_scaling value: {choice!r} (use None, True or False)")

    def _check_group(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer parameters must be tensors, got {type(p).__name__}")
        self.validate_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base_optimizer"):
            # Called by Optimizer.__init__: build the group with the method's defaults.
            super().add_param_group(param_group)
            return
        for key, value in self._method_defaults.items():
            param_group.setdefault(key, value)
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list
        self._check_group(self.param_groups[-1])

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
        if self.needs_epoch:
            self.current_epoch()  # a clear error before any pass runs
        self._grad_scaler = getattr(closure, "grad_scaler", None)
        try:
            return self.sharpness_step(closure)
        except _SkipStep as skip:
            if self._grad_scaler is not None and self._grad_scaler.is_enabled():
                # Let the scaler see the overflowing gradients: it skips the update and
                # lowers its scale at the user's grad_scaler.update().
                self.restore()
                self._grad_scaler.step(self.base_optimizer)
            self.zero_grad(set_to_none=True)
            self.samkit_state["skipped_steps"] += 1
            return skip.args[0] if skip.args else None
        finally:
            self.restore()
            self._grad_scaler = None
            self._pending_checks = []
            self._unchecked = None
            self._on_accept = []

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

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to the perturbed weights using the gradients already in ``.grad``."""
        self._on_accept = []  # a new step: drop updates of a step that never completed
        self.perturb()
        if zero_grad:
            self.zero_grad(set_to_none=True)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the clean weights and apply the base optimizer with the current ``.grad``."""
        self.restore()
        self.base_step()
        if zero_grad:
            self.zero_grad(set_to_none=True)

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
        """
        if sync is None:
            sync = True if perturbed else self.sync_ascent
        needs_batch = subset is not None or not backward or per_sample or extra_loss is not None
        if backward:
            self._check_unchecked_grads()  # before this pass overwrites them
            self.zero_grad(set_to_none=True)
        if perturbed:
            model = self.model if self.model is not None else getattr(closure, "model", None)
            bn: Any = frozen_bn_stats(self._bn_layers_of(model))
        else:
            bn = contextlib.nullcontext()
        if backward:
            model_of_pass = getattr(closure, "model", None)
            self._local_grads = (
                not sync and isinstance(closure, BatchClosure) and hasattr(model_of_pass, "no_sync")
            )
            if self._local_grads:
                self._replica_group = getattr(model_of_pass, "process_group", None)
        with bn, torch.enable_grad():
            if isinstance(closure, BatchClosure):
                loss = closure.evaluate(
                    subset,
                    backward=backward,
                    per_sample=per_sample,
                    sync_gradients=sync,
                    extra_loss=extra_loss,
                )
            elif needs_batch:
                raise TypeError(
                    f"{type(self).__name__} needs per-sample or sub-batch evaluations: build the "
                    "closure with samkit.make_closure(model, loss_fn, inputs, targets)"
                )
            else:
                loss = closure()
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
        the next pass or the base step (one norm fewer per step for SAM).
        """
        if isinstance(loss, Tensor):
            self._pending_checks.append((name, loss, [torch.isfinite(loss.detach()).all()]))
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
        """
        self._check_unchecked_grads()
        pending, self._pending_checks = self._pending_checks, []
        if not pending:
            return
        device = pending[0][2][0].device
        flat = [f.to(device) for _, _, flags in pending for f in flags]
        ok = torch.stack(flat).tolist()
        if all(ok):
            return
        k = 0
        name, loss = pending[-1][0], pending[-1][1]
        for name, loss, flags in pending:  # noqa: B007 (the first failing pass is reported)
            if not all(ok[k : k + len(flags)]):
                break
            k += len(flags)
        loss_text = f"{float(loss.detach().float().mean()):g}" if isinstance(loss, Tensor) else "?"
        scaler = self._grad_scaler
        if self.on_nonfinite == "skip" or (scaler is not None and scaler.is_enabled()):
            # With a GradScaler, overflowing scaled gradients are routine: skip the step.
            raise _SkipStep(pending[0][1])
        raise NonFiniteError(
            f"{type(self).__name__}: non-finite loss or gradient in the {name} pass "
            f"(loss={loss_text}); the weights were left unchanged. Pass on_nonfinite='skip' "
            "to skip such steps."
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
        """Copy the saved clean weights back (exact); does nothing if not perturbed."""
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
        self.verify_finite()
        if self._grad_scaler is not None:
            self._grad_scaler.step(self.base_optimizer)
        else:
            self.base_optimizer.step()
        self.samkit_state["step"] += 1
        hooks, self._on_accept = self._on_accept, []
        for hook in hooks:
            hook()

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
        """The method's state, the base optimizer's state and samkit's counters."""
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        sd["samkit"] = dict(self.samkit_state)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        sd = dict(state_dict)
        if "base_optimizer" not in sd:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict: the state has no 'base_optimizer' "
                "entry (was it saved by a different optimizer?)"
            )
        base_sd = sd.pop("base_optimizer")
        counters = sd.pop("samkit", {})
        super().load_state_dict(sd)
        self.base_optimizer.load_state_dict(base_sd)
        self.base_optimizer.param_groups = self.param_groups
        self.samkit_state.update(counters)
        self._backup = {}
        self._perturbed = []
        self._plan_key = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, groups={len(self.param_groups)})"
