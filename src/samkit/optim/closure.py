"""The closure protocol between a training loop and a sharpness-aware optimizer.

Every samkit optimizer accepts a *standard* torch closure: a callable that zeroes the
gradients, computes the loss, calls ``backward()`` and returns the loss. That covers SAM and
every method whose passes are "the same batch, full backward".

Some methods need more from the batch than a closure can give: per-sample losses (ESAM's data
selection, AUSAM), a forward/backward pass on a subset of the batch, a forward pass without
backward, the sample indices (SAF, AUSAM), or the model itself (BatchNorm, DDP ``no_sync``).
:class:`BatchClosure` is a standard closure that also knows its batch and can do all of
those. ``samkit train`` always builds one, so adding such a method never changes the loop::

    closure = samkit.make_closure(model, loss_fn, inputs, targets, indices=idx)
    loss = opt.step(closure)       # works for plain torch optimizers too

``loss_fn(outputs, targets)`` should return per-sample losses (``reduction="none"``); a
loss function that returns a scalar mean works for every method that needs no per-sample
losses, and methods that do need them raise a clear error.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BatchClosure", "make_closure"]

LossFn = Callable[[Any, Tensor], Tensor]
ExtraLoss = Callable[[Any, Tensor | None, Tensor], Tensor]


class BatchClosure:
    """A standard closure over one batch, with extra entry points for richer methods.

    Args:
        model: the module to run (``model(inputs)`` gives the outputs).
        loss_fn: ``loss_fn(outputs, targets)``, per-sample losses (preferred) or the mean.
        inputs, targets: the batch; tensors whose first dimension is the batch dimension.
        indices: optional dataset indices of the samples (``LongTensor`` of shape ``[B]``).
        accumulation_steps: split every pass into this many micro-batches (gradient
            accumulation); gradients and losses equal the full-batch ones up to rounding.
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` or ``torch.float16``) on the inputs' device type.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 training: every backward pass
            uses the scaled loss, and sharpness-aware optimizers take their base step with
            ``grad_scaler.step(base_optimizer)`` (call ``grad_scaler.update()`` after
            ``opt.step(closure)`` as usual). Perturbation directions are unaffected by the
            scale (they are normalised); a step whose gradients overflow is skipped by the
            scaler and the weights are restored.

    Calling the object (``closure()``) is the standard pass: zero the model's gradients,
    forward the whole batch, backward the mean loss, return the mean loss (detached).
    :meth:`evaluate` is the general form used by optimizers.

    Attributes set as passes run: ``outputs`` (the outputs of the first full-batch pass,
    detached, for metrics such as training accuracy), ``passes`` (number of forward
    passes), ``grad_evals`` (backward passes counted in full-batch units: a backward pass on
    half the batch counts 0.5) and ``forward_evals`` (likewise, forward passes).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        inputs: Any,
        targets: Tensor,
        *,
        indices: Tensor | None = None,
        accumulation_steps: int = 1,
        autocast_dtype: torch.dtype | None = None,
        grad_scaler: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"Invalid accumulation_steps value: {accumulation_steps}")
        self.model = model
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.targets = targets
        self.indices = indices
        self.accumulation_steps = accumulation_steps
        self.autocast_dtype = autocast_dtype
        if grad_scaler is not None and not hasattr(grad_scaler, "scale"):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {grad_scaler!r}")
        self.grad_scaler = grad_scaler
        self.batch_size = int(targets.shape[0])
        if indices is not None and int(indices.shape[0]) != self.batch_size:
            raise ValueError(
                f"indices has {int(indices.shape[0])} entries but the batch has {self.batch_size}"
            )
        self.outputs: Any = None
        self.passes = 0
        self.grad_evals = 0.0
        self.forward_evals = 0.0

    def __call__(self) -> Tensor:
        return self.evaluate()

    def evaluate(
        self,
        subset: Tensor | None = None,
        *,
        backward: bool = True,
        per_sample: bool = False,
        sync_gradients: bool = True,
        extra_loss: ExtraLoss | None = None,
    ) -> Tensor:
        """Forward (and optionally backward) a pass over the batch or a subset of it.

        Args:
            subset: indices *into the batch* (``LongTensor``) or a boolean mask; ``None``
                means the whole batch.
            backward: zero the model's gradients and backpropagate the mean loss over the
                samples of the pass. With ``False`` the pass runs under ``torch.no_grad()``.
            per_sample: return the per-sample losses ``[n]`` instead of their mean
                (requires a ``loss_fn`` that returns per-sample losses).
            sync_gradients: under ``DistributedDataParallel``, ``False`` runs the pass
                inside ``model.no_sync()`` so its gradients stay local to the replica.
            extra_loss: ``extra_loss(outputs, indices, targets) -> scalar`` added to the
                mean loss before backward (for regularisers such as SAF's); the returned
                loss includes it.

        Returns the detached mean loss (0-dim) or per-sample losses.
        """
        inputs, targets, indices = self.inputs, self.targets, self.indices
        if subset is not None:
            if subset.dtype == torch.bool:
                subset = subset.nonzero().flatten()
            inputs = _take(inputs, subset)
            targets = targets[subset]
            indices = indices[subset] if indices is not None else None
        n = int(targets.shape[0])
        if n == 0:
            raise ValueError("evaluate() was given an empty subset of the batch")
        if backward:
            for p in self.model.parameters():
                p.grad = None

        chunks = _chunks(n, self.accumulation_steps)
        keep_outputs = self.outputs is None and subset is None
        outputs: list[Any] = []
        losses: list[Tensor] = []
        total: Tensor | None = None
        grad_ctx = torch.enable_grad() if backward else torch.no_grad()
        with grad_ctx:
            for k, (lo, hi) in enumerate(chunks):
                last = k == len(chunks) - 1
                x = _slice(inputs, lo, hi)
                y = targets[lo:hi]
                with (
                    self._autocast(),
                    self._maybe_no_sync(backward and not (sync_gradients and last)),
                ):
                    out = self.model(x)
                    raw = self.loss_fn(out, y)
                    if per_sample and raw.dim() == 0:
                        raise ValueError(
                            "this optimizer needs per-sample losses: build the closure with a "
                            "loss_fn that returns one loss per sample, e.g. "
                            "nn.CrossEntropyLoss(reduction='none')"
                        )
                    raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
                    chunk_sum = raw.sum() if raw.dim() > 0 else raw * (hi - lo)
                    objective = chunk_sum / n
                    if extra_loss is not None:
                        idx = indices[lo:hi] if indices is not None else None
                        objective = objective + extra_loss(out, idx, y) * ((hi - lo) / n)
                    if backward:
                        if self.grad_scaler is not None:
                            self.grad_scaler.scale(objective).backward()
                        else:
                            objective.backward()
                total = objective.detach() if total is None else total + objective.detach()
                if per_sample:
                    losses.append(raw.detach())
                if keep_outputs:
                    outputs.append(_detach(out))
        if keep_outputs:
            self.outputs = outputs[0] if len(outputs) == 1 else _concat(outputs)
        self.passes += 1
        self.forward_evals += n / self.batch_size
        if backward:
            self.grad_evals += n / self.batch_size
        if per_sample:
            return torch.cat(losses)
        assert total is not None
        return total

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = _device_of(self.inputs).type
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def _maybe_no_sync(self, no_sync: bool) -> contextlib.AbstractContextManager:
        if no_sync and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()


def make_closure(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Any,
    targets: Tensor,
    *,
    indices: Tensor | None = None,
    accumulation_steps: int = 1,
    autocast_dtype: torch.dtype | None = None,
    grad_scaler: Any = None,
) -> BatchClosure:
    """Build the :class:`BatchClosure` for one batch (see the class for the arguments)."""
    return BatchClosure(
        model,
        loss_fn,
        inputs,
        targets,
        indices=indices,
        accumulation_steps=accumulation_steps,
        autocast_dtype=autocast_dtype,
        grad_scaler=grad_scaler,
    )


def _chunks(n: int, k: int) -> list[tuple[int, int]]:
    k = min(k, n)
    size = math.ceil(n / k)
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


def _map_batch(inputs: Any, leaf: Callable[[Tensor], Tensor], verb: str) -> Any:
    """Apply ``leaf`` to every tensor of a batch given as a tensor, list/tuple or dict."""
    if isinstance(inputs, Tensor):
        return leaf(inputs)
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_map_batch(t, leaf, verb) for t in inputs)
    if isinstance(inputs, dict):
        return {k: _map_batch(v, leaf, verb) for k, v in inputs.items()}
    raise TypeError(f"cannot {verb} inputs of type {type(inputs).__name__}")


def _take(inputs: Any, idx: Tensor) -> Any:
    return _map_batch(inputs, lambda t: t[idx.to(t.device)], "index")


def _slice(inputs: Any, lo: int, hi: int) -> Any:
    return _map_batch(inputs, lambda t: t[lo:hi], "slice")


def _detach(out: Any) -> Any:
    if isinstance(out, Tensor):
        return out.detach()
    if isinstance(out, (list, tuple)):
        return type(out)(_detach(t) for t in out)
    return out


def _device_of(inputs: Any) -> torch.device:
    if isinstance(inputs, Tensor):
        return inputs.device
    if isinstance(inputs, (list, tuple)) and inputs:
        return _device_of(inputs[0])
    if isinstance(inputs, dict) and inputs:
        return _device_of(next(iter(inputs.values())))
    return torch.device("cpu")


def _concat(outputs: list[Any]) -> Any:
    if all(isinstance(o, Tensor) for o in outputs):
        return torch.cat(outputs)
    return None
