"""MESA: memory-efficient sharpness-aware training (Du et al., NeurIPS 2022).

SAF's trajectory loss (:mod:`samkit.optim._trajectory`) with the reference logits of an
exponential moving average of the weights instead of a bank of past logits: one extra
forward pass of the averaged model per step, memory of one model copy
(:mod:`samkit.optim._average` keeps the average, also under DDP and FSDP2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from samkit.optim._average import (
    ShardedAverage,
    average_forward,
    keyed_like,
    new_average,
    paired_tensors,
    saved_average,
    update_average,
)
from samkit.optim._distributed import mesh_groups, replicas_of
from samkit.optim._tensors import is_sharded
from samkit.optim._trajectory import TrajectoryLoss, as_logits
from samkit.optim.base import is_finite_nonnegative
from samkit.optim.closure import BatchClosure

__all__ = ["MESA"]


class MESA(TrajectoryLoss):
    r"""Memory-Efficient Sharpness-Aware training: SAF with an averaged model as reference.

    The reference outputs of the trajectory loss come from an exponential moving average
    (EMA) of the weights instead of a bank of past logits, so memory does not grow with the
    dataset. One step at epoch :math:`e`, with :math:`\bar w` the EMA of the weights:

    .. math::

        \bar z &= f(x; \bar w) \quad\text{(eval mode, no gradient)},\\
        L &= L_B(w) + \lambda\,\tau^2\,\frac{1}{|B|}\sum_{i \in B}
            \mathrm{KL}\!\left(\mathrm{softmax}(\bar z_i/\tau)\,\middle\|\,
            \mathrm{softmax}(z_i/\tau)\right) \qquad (e \ge \text{start\_epoch}),\\
        w &\leftarrow \mathrm{base\_step}(w, \nabla L), \qquad
        \bar w \leftarrow \beta\,\bar w + (1 - \beta)\,w .

    The averaged model is a copy of the model made at the first step (in eval mode, no
    gradients); every entry of its ``state_dict`` is averaged (parameters and BatchNorm
    statistics; integer buffers are copied), after each accepted step, with the updated
    weights. It is part of :meth:`state_dict`.

    **Cost.** One forward/backward pass plus one forward pass of the averaged model under
    ``no_grad`` per step from ``start_epoch`` on (``passes`` 4/3 with forward = 1/3 of a
    pass; the forward is counted in the closure's ``forward_evals``); before ``start_epoch``
    the step is one pass plus the average's update. Memory: one copy of the model.

    **Needs** the model (``model=`` or the :class:`~samkit.BatchClosure`'s) and the epoch
    (``set_epoch``); the closure must be a ``BatchClosure`` (indices are not needed; with
    them, a sample seen twice in one epoch before ``start_epoch`` warns that ``set_epoch``
    was forgotten); the model must return logits ``[batch, classes]`` (checked from the
    first step). A tensor under several names (tied weights) is averaged once per step.

    **DDP.** The one pass is synchronised. The replicas' weights are identical, hence so are
    their averages; BatchNorm statistics (updated by each replica's own batch) are averaged
    over the replicas before entering the EMA (one small all-reduce per step), so the
    averaged models stay identical too.

    **FSDP2.** On sharded (``DTensor``) parameters the average is not a copy of the model
    (FSDP2 modules cannot be deep-copied): it is kept as tensors laid out as the model's
    ``state_dict`` (parameters sharded like the model's, so each process holds its shards of
    the average, never the whole tensors), and the averaged forward exchanges them with the
    model's weights and buffers shard by shard, runs the model in eval mode and exchanges
    them back (bit-exact; one extra tensor at a time). The result equals the DDP run's.
    BatchNorm statistics, which FSDP2 does not synchronise, are averaged over the
    processes of the parameters' mesh before entering the EMA. :attr:`ema_model` is then
    ``None``; the average is ``state_dict()["mesa_ema"]`` (sharded, as the model's).

    Args:
        params: parameters, named parameters or param groups (``lmbda``, ``tau``,
            ``start_epoch`` and ``decay`` must be the same in every group).
        base_optimizer: a ``torch.optim.Optimizer`` class or a name.
        lmbda: weight :math:`\lambda` of the trajectory loss (default 0.8, the official
            README's and ImageNet command's value for MESA).
        tau: temperature :math:`\tau` (default 5).
        start_epoch: first epoch (from 0) with the term (default 6: ``epoch > 5`` in the
            official code).
        decay: :math:`\beta`, decay of the weight average (default 0.9998, timm's
            ``ModelEmaV2`` value used by the official code; for short runs use less, e.g.
            0.99 for a few thousand steps).
        **kwargs: samkit's options and the base optimizer's arguments.

    Example::

        opt = samkit.MESA(model.parameters(), "sgd", model=model, lr=0.1, momentum=0.9)
        for epoch in range(epochs):
            opt.set_epoch(epoch)
            for x, y in loader:
                loss = opt.step(samkit.make_closure(model, loss_fn, x, y))

    Differences from the paper / official code:
        * The official code runs the averaged model on every step, also before the term
          starts; samkit runs it only while the term is on.
        * The average is updated only after accepted steps (a skipped step leaves it as it
          was); the official update follows every ``optimizer.step()``.
        * Under DDP, BatchNorm statistics are averaged over replicas before entering the EMA
          (timm's EMA takes each process's own statistics).
        * The averaged model's forward runs on the whole batch at once (no micro-batches)
          under the closure's autocast dtype.
        * The returned loss includes the trajectory term (the official code logs it too).

    References:
        J. Du, D. Zhou, J. Feng, V. Y. F. Tan, J. T. Zhou. Sharpness-Aware Training for
        Free. NeurIPS 2022. https://arxiv.org/abs/2205.14083 ; official code:
        https://github.com/AngusDujw/SAF (``MESA_train.py``)
    """

    step_globals = ("lmbda", "tau", "start_epoch", "decay")

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        lmbda: float = 0.8,
        tau: float = 5.0,
        start_epoch: int = 6,
        decay: float = 0.9998,
        **kwargs: Any,
    ) -> None:
        defaults = dict(lmbda=lmbda, tau=tau, start_epoch=start_epoch, decay=decay)
        super().__init__(params, base_optimizer, defaults, **kwargs)
        #: The averaged model: a copy of the model, or (sharded parameters) a
        #: :class:`~samkit.optim._average.ShardedAverage` swapped into the model for its forward.
        self._ema: nn.Module | ShardedAverage | None = None
        self._ema_source: nn.Module | None = None
        self._ema_pending: dict[str, Tensor] | None = None
        #: (EMA parameters, parameters, EMA buffers, buffers): views, paired once per model.
        self._ema_pairs: tuple[list[Tensor], ...] | None = None

    def validate_group(self, group: dict[str, Any]) -> None:
        decay = group.get("decay")
        if not (is_finite_nonnegative(decay) and decay < 1.0):
            raise ValueError(f"Invalid decay value: {decay!r} (in [0, 1))")
        super().validate_group(group)

    @property
    def ema_model(self) -> nn.Module | None:
        """The averaged model (``None`` before the first step and on sharded parameters).

        On sharded (FSDP2) parameters there is no separate model: the averaged weights are
        in ``state_dict()["mesa_ema"]`` (laid out as the model's own ``state_dict``).
        """
        return self._ema if isinstance(self._ema, nn.Module) else None

    def _module(self, closure: BatchClosure) -> nn.Module:
        model = self.model if self.model is not None else closure.model
        return getattr(model, "module", model) if hasattr(model, "no_sync") else model

    def _averaged_model(self, module: nn.Module) -> nn.Module | ShardedAverage:
        """The average of ``module``'s weights (a fresh one if there is none yet)."""
        if self._ema is not None:
            if self._ema_source is not module:  # another model object: re-pair the tensors
                self._ema_source, self._ema_pairs = module, None
            return self._ema
        return new_average(module, is_sharded(self._params()), self._ema_pending)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        batch = self._check_closure(closure)
        epoch = self.current_epoch()
        module = self._module(batch)
        ema = self._averaged_model(module)
        decay = float(self.step_global("decay"))

        start = int(self.step_global("start_epoch"))
        if batch.indices is not None and epoch < start:  # a stuck epoch: the term never starts
            self._check_indices(batch.indices, epoch, "MESA is the base optimizer (no term)")
        extra = self._term(None)  # before start_epoch: checks the outputs only
        if epoch >= start:
            # z̄ = f(x; w̄): the averaged model's logits (eval mode, no gradient)
            with batch.autocast():
                reference = as_logits(average_forward(ema, module, batch.inputs), "MESA")
            batch.forward_evals += 1.0  # the averaged model's forward: 1/3 of a pass
            batch.passes += 1
            offset = [0]

            def rows_of(z: Tensor, idx: Tensor | None, rows: int):
                lo = offset[0]
                offset[0] = lo + rows
                return reference[lo : lo + rows], None

            # L = L_B(w) + λτ²·mean_i KL(softmax(z̄_i/τ) ‖ softmax(z_i/τ))
            extra = self._term(rows_of)

        loss = self.run_pass(closure, "clean", sync=True, extra_loss=extra)

        def update() -> None:
            if self._ema is None:
                self._ema, self._ema_source, self._ema_pending = ema, module, None
            self._update_average(module, decay, closure)

        self.on_accept(update)
        self.base_step()  # w ← base_step(w, ∇L), then w̄ ← β w̄ + (1 − β) w once accepted
        return loss

    @torch.no_grad()
    def _update_average(self, module: nn.Module, decay: float, closure: Any) -> None:
        assert self._ema is not None
        sharded = isinstance(self._ema, ShardedAverage)
        if self._ema_pairs is None or sharded:
            # Sharded: paired anew each time (FSDP2 may re-create its parameters' shards).
            self._ema_pairs = paired_tensors(module, self._ema)
        # BatchNorm statistics are averaged over the replicas and, sharded, over the mesh.
        groups = [replicas_of(closure.model), *(mesh_groups(self._params()) if sharded else [])]
        update_average(
            self._ema_pairs, 1.0 - decay, [g for g in groups if g is not None], self.foreach
        )

    def state_dict(self) -> dict[str, Any]:
        """The base's state and ``mesa_ema``, the average under the eager model's names
        (``torch.compile``'s ``_orig_mod.`` left out: it resumes compiled or not)."""
        sd = super().state_dict()
        if self._ema is not None:
            sd["mesa_ema"] = saved_average(self._ema)
        elif self._ema_pending is not None:
            sd["mesa_ema"] = self._ema_pending
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        ema = sd.pop("mesa_ema", None)
        super().load_state_dict(sd)
        if ema is None:
            return
        if isinstance(self._ema, nn.Module):
            self._ema.load_state_dict(keyed_like(ema, self._ema.state_dict()))
        elif self._ema is not None:
            self._ema.load_state_dict(ema)
        else:
            self._ema_pending = saved_average(dict(ema))
