"""The step protocol every sharpness-aware optimizer in samkit shares.

:class:`SharpnessAwareOptimizer` wraps any ``torch.optim.Optimizer`` (the *base* optimizer)
and runs a step as a sequence of passes through the user's closure:

* ``step(closure)`` calls ``sharpness_step``, which runs the method's passes with
  ``run_pass``, moves the weights with ``perturb`` (collect the gradients, save the weights,
  add ``ε``) and ``restore`` (copy them back, exactly; also when a pass raises), and ends
  with ``base_step``, the base optimizer's update at the clean weights; state a method keeps
  across steps changes in ``on_accept`` only;
* the norm is global (over every parameter with a gradient, of the whole model under FSDP2);
  ASAM's elementwise scaling ``T = |w| + eta`` and per-group radii are part of ``perturb``;
* BatchNorm running statistics are frozen during every perturbed pass, the ascent pass
  runs in DDP's ``no_sync()``, the update gradient can be clipped (``max_grad_norm``);
* what a method declares once is enforced here: its per-group hyperparameters
  (``validate_group``), those that must be the same in every group (``step_globals``),
  whether it keeps SAM's passes (or refuses ``first_step``), whether it runs on FSDP2.

Around the protocol, one module per concern: the non-finite policy (``_finite``), the steps
driven by hand (``_manual``), process groups and collectives (``_distributed``), random
state (``_rng``), saving, loading and copying (``_state``), ASAM's scaling (``_asam``), what
the constructor accepts (``_validation``), torch-version shims (``_compat``) and the
tensor-list kernels (``_tensors``). A new method overrides one hook: see
``docs/adding_a_method.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.optimizer import required

from samkit.optim._asam import ASAM_ETA, asam_defaults, asam_scales
from samkit.optim._compat import without_global_step_hooks
from samkit.optim._distributed import ProcessGroups, replica_group
from samkit.optim._finite import FiniteChecks, NonFiniteError, SkipStep
from samkit.optim._manual import ManualSteps
from samkit.optim._perturbation import Perturbation
from samkit.optim._rng import SharedRandomState, cuda_devices
from samkit.optim._state import Checkpointing
from samkit.optim._tensors import global_norm, in_shared_memory, is_sharded, mul_
from samkit.optim._validation import (
    BASE_OPTIMIZERS,
    check_keywords,
    invalid_value,
    is_finite_nonnegative,
    resolve_base_optimizer,
)
from samkit.optim.batchnorm import bn_layers, frozen_bn_stats, smallest_sub_batch
from samkit.optim.closure import NO_CLOSURE_MESSAGE, STANDARD_CLOSURE, BatchClosure

__all__ = [
    "SharpnessAwareOptimizer",
    "NonFiniteError",
    "BASE_OPTIMIZERS",
    "resolve_base_optimizer",
    "GroupParams",
    "ASAM_ETA",
    "asam_defaults",
    "invalid_value",
    "is_finite_nonnegative",
]


class GroupParams:
    """The parameters of one param group that take part in a step, with their gradients."""

    __slots__ = ("group", "params", "grads")

    def __init__(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]):
        self.group = group
        self.params = params
        self.grads = grads


class SharpnessAwareOptimizer(ManualSteps, ProcessGroups, FiniteChecks, Checkpointing, Optimizer):
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

    #: Hyperparameters that configure the whole step rather than a param group (LookSAM's
    #: ``k``, ESAM's ``gamma``, SSAM's mask schedule): every group must hold the same value,
    #: which is checked when a group is built or added. Read them with :meth:`step_global`.
    step_globals: tuple[str, ...] = ()

    #: State that a step changes before its last pass, to stay at the memory floor
    #: (per-parameter ``state`` keys and ``samkit_state`` keys): F-SAM's gradient average
    #: (updated from a finite clean pass only), LookSAM's cached direction (dropped when a
    #: refresh begins; the retried refresh does not read it), SSAM-F's Fisher sum and the
    #: masks it completes. A step that fails or is skipped after its first pass may leave
    #: these changed, as each method's docstring says; all other state, the weights and the
    #: base optimizer are left exactly as before the step.
    clean_pass_state: tuple[str, ...] = ()

    #: Constructor switches that choose how or where the method is computed, not what it
    #: computes (mSAM's ``vectorize``, SAF's bank storage): not hyperparameters of the
    #: method, so tables of its settings leave them out.
    implementation_switches: tuple[str, ...] = ()

    #: Whether ``first_step``/``second_step`` implement the method. ``None``: only when the
    #: class keeps SAM's sequence of passes (it does not override :meth:`sharpness_step`).
    supports_manual_steps: bool | None = None

    #: A method with its own sequence of passes says in a few words what it is; the error
    #: that refuses ``first_step``/``second_step`` shows it.
    own_passes = ""

    #: Why the method cannot run on sharded (``DTensor``, e.g. FSDP2) parameters, or ``None``
    #: if it can. When set, a step on such parameters raises a ``TypeError`` that gives this
    #: reason (e.g. per-sample gradients through ``torch.func``, which need whole tensors).
    #: A method whose support depends on its options may define it as a property.
    fsdp_unsupported: str | None = None

    #: Methods that act on epoch boundaries (SAF, MESA, SSAM) set this to ``True``; their
    #: steps then refuse to run until :meth:`set_epoch` has been called.
    needs_epoch = False

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
            raise invalid_value("on_nonfinite", on_nonfinite, "'raise', 'skip' or 'ignore'")
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
        check_keywords(type(self), base_cls, base_kwargs)
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
            raise invalid_value("weight_scaling", choice, "None, True or False")

    def _check_group(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer parameters must be tensors, got {type(p).__name__}")
        self._check_values(group)

    def _check_values(self, group: dict[str, Any]) -> None:
        """The group's values (:meth:`validate_group`), then the :attr:`step_globals`."""
        self.validate_group(group)  # may complete the group (e.g. initial_lr)
        first = self.param_groups[0] if self.param_groups else group
        for key in self.step_globals:
            if group.get(key) != first.get(key):
                raise ValueError(
                    f"Invalid {key} value: {group.get(key)!r} in a param group: "
                    f"{type(self).__name__} needs the same {key} in every param group, as "
                    f"{key} configures the whole step (the groups have "
                    f"{[first.get(key), group.get(key)]})"
                )

    def step_global(self, key: str) -> Any:
        """The value of the step-global hyperparameter ``key`` (see :attr:`step_globals`)."""
        return self.param_groups[0][key]

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
        self._check_values(candidate)  # may complete it (e.g. initial_lr)
        for key, value in candidate.items():
            param_group.setdefault(key, value)
        # torch's own checks (tensors, leaves, duplicates) also run before it appends.
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list
        self._sharding_groups = None

    # ------------------------------------------------------------------ the step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Run every pass of the method through ``closure`` and update the weights.

        ``closure`` is a standard torch closure (zero the gradients, compute the loss, call
        ``backward()``, return the loss) or a :class:`~samkit.BatchClosure`. Returns the
        loss at the clean weights (the closure's first return value).
        """
        if closure is None:
            raise RuntimeError(NO_CLOSURE_MESSAGE.format(name=type(self).__name__))
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
            self._rng = SharedRandomState(cuda_devices(self.param_groups))
        try:
            return self.sharpness_step(closure)
        except SkipStep as skip:
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

    def _check_manual_steps_supported(self) -> None:
        """Refuse ``first_step``/``second_step`` for a method with its own passes."""
        supported = self.supports_manual_steps
        if supported is None:
            supported = type(self).sharpness_step is SharpnessAwareOptimizer.sharpness_step
        if not supported:
            what = f" ({self.own_passes})" if self.own_passes else ""
            raise RuntimeError(
                f"{type(self).__name__} has its own sequence of passes{what}: drive it with "
                "step(closure). first_step()/second_step() implement SAM's two passes only"
            )

    def _has_gradients(self) -> bool:
        """Whether any trainable parameter has a gradient (stops at the first one)."""
        return any(
            p.grad is not None and p.requires_grad for g in self.param_groups for p in g["params"]
        )

    # ------------------------------------------------------------------ passes
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
        with the random state the first one started from (after :meth:`redraw`, the next
        pass's). A backward pass that leaves no
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
                self._replica_group = replica_group(model_of_pass)
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
                f"NaN/inf): {STANDARD_CLOSURE}"
            )
        if backward and not self._has_gradients():
            raise RuntimeError(
                f"{type(self).__name__}: the {name} pass left no parameter with a gradient. "
                f"The closure must call loss.backward() before returning the loss "
                f"({STANDARD_CLOSURE}); if it does, check that the loss depends on the "
                "optimizer's parameters"
            )
        if self.on_nonfinite != "ignore":
            self._record_finite(name, loss, backward)
        return loss

    def smallest_sub_batch(self, closure: Any) -> int:
        """The fewest samples a pass on part of the batch may have: 2 while a BatchNorm layer
        of the model (``model=`` or the closure's) is in train mode, else 1
        (:func:`~samkit.optim.batchnorm.smallest_sub_batch`)."""
        model = self.model if self.model is not None else getattr(closure, "model", None)
        return smallest_sub_batch(self._bn_layers_of(model))

    def redraw(self) -> None:
        """The next pass draws new random numbers and the later passes of the step replay
        those (with ``share_rng``): for passes over other samples (mSAM's micro-batches)."""
        if self._rng is not None:
            self._rng.restart()

    def _bn_layers_of(self, model: nn.Module | None) -> list[Any]:
        """BatchNorm layers of ``model``, cached per model object."""
        if model is None:
            return []
        if self._bn_cache[0] is not model:
            self._bn_cache = (model, bn_layers(model))
        return self._bn_cache[1]

    def _check_sharding(self) -> None:
        """Refuse sharded parameters for a method that sets :attr:`fsdp_unsupported`."""
        reason = self.fsdp_unsupported
        if reason is None:
            return
        if is_sharded([p for g in self.param_groups for p in g["params"]]):
            raise TypeError(
                f"{type(self).__name__} cannot run on sharded (DTensor) parameters such as "
                f"those of an FSDP2 (fully_shard) model: {reason}"
            )

    # ------------------------------------------------------------------ collect, perturb, restore
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

    @staticmethod
    def gradients(params: list[Tensor], *, fill: bool = False) -> list[Tensor]:
        """The gradients of ``params`` after a pass, zeros where the pass gave none.

        ``fill=False``, to read them: the zeros are new tensors and such a parameter stays
        without a gradient, so the base step leaves it alone. ``fill=True``, to write the
        update into them in place (GSAM): the zeros become the parameter's ``.grad``, so the
        base step applies what is written there.
        """
        out = []
        for p in params:
            if p.grad is None:
                zeros = torch.zeros_like(p)
                if fill:
                    p.grad = zeros
                out.append(zeros)
            else:
                out.append(p.grad.detach())
        return out

    def kept(self, grads: list[Tensor]) -> list[Tensor]:
        """Gradients of the last pass (from :meth:`collect`) to read after the next passes.

        Every pass of :meth:`step` starts from ``.grad = None``, so autograd gives it new
        tensors and these keep their values: kept by reference, not copied. Copied are a
        gradient in a shared buffer (a view into DDP's buckets, ``gradient_as_bucket_view``,
        which the next synchronised pass overwrites) and, between :meth:`first_step` and
        :meth:`second_step`, every gradient (the loop runs that pass). Once the next pass has
        run, the method owns them and may change them in place.
        """
        return [g.clone() if self._manual_step or in_shared_memory(g) else g for g in grads]

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
        mask: list[list[Tensor | None]] | None = None,
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

        ``mask`` (per group, parallel to ``directions``; ``None``: no mask) perturbs along
        ``d ⊙ m``, written into ``d`` in place once the norm is taken, with no buffer for the
        product: ``d`` must be the method's to change (Sparse SAM's clean gradients, which the
        next pass replaces).
        """
        if self._perturbed:
            raise RuntimeError("the weights are already perturbed: call restore() first")
        groups = self.collect()
        from_grads = directions is None
        if from_grads:
            directions = self.ascent_direction(groups)
        move = Perturbation(groups, directions, norm_of, radius, sign, self._asam_scales, mask)
        del groups, directions  # the gradients are the passes' to free
        plan = self._perturbed.plan(move.params)
        norm = global_norm(move.norm_tensors, self.foreach, plan)
        if from_grads:  # d is derived from the gradients: a NaN/inf there shows in ‖d‖
            self._check_unchecked_grads(norm)
        if move.params:
            self._perturbed.save(move.params, self.foreach, plan)
            move.apply(norm + self.perturb_eps, self.foreach, plan)
        return norm

    def _asam_scales(self, gp: GroupParams) -> list[Tensor | None]:
        """ASAM's ``T = |w| + eta`` for the group's weight tensors, ``None`` (T = 1) elsewhere."""
        return asam_scales(gp.group, gp.params)

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the saved clean weights back (exact); does nothing if not perturbed.

        Also abandons a manual step begun with :meth:`first_step`.
        """
        self._manual_step = False
        self._perturbed.restore(self.foreach)

    @property
    def is_perturbed(self) -> bool:
        """Whether the weights currently sit at a perturbed point."""
        return bool(self._perturbed)

    # ------------------------------------------------------------------ the update
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

    def on_accept(self, update: Callable[[], None]) -> None:
        """Run ``update`` once this step is accepted (after the finiteness check).

        Methods that keep state across steps (an EMA of gradients, a cache) register its
        update here instead of applying it during the passes, so a step that raises or is
        skipped (``on_nonfinite="skip"``) leaves their state untouched.
        """
        self._on_accept.append(update)

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
        norm = global_norm(grads, self.foreach)
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
        mul_(grads, coef, self.foreach)

    def _base_optimizer_step(self) -> None:
        """The wrapped optimizer's step (through the GradScaler if there is one).

        torch's global step hooks already fire around this optimizer's own ``step``; they do
        not fire a second time for the base optimizer (its own hooks do fire).
        """
        with without_global_step_hooks():
            if self._grad_scaler is not None:
                self._grad_scaler.step(self.base_optimizer)
            else:
                self.base_optimizer.step()

    # ------------------------------------------------------------------ epochs and counters
    def set_epoch(self, epoch: int) -> None:
        """Tell the optimizer that epoch ``epoch`` (counted from 0) starts.

        Call it at the start of every epoch, as with ``DistributedSampler.set_epoch``
        (``samkit train`` does). Every samkit optimizer accepts it; methods that do not act
        on epochs ignore it. The epoch is part of :meth:`state_dict`.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise invalid_value("epoch", epoch, "an integer >= 0")
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

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because of non-finite values (``on_nonfinite='skip'``)."""
        return int(self.samkit_state["skipped_steps"])

    def __repr__(self) -> str:
        text = super().__repr__()  # torch's: every group's hyperparameters
        head = f"{type(self).__name__} ("
        return text.replace(
            head, f"{head}\nbase_optimizer: {type(self.base_optimizer).__name__}", 1
        )
