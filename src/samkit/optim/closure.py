r"""The closure protocol between a training loop and a sharpness-aware optimizer.

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

What ``loss_fn`` returns (the same rule as :mod:`samkit.sharpness`).
``loss_fn(outputs, targets)`` returns the *unreduced* losses with the batch as first dimension
(``reduction="none"``: ``[B]`` per sample, ``[B, T]`` per token, ``[B, D]`` per output) or
their *mean* (0-dim). The objective is torch's ``reduction="mean"`` of the whole batch:

.. math::

    L_B = \frac{\sum_{(i,t) \in C} \ell_{it}}{\sum_{(i,t) \in C} m_{it}}

where ``ℓ_it`` are the unreduced losses (element ``t`` of sample ``i``), ``C`` the counted
elements (those whose target is not ``ignore_index``: padding counts for nothing) and
``m_it = 1``, or ``w[y_it]`` with class weights ``w`` (``weight=`` of the loss module, whose
unreduced losses already carry the weight), as in torch. ``ignore_index`` and ``weight`` are
read from an ``nn.CrossEntropyLoss`` or ``nn.NLLLoss`` module, or ``ignore_index`` is given to
:func:`make_closure` (needed when ``loss_fn`` is a plain function). So a per-token
cross-entropy over padded sequences is the mean over real tokens, exactly
``F.cross_entropy(..., ignore_index=pad)``. A batch in which nothing counts gives ``nan``, as
in torch (``on_nonfinite`` then reports it).

The same holds under gradient accumulation (every micro-batch's sum is divided by the whole
batch's count, not its own) and on a sub-batch (``subset``: the mean over that sub-batch's
counted elements). A 0-dim (mean) loss works as well: each micro-batch's mean is weighted by
its share of the count (samples, or counted targets when ``ignore_index`` applies), but
methods that need per-sample losses refuse it.

Per-sample losses (``per_sample=True``, used by ESAM's selection) are the same mean over each
sample's own counted elements (what ``reduction="mean"`` gives on that sample alone; 0 when
nothing counts), so ``L_B = Σ_i c_i ℓ_i / Σ_i c_i`` with ``c_i`` the sample's count: their
plain mean when every sample counts the same, a count-weighted mean for padded sequences.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from samkit._losses import PER_SAMPLE_NEEDED, LossReduction
from samkit.optim.batchnorm import bn_layers, smallest_sub_batch

__all__ = ["BatchClosure", "make_closure"]

LossFn = Callable[[Any, Tensor], Tensor]
ExtraLoss = Callable[[Any, Tensor | None, Tensor], Tensor | None]

#: A standard closure, in one line, for error messages.
STANDARD_CLOSURE = (
    "def closure(): optimizer.zero_grad(); loss = loss_fn(model(inputs), targets); "
    "loss.backward(); return loss"
)

#: What a sharpness-aware optimizer's ``step()`` without a closure answers (``{name}``: its
#: class): both ways to drive it.
NO_CLOSURE_MESSAGE = (
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


class BatchClosure:
    """A standard closure over one batch, with extra entry points for richer methods.

    Args:
        model: the module to run (``model(inputs)`` gives the outputs).
        loss_fn: ``loss_fn(outputs, targets)``: the unreduced losses, batch first
            (preferred, e.g. ``nn.CrossEntropyLoss(reduction="none")``), or their mean.
            See the module docstring for the reduction.
        inputs, targets: the batch; tensors whose first dimension is the batch dimension
            (``inputs`` may also be a list, tuple or dict of such tensors).
        indices: optional dataset indices of the samples (``LongTensor`` of shape ``[B]``).
        accumulation_steps: split every pass into this many micro-batches (gradient
            accumulation); gradients and losses equal the full-batch ones up to rounding.
            While a BatchNorm layer of the model is in train mode no micro-batch has fewer
            than 2 samples (fewer micro-batches on a small last batch).
        autocast_dtype: run forward passes under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` or ``torch.float16``) on the inputs' device type.
        grad_scaler: a ``torch.amp.GradScaler`` for float16 training: every backward pass
            uses the scaled loss, and sharpness-aware optimizers take their base step with
            ``grad_scaler.step(base_optimizer)`` (call ``grad_scaler.update()`` after
            ``opt.step(closure)`` as usual). Perturbation directions are unaffected by the
            scale (they are normalised); a step whose gradients overflow is skipped by the
            scaler and the weights are restored.
        ignore_index: targets equal to it (padding) count for nothing. Default: the
            ``ignore_index`` of an ``nn.CrossEntropyLoss``/``nn.NLLLoss`` ``loss_fn``; give it
            for a plain function. A value that contradicts the module's is an error.
        keep_outputs: keep the clean pass's full outputs in :attr:`outputs` (detached,
            concatenated over micro-batches). Off by default: for a language model they
            are the size of the logits, and the metrics need only :attr:`predictions`.

    Calling the object (``closure()``) is the standard pass: zero the gradients, forward the
    whole batch, backward the objective, return it (detached). :meth:`evaluate` is the
    general form used by optimizers.

    Gradients zeroed. Every pass with backward sets ``.grad = None`` on the model's
    parameters and on every other tensor the pass will give a gradient to: the autograd
    leaves reachable from the objective (a loss module's learned temperature, a tensor
    captured by ``loss_fn`` or ``extra_loss``), found by walking the backward graph before
    each micro-batch's backward (under 0.1 ms for a ResNet-18's 133 graph nodes). So a
    plain ``torch.optim`` optimizer over the model and a loss module's parameters steps
    with this batch's gradients only, as with ``optimizer.zero_grad()``.

    Metrics, from the clean pass. :attr:`predictions` (``outputs.argmax(1)``, the predicted
    class per sample, or per token for ``[B, C, T]`` outputs; ``None`` unless the outputs
    are a floating tensor of 2 or more dimensions), :attr:`correct` and :attr:`counted`
    (0-dim ``long`` tensors on the targets' device: correct predictions among the counted
    targets, and the number of counted targets, padding excluded; ``None`` unless the
    targets are class indices shaped like the predictions), and :attr:`outputs` (only with
    ``keep_outputs=True``). They are refreshed by every standard call ``closure()`` and by
    the first full-batch pass of every ``opt.step(closure)`` of a samkit optimizer (which
    calls :meth:`begin_step`); the other passes of a step (perturbed, sub-batch,
    forward-only) never change them, so after a SAM step they describe the clean weights,
    and a reused closure never reports an earlier step's.

    :attr:`last_objective`: the objective of the last pass (0-dim, detached; the batch's or
    the sub-batch's, ``extra_loss`` included), also when that pass returned per-sample
    losses: a method that needs those returns this objective as its loss.

    Counters: ``passes`` (number of forward passes), ``grad_evals`` (backward passes in
    full-batch units: a backward pass on half the batch counts 0.5) and ``forward_evals``
    (likewise, forward passes).
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
        ignore_index: int | None = None,
        keep_outputs: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if not isinstance(targets, Tensor) or targets.dim() == 0:
            raise TypeError(
                "targets must be a tensor whose first dimension is the batch, got "
                + ("a 0-dim tensor" if isinstance(targets, Tensor) else type(targets).__name__)
            )
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int):
            raise ValueError(f"Invalid accumulation_steps value: {accumulation_steps!r}")
        if accumulation_steps < 1:
            raise ValueError(f"Invalid accumulation_steps value: {accumulation_steps}")
        if not isinstance(keep_outputs, bool):
            raise TypeError(f"keep_outputs must be True or False, got {keep_outputs!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.reduction = LossReduction(loss_fn, ignore_index)
        self.inputs = inputs
        self.targets = targets
        self.indices = indices
        self.accumulation_steps = accumulation_steps
        self.autocast_dtype = autocast_dtype
        if grad_scaler is not None and not hasattr(grad_scaler, "scale"):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {grad_scaler!r}")
        self.grad_scaler = grad_scaler
        self.keep_outputs = keep_outputs
        self.batch_size = int(targets.shape[0])
        if indices is not None and int(indices.shape[0]) != self.batch_size:
            raise ValueError(
                f"indices has {int(indices.shape[0])} entries but the batch has {self.batch_size}"
            )
        self.outputs: Any = None
        self.predictions: Tensor | None = None
        self.correct: Tensor | None = None
        self.counted: Tensor | None = None
        self._refresh = True
        self.last_objective: Tensor | None = None
        self.passes = 0
        self.grad_evals = 0.0
        self.forward_evals = 0.0

    @property
    def ignore_index(self) -> int | None:
        """Targets equal to this value count for nothing (``None``: every target counts)."""
        return self.reduction.ignore_index

    def __call__(self) -> Tensor:
        self._refresh = True
        return self.evaluate()

    def begin_step(self) -> None:
        """Start of an optimizer step: clear the metrics; the next full-batch pass sets them.

        samkit optimizers call it at the start of ``step(closure)``; a loop never needs to.
        """
        self._refresh = True
        self.outputs = self.predictions = self.correct = self.counted = None

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
            backward: zero the gradients (see the class) and backpropagate the objective of
                the pass (torch's mean over the pass's counted elements). With ``False`` the
                pass runs under ``torch.no_grad()``.
            per_sample: return the per-sample losses ``[n]`` instead of the objective
                (requires a ``loss_fn`` that returns unreduced losses).
            sync_gradients: under ``DistributedDataParallel``, ``False`` runs the pass
                inside ``model.no_sync()`` so its gradients stay local to the replica.
            extra_loss: ``extra_loss(outputs, indices, targets) -> scalar``, the mean over
                the samples it is given of a regulariser (such as SAF's), added to the
                objective before backward; under accumulation each micro-batch's value is
                weighted by its share of the pass's samples. The returned loss includes it.
                It may return ``None`` (nothing added; e.g. it only checked the outputs).

        Returns the detached objective (0-dim) or per-sample losses.
        """
        inputs, targets, indices = self.inputs, self.targets, self.indices
        if subset is not None:
            if subset.dtype == torch.bool:
                subset = subset.nonzero().flatten()
            inputs = _take(inputs, subset)
            targets = targets[subset.to(targets.device)]
            indices = indices[subset.to(indices.device)] if indices is not None else None
        n = int(targets.shape[0])
        if n == 0:
            raise ValueError("evaluate() was given an empty subset of the batch")
        record = self._refresh and subset is None
        if record:
            self.begin_step()
            self._refresh = False
        zeroed: set[int] = set()
        if backward:
            for p in self.model.parameters():
                p.grad = None
                zeroed.add(id(p))

        reduction = self.reduction
        # micro-batches of at least 2 samples while a BatchNorm layer is in train mode
        smallest = smallest_sub_batch(bn_layers(self.model)) if self.accumulation_steps > 1 else 1
        chunks = _chunks(n, self.accumulation_steps, smallest)
        metrics = _Metrics(self.keep_outputs) if record else None
        losses: list[Tensor] = []
        total: Tensor | None = None
        count: Tensor | int | None = None  # the pass's count: the denominator of its mean
        grad_ctx = torch.enable_grad() if backward else torch.no_grad()
        with grad_ctx:
            for k, (lo, hi) in enumerate(chunks):
                last = k == len(chunks) - 1
                x = _slice(inputs, lo, hi)
                y = targets[lo:hi]
                rows = hi - lo
                with (
                    self.autocast(),
                    self._maybe_no_sync(backward and not (sync_gradients and last)),
                ):
                    out = self.model(x)
                    raw = reduction.check(self.loss_fn(out, y), rows, y)
                    if per_sample and raw.dim() == 0:
                        raise ValueError(PER_SAMPLE_NEEDED)
                    if count is None:
                        per_row = 1 if raw.dim() == 0 else raw.numel() // rows
                        count = reduction.count(targets, n, per_row, raw.dtype)
                    objective = reduction.terms(raw, y, rows)[0] / count
                    if extra_loss is not None:
                        idx = indices[lo:hi] if indices is not None else None
                        term = extra_loss(out, idx, y)
                        if term is not None:  # None: nothing to add on this micro-batch
                            objective = objective + term * (rows / n)
                    if metrics is not None:
                        metrics.add(out, y, reduction)
                    if per_sample:
                        losses.append(reduction.per_sample(raw.detach(), y, rows))
                    # The graph keeps what backward needs; holding the outputs through the
                    # backward pass (or into the next micro-batch) would add their size.
                    del out, raw
                    if backward:
                        _zero_new_leaves(objective, zeroed)
                        if self.grad_scaler is not None:
                            self.grad_scaler.scale(objective).backward()
                        else:
                            objective.backward()
                total = objective.detach() if total is None else total + objective.detach()
                del objective
        if metrics is not None:
            metrics.publish(self)
        assert total is not None
        self.last_objective = total
        self.passes += 1
        self.forward_evals += n / self.batch_size
        if backward:
            self.grad_evals += n / self.batch_size
        if per_sample:
            return torch.cat(losses)
        return total

    def shares(self, parts: list[Tensor]) -> list[float]:
        """Each part of the batch (index tensors, a partition)'s share of the batch objective.

        ``Σ share_S · L_S = L_B`` with ``L_S`` the part's own objective (torch's mean over its
        counted elements): the count of the part's counted elements over the batch's, the
        weighting of gradient accumulation (so padding and class weights count as in the
        batch objective); each part's fraction of the samples when every element counts.
        """
        return self.reduction.shares(self.targets, parts)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of this closure's forward passes (``autocast_dtype`` on the
        inputs' device; a null context without one)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = _device_of(self.inputs).type
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    def _maybe_no_sync(self, no_sync: bool) -> contextlib.AbstractContextManager:
        if no_sync and hasattr(self.model, "no_sync"):
            return self.model.no_sync()
        return contextlib.nullcontext()


class _Metrics:
    """What the metrics need from the clean pass, gathered over micro-batches."""

    def __init__(self, keep_outputs: bool) -> None:
        self.keep_outputs = keep_outputs
        self.outputs: list[Any] = []
        self.predictions: list[Tensor] | None = []
        self.correct: Tensor | None = None
        self.counted: Tensor | None = None
        self.scored = True  # every micro-batch so far had class-index targets

    def add(self, out: Any, y: Tensor, reduction: LossReduction) -> None:
        if self.keep_outputs:
            self.outputs.append(_detach(out))
        if self.predictions is None:
            return
        if not (isinstance(out, Tensor) and out.is_floating_point() and out.dim() >= 2):
            self.predictions = None
            return
        pred = out.detach().argmax(1)
        self.predictions.append(pred)
        if not self.scored or y.is_floating_point() or y.is_complex() or y.shape != pred.shape:
            self.scored = False
            return
        hit = pred == y
        if reduction.counts_by_target(y):
            counted = y != reduction.ignore_index
            hit &= counted
            n = counted.sum()
        else:
            n = torch.full((), y.numel(), dtype=torch.long, device=y.device)
        c = hit.sum()
        self.correct = c if self.correct is None else self.correct + c
        self.counted = n if self.counted is None else self.counted + n

    def publish(self, closure: BatchClosure) -> None:
        if self.keep_outputs:
            closure.outputs = self.outputs[0] if len(self.outputs) == 1 else _concat(self.outputs)
        if self.predictions:
            preds = self.predictions
            closure.predictions = preds[0] if len(preds) == 1 else torch.cat(preds)
        if self.scored and self.correct is not None:
            closure.correct, closure.counted = self.correct, self.counted


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
    ignore_index: int | None = None,
    keep_outputs: bool = False,
) -> BatchClosure:
    """Build the :class:`BatchClosure` for one batch (see the class for the arguments).

    ``loss_fn(outputs, targets)`` returns the unreduced losses with the batch as first
    dimension (``reduction="none"``; preferred: every method accepts them) or their mean
    (0-dim); the objective is torch's ``reduction="mean"`` of the batch, padded targets
    (``ignore_index``) left out. :mod:`samkit.sharpness` reduces a ``loss_fn`` by the same
    rule, so one loss function serves both.
    """
    return BatchClosure(
        model,
        loss_fn,
        inputs,
        targets,
        indices=indices,
        accumulation_steps=accumulation_steps,
        autocast_dtype=autocast_dtype,
        grad_scaler=grad_scaler,
        ignore_index=ignore_index,
        keep_outputs=keep_outputs,
    )


def _zero_new_leaves(root: Tensor, zeroed: set[int]) -> None:
    """Set ``.grad = None`` on every autograd leaf ``root``'s backward will write to.

    Leaves already in ``zeroed`` (ids) are skipped: they were cleared earlier in this pass and
    may already hold an earlier micro-batch's gradient.
    """
    fn = root.grad_fn
    if fn is None:
        return
    seen = {fn}
    stack = [fn]
    while stack:
        for node, _ in stack.pop().next_functions:
            if node is None or node in seen:
                continue
            seen.add(node)
            leaf = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
            if leaf is None:
                stack.append(node)
            elif id(leaf) not in zeroed:
                leaf.grad = None
                zeroed.add(id(leaf))


def _chunks(n: int, k: int, smallest: int = 1) -> list[tuple[int, int]]:
    """``k`` micro-batches of ``n`` rows (``ceil(n/k)`` each, the last one smaller), fewer
    where that would leave one with fewer than ``smallest`` rows."""
    k = max(1, min(k, n // smallest))
    size = math.ceil(n / k)
    chunks = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
    if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] < smallest:
        chunks[-2:] = [(chunks[-2][0], n)]
    return chunks


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
