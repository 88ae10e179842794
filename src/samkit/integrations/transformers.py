"""samkit optimizers in the Hugging Face ``Trainer``: :class:`SharpnessAwareTrainer`.

The ``Trainer`` calls ``optimizer.step()`` without a closure after its own backward pass, so a
method that needs more than one pass per step cannot run there. :class:`SharpnessAwareTrainer`
runs the whole step in its ``training_step``: the closure is the ``Trainer``'s own forward and
backward (``compute_loss``, the loss scaling of gradient accumulation, ``accelerator.backward``)
over the step's micro-batches, and ``optimizer.step(closure)`` runs every pass of the method;
the ``Trainer``'s later ``optimizer.step()`` has nothing left to do. Everything else — data,
schedule, logging, evaluation, checkpoints — is the ``Trainer``'s::

    from samkit.integrations.transformers import SharpnessAwareTrainer

    trainer = SharpnessAwareTrainer(
        model=model, args=TrainingArguments(...), train_dataset=train_ds,
        method="sam", method_kwargs={"rho": 0.05},
    )
    trainer.train()

How the ``TrainingArguments`` map:

* ``learning_rate``, ``weight_decay`` (not on biases and normalisation weights, as the
  ``Trainer`` groups them), ``adam_beta1/2``, ``adam_epsilon`` go to the base optimizer chosen
  by ``optim`` (``adamw_torch``/``adamw_torch_fused`` -> AdamW, ``sgd`` -> SGD, ``adagrad``,
  ``rmsprop``) or by ``base=``; the scheduler is the ``Trainer``'s.
* ``max_grad_norm`` (1.0 by default) becomes the optimizer's ``max_grad_norm``: the update
  gradient is clipped by its global norm right before the base step, never the ascent
  gradient; the logged ``grad_norm`` is its norm before clipping.
* ``gradient_accumulation_steps = k``: every pass of a step runs over the step's ``k``
  micro-batches (the ascent gradient too), with the ``Trainer``'s own loss scaling.
* ``bf16``: autocast, as in the ``Trainer``. ``fp16`` is refused (its gradient scaler is
  stepped by the ``Trainer``, outside the passes), and so are DeepSpeed and FSDP.
* Under several processes the ``Trainer``'s closure runs DDP's synchronised backward in
  every pass: the ascent gradient is the average over the processes (``sync_ascent=True``).

An optimizer passed as ``optimizers=(opt, scheduler)`` must be a samkit sharpness-aware
optimizer; its ``max_grad_norm`` is set from the arguments too.

The ``Trainer``'s closure is its own forward and backward: methods that need the batch itself
(``samkit.make_closure``; ``OptimizerInfo.needs_batch_closure``) are refused when the
trainer is built (:mod:`samkit.integrations._support`; the table in
``docs/scaling.md``). Every step tells the optimizer the epoch (``set_epoch``: the
``Trainer``'s ``state.epoch``, whole epochs done).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

import samkit
from samkit.integrations._clipping import is_samkit, recorded_grad_norm, set_max_grad_norm
from samkit.integrations._support import check_supported

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "samkit.integrations.transformers needs Hugging Face transformers: "
        "pip install 'samkit[integrations]'"
    ) from e

__all__ = ["SharpnessAwareTrainer"]

#: ``TrainingArguments.optim`` -> samkit base optimizer.
BASES = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "sgd": "sgd",
    "adagrad": "adagrad",
    "rmsprop": "rmsprop",
}


class _StepTakenInTrainingStep(torch.optim.Optimizer):
    """What the ``Trainer`` holds as its optimizer: the samkit optimizer's groups, state and
    ``state_dict``, and a ``step()`` without closure that does nothing, because
    :meth:`SharpnessAwareTrainer.training_step` already took the step."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:  # no Optimizer.__init__
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict[str, Any]) -> None:
        self.optimizer.defaults = defaults

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return None if closure is None else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"


class SharpnessAwareTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with a samkit sharpness-aware optimizer.

    Args:
        *args, **kwargs: the ``Trainer``'s.
        method: the samkit method (a name from ``samkit.list_optimizers(sharpness_aware=True)``)
            used when no optimizer is passed in ``optimizers=``.
        method_kwargs: its hyperparameters (``rho``, ...) and base-optimizer settings the
            arguments do not carry (``momentum`` for SGD).
        base: the base optimizer; default: from ``args.optim``.

    See the module docstring for how the ``TrainingArguments`` map.
    """

    def __init__(
        self,
        *args: Any,
        method: str = "sam",
        method_kwargs: dict[str, Any] | None = None,
        base: str | None = None,
        **kwargs: Any,
    ) -> None:
        info = samkit.get_optimizer_info(method)  # ValueError naming the choices
        if not info.sharpness_aware:
            raise ValueError(
                f"method={method!r} is a plain optimizer: use transformers.Trainer for it"
            )
        self.method, self.method_kwargs, self.base = method, dict(method_kwargs or {}), base
        self._sharpness_optimizer: Any = None
        self._window: list[tuple[Any, Any]] = []
        optimizers = kwargs.get("optimizers")
        if optimizers is not None and optimizers[0] is not None:
            opt = optimizers[0]
            if not is_samkit(opt):
                raise TypeError(
                    "SharpnessAwareTrainer needs a samkit sharpness-aware optimizer in "
                    f"optimizers=, got {type(opt).__name__}; use transformers.Trainer for it"
                )
            check_supported(opt, type(self).__name__)
            self._sharpness_optimizer = opt
            kwargs["optimizers"] = (_StepTakenInTrainingStep(opt), optimizers[1])
        else:
            check_supported(method, type(self).__name__)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(training_args, "fp16", False):
            raise self._fp16_refused()
        super().__init__(*args, **kwargs)
        self._refuse_what_cannot_drive_a_closure()
        if self._sharpness_optimizer is not None:
            self._adopt(self._sharpness_optimizer)

    @staticmethod
    def _fp16_refused() -> ValueError:
        return ValueError(
            "SharpnessAwareTrainer does not support fp16=True: the Trainer steps its "
            "gradient scaler outside the optimizer's passes; use bf16=True, or samkit's "
            "own loop (samkit.make_closure(..., grad_scaler=...)), which drives the scaler "
            "through every pass"
        )

    def _refuse_what_cannot_drive_a_closure(self) -> None:
        if self.args.fp16 or getattr(self.accelerator, "scaler", None) is not None:
            raise self._fp16_refused()
        for name in ("is_deepspeed_enabled", "is_fsdp_enabled"):
            if getattr(self, name, False):
                raise ValueError(
                    f"SharpnessAwareTrainer does not support {name[3:-8]}: its engine owns the "
                    "backward pass and the step"
                )

    def _adopt(self, opt: Any) -> None:
        """Map the arguments' clipping onto ``opt``; BatchNorm statistics via ``model=``."""
        set_max_grad_norm(opt, self.args.max_grad_norm)
        if opt.model is None:
            opt.model = self.model

    def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
        """The samkit optimizer (``method`` over the base from ``args.optim``), behind the
        ``Trainer``'s optimizer slot."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        base = self.base or BASES.get(optim)
        if base is None:
            raise ValueError(
                f"optim={optim!r} has no samkit base optimizer: pass base= (one of "
                f"{', '.join(sorted(set(BASES.values())))})"
            )
        kwargs: dict[str, Any] = {"lr": self.args.learning_rate}
        if base in ("adamw", "adam"):
            kwargs.update(
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon
            )
        kwargs.update(self.method_kwargs)
        opt = samkit.create_optimizer(self.method, groups, base=base, model=opt_model, **kwargs)
        self._sharpness_optimizer = opt
        self._adopt(opt)
        self.optimizer = _StepTakenInTrainingStep(opt)
        return self.optimizer

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        """Collect the step's micro-batches; at the last one, run the method's step over them."""
        self._window.append((inputs, num_items_in_batch))
        if not self.accelerator.sync_gradients:  # more micro-batches of this step to come
            return torch.zeros((), device=self.args.device)
        window, self._window = self._window, []
        trainer_pass = super().training_step
        # The epoch the Trainer is in, from 0 (state.epoch counts fractions of epochs done).
        self._sharpness_optimizer.set_epoch(int(self.state.epoch or 0))

        def closure() -> torch.Tensor:  # one pass: the Trainer's forward + backward
            total = None
            for k, (micro, items) in enumerate(window):
                last = k == len(window) - 1
                sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
                with sync:
                    loss = trainer_pass(model, micro, items)
                total = loss if total is None else total + loss
            assert total is not None
            return total

        loss = self._sharpness_optimizer.step(closure)
        return loss.detach()

    def _clip_grad_norm(self, model: Any) -> Any:
        """No clipping here: the optimizer clipped the update gradient inside its step."""
        norm = recorded_grad_norm(self._sharpness_optimizer)
        return norm if norm is not None else super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: Any, grad_norm: Any = None) -> Any:
        """The update gradient's norm before clipping, as the optimizer recorded it."""
        norm = recorded_grad_norm(self._sharpness_optimizer)
        return norm if norm is not None else super()._get_grad_norm(model, grad_norm=grad_norm)
