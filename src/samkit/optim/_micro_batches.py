r"""mSAM's passes over equal micro-batches, all at once with ``torch.func``.

mSAM evaluates every micro-batch :math:`B_j` of a batch at its own perturbed weights
:math:`w + \varepsilon_j`. When the batch splits into :math:`M` micro-batches of equal size,
both passes can run once over all of them, micro-batch first, with ``torch.func.vmap`` over a
``functional_call`` of the model:

* :meth:`MicroBatches.clean`: the weights repeated per micro-batch (an ``[M, ...]`` leaf per
  parameter), one forward pass and one backward pass give every
  :math:`g_j = \nabla L_{B_j}(w)` at once, and the micro-batches' own objectives;
* :meth:`MicroBatches.perturbed`: the weights :math:`w + \varepsilon_j` per micro-batch, one
  forward and one backward pass give :math:`\sum_j s_j\,\nabla L_{B_j}(w + \varepsilon_j)`.

Each :math:`L_{B_j}` is the closure's objective on the micro-batch (its loss function and
reduction). BatchNorm layers in training mode normalise each micro-batch with its own
statistics, as separate passes would; in the clean pass their running statistics are
updated per micro-batch on copies, and :meth:`MicroBatches.write_running_stats` writes their
mean (mSAM's rule); the perturbed pass leaves them alone. Memory: about :math:`2M` copies of
the parameters during a step (the per-micro-batch weights and their gradients), against one
accumulator for the loop.

:func:`unsupported` says why a step cannot run this way (mSAM then runs its loop): micro-batches
of unequal size, a closure that evaluates passes its own way (a subclass overriding
``evaluate``), gradient accumulation or a ``GradScaler`` in the closure, a
``DistributedDataParallel`` model, sharded parameters, parameters that are not the model's,
a dropout layer in train mode, forward hooks (they would see every micro-batch at once). A
model that draws random numbers otherwise or that ``torch.func`` cannot transform raises
:class:`Unbatchable` at its first pass (nothing is changed by then), and the loop runs
instead (that model is remembered: later steps go to the loop directly).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd
from torch.utils._pytree import tree_map

from samkit.optim._tensors import is_sharded
from samkit.optim.batchnorm import bn_layers, frozen_bn_stats
from samkit.optim.closure import BatchClosure

__all__ = ["MicroBatches", "Unbatchable", "unsupported"]


class Unbatchable(Exception):
    """``torch.func`` could not run the model's passes micro-batch first (the reason)."""


def unsupported(closure: BatchClosure, model: nn.Module, params: list[Tensor], m: int) -> str:
    """Why the step cannot run all micro-batches at once (``""``: it can)."""
    if type(closure).evaluate is not BatchClosure.evaluate:
        return "the closure evaluates its passes its own way"
    if closure.batch_size % m:
        return f"a batch of {closure.batch_size} does not split into {m} equal micro-batches"
    if closure.accumulation_steps > 1:
        return "the closure accumulates gradients"
    if closure.grad_scaler is not None:
        return "the closure has a GradScaler"
    if hasattr(model, "no_sync"):
        return "a DistributedDataParallel model"
    if is_sharded(params):
        return "sharded parameters"
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for p in params):
        return "parameters that are not the model's"
    modules = list(model.modules())
    if any(isinstance(mod, _DropoutNd) and mod.training and mod.p > 0 for mod in modules):
        return "dropout in train mode draws random numbers (the loop gives each micro-batch its own masks)"
    if _has_hooks(modules):
        return "forward hooks on the model (they would see every micro-batch at once)"
    return ""


def _has_hooks(modules: list[nn.Module]) -> bool:
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(mod._forward_hooks or mod._forward_pre_hooks for mod in modules)


class MicroBatches:
    """The batch of ``closure`` as ``m`` equal micro-batches, and the passes over all of them.

    ``params`` are the parameters the step updates (those with a gradient in the loop).
    """

    def __init__(
        self, closure: BatchClosure, model: nn.Module, params: list[Tensor], m: int
    ) -> None:
        self.closure, self.model, self.params, self.m = closure, model, params, m
        names = {id(p): n for n, p in model.named_parameters()}
        self.names = [names[id(p)] for p in params]
        rows = closure.batch_size // m
        self.rows = rows

        def split(t: Any) -> Any:
            return t.reshape(m, rows, *t.shape[1:]) if isinstance(t, Tensor) else t

        self.inputs = tree_map(split, closure.inputs)
        self.targets = split(closure.targets)
        self.layers = [
            layer
            for layer in bn_layers(model)
            if layer.training and layer.track_running_stats and layer.running_mean is not None
        ]
        self.stats: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ the passes
    def clean(self) -> tuple[Tensor, list[Tensor]]:
        """The micro-batches' objectives ``[M]`` and gradients (``[M, ...]`` per parameter)."""
        m = self.m
        leaves = [p.detach().unsqueeze(0).repeat(m, *([1] * p.dim())) for p in self.params]
        for leaf in leaves:
            leaf.requires_grad_(True)
        prefix = {id(layer): name for name, layer in self.model.named_modules()}
        stats = {}
        for layer in self.layers:  # per micro-batch copies of the running statistics
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                value = getattr(layer, key)
                stats[f"{prefix[id(layer)]}.{key}".lstrip(".")] = value.unsqueeze(0).repeat(
                    m, *([1] * value.dim())
                )
        losses = self._run(leaves, stats, stats_batched=True)
        grads = torch.autograd.grad(losses.sum(), leaves, allow_unused=True)
        self.stats = stats
        self._count()
        return losses.detach(), [
            torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)
        ]

    def perturbed(self, weights: list[Tensor], shares: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Objectives ``[M]`` at ``weights`` (``[M, ...]`` per parameter: ``w + ε_j``) and
        ``Σ_j shares_j ∇L_{B_j}`` per parameter; BatchNorm statistics untouched."""
        for w in weights:
            w.requires_grad_(True)
        with frozen_bn_stats(self.layers):
            losses = self._run(weights, {}, stats_batched=False)
        grads = torch.autograd.grad((losses * shares).sum(), weights, allow_unused=True)
        self._count()
        return losses.detach(), [
            torch.zeros_like(p) if g is None else g.sum(0) for p, g in zip(self.params, grads)
        ]

    @torch.no_grad()
    def write_running_stats(self) -> None:
        """The mean of the micro-batches' running statistics, into the model's BatchNorm
        layers (the update is affine in the batch statistic: one update with the mean)."""
        if not self.stats:
            return
        named = dict(self.model.named_buffers())
        for key, value in self.stats.items():
            target = named[key]
            if value.is_floating_point():
                target.copy_(value.mean(0))
            else:  # num_batches_tracked: the same in every copy
                target.copy_(value[0])

    def _run(self, weights: list[Tensor], stats: dict[str, Tensor], stats_batched: bool) -> Tensor:
        from torch.func import functional_call, vmap

        closure, names = self.closure, self.names
        reduction, rows = closure.reduction, self.rows

        def objective(ws: list[Tensor], st: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
            with closure.autocast():
                out = functional_call(self.model, ({**dict(zip(names, ws)), **st},), (x,))
                return reduction.mean(closure.loss_fn(out, y), y, rows)

        batched = vmap(
            objective, in_dims=(0, 0 if stats_batched else None, 0, 0), randomness="error"
        )
        try:
            with torch.enable_grad():
                return batched(weights, stats, self.inputs, self.targets)
        except (RuntimeError, NotImplementedError, TypeError) as e:
            raise Unbatchable(f"{type(e).__name__}: {e}") from e

    def _count(self) -> None:
        closure = self.closure
        closure.passes += 1
        closure.grad_evals += 1.0
        closure.forward_evals += 1.0
