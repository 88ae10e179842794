"""What a sharpness-aware optimizer saves, loads and copies.

* ``state_dict()`` holds the method's buffers (``state``), the base optimizer's state and
  samkit's counters, so a resumed run continues bit-exactly; ``load_state_dict`` takes it
  back, or a plain torch optimizer's state (a warm start), and refuses a state of another
  class or layout before anything changes; ``base_state_dict()`` is the warm start the
  other way.
* ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the whole optimizer copy every
  attribute except the per-step scratch state, declared once here (:data:`TRANSIENT`: each
  attribute with the factory of its empty value). The same declaration sets that state
  empty at construction, after unpickling and after a load.

:class:`Checkpointing` is a mixin of ``SharpnessAwareOptimizer``; it uses the optimizer's
``base_optimizer``, ``param_groups`` (shared with the base optimizer), ``_method_defaults``
and ``samkit_state``.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from samkit.optim._compat import OPTIONAL_BASE_KEYS
from samkit.optim._perturbation import SavedWeights

__all__ = ["Checkpointing", "FOREIGN_ATTRIBUTES", "TRANSIENT"]

#: The per-step scratch state of the step protocol (``base.py``, ``_finite.py``,
#: ``_distributed.py``): attribute -> factory of its empty value. Never pickled or copied.
TRANSIENT: dict[str, Callable[[], Any]] = {
    # The clean weights while perturb() has moved them (false at the clean weights), and
    # the (device, dtype) plan of the parameter list.
    "_perturbed": SavedWeights,
    "_manual_step": lambda: False,  # between first_step() and second_step()
    "_grad_scaler": lambda: None,  # the closure's GradScaler, during a step
    "_pending_checks": list,  # finiteness flags of this step's passes
    "_unchecked": lambda: None,  # the pass whose gradients are still to be checked
    "_on_accept": list,  # updates to run once the step is accepted
    "_rng": lambda: None,  # the shared random state of the step (share_rng)
    "_bn_cache": lambda: (None, []),  # a model and its BatchNorm layers
    "_local_grads": lambda: False,  # the last backward pass ran in DDP's no_sync()
    "_replica_group": lambda: None,  # ... and its DDP model's process group
    "_pass_model": lambda: None,  # the model of the last pass's closure
    "_sharding_groups": lambda: None,  # mesh groups of sharded parameters (cached)
    # The global norm of the update gradient before clipping (max_grad_norm), a 0-dim
    # tensor on the parameters' device; None until a step has clipped.
    "last_grad_norm": lambda: None,
}

#: Attributes that other objects set on an optimizer: never copied, never reset here.
FOREIGN_ATTRIBUTES = frozenset({"_opt_called"})  # torch's LR schedulers


class Checkpointing:
    """``state_dict``, warm starts and copies (a mixin; see the module docstring)."""

    base_optimizer: Optimizer
    param_groups: list[dict[str, Any]]
    _method_defaults: dict[str, Any]
    samkit_state: dict[str, Any]
    _perturbed: SavedWeights
    _manual_step: bool

    def _reset_transient(self) -> None:
        """Set the per-step scratch state to its empty values (also after unpickling)."""
        for name, empty in TRANSIENT.items():
            setattr(self, name, empty())

    def state_dict(self) -> dict[str, Any]:
        """The method's state, the base optimizer's state and samkit's counters.

        ``state`` holds the method's own buffers (e.g. F-SAM's gradient average); the base
        optimizer's moments are in ``base_optimizer`` (live: ``opt.base_optimizer.state``).
        For a state a plain torch optimizer can load, use :meth:`base_state_dict`.
        """
        sd = super().state_dict()  # type: ignore[misc]
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
        Optimizer.load_state_dict(self, sd)  # type: ignore[arg-type]  # buffers; new groups
        self._keep_saved_dtypes(sd)
        loaded, self.param_groups = self.param_groups, shared
        for group, new in zip(shared, loaded):
            group.update(new)
        self.base_optimizer.load_state_dict(base_sd)
        self.samkit_state.update(counters)
        self._reset_transient()

    def _keep_saved_dtypes(self, sd: dict[str, Any]) -> None:
        """Give a loaded ``bool`` or integer buffer (SSAM's masks) its saved dtype back: torch
        casts every saved state tensor to its parameter's dtype."""
        saved = sd.get("state", {})
        ids = [i for g in sd["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in saved.get(i, {}).items():
                exact = isinstance(value, Tensor) and not value.is_floating_point()
                if exact and key != "step" and not value.is_complex():
                    self.state[p][key] = self.state[p][key].to(value.dtype)

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
        needed = [k for k in self.base_optimizer.defaults if k not in OPTIONAL_BASE_KEYS]
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
            if k not in TRANSIENT
            and k not in FOREIGN_ATTRIBUTES
            and not k.startswith("_optimizer_")  # torch's hook registries
            and not isinstance(v, (types.FunctionType, types.MethodType))  # patched methods
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        if "base_optimizer" not in state:
            return  # torch's load_state_dict updating ``state`` and ``param_groups``
        self._reset_transient()
        self._link_base()
