"""mSAM, micro-batch-averaged SAM (Behdin et al., 2022/2023)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim._micro_batches import MicroBatches, Unbatchable, unsupported
from samkit.optim._tensors import add_
from samkit.optim._validation import is_count
from samkit.optim.base import (
    ASAM_ETA,
    GroupParams,
    SharpnessAwareOptimizer,
    asam_defaults,
    invalid_value,
)
from samkit.optim.closure import BatchClosure

__all__ = ["MicroBatchSAM"]


class MicroBatchSAM(SharpnessAwareOptimizer):
    r"""mSAM: SAM on each micro-batch, with its own perturbation; the gradients are averaged.

    SAM's perturbation is computed from the whole mini-batch. The *m-sharpness* observation
    of the SAM paper (perturbations computed per device generalise better than one
    perturbation for the whole batch) is made an explicit method here: the batch
    :math:`B` of :math:`n` samples is split into :math:`M` contiguous micro-batches
    :math:`B_1,\dots,B_M` (``torch.tensor_split`` order: sizes differ by at most one, the
    larger ones first), and

    .. math::

        g_j = \nabla L_{B_j}(w), \qquad
        \varepsilon_j = \rho\,\frac{g_j}{\lVert g_j\rVert + \epsilon}, \qquad
        g'_j = \nabla L_{B_j}(w + \varepsilon_j), \qquad
        g' = \sum_{j=1}^{M} \frac{|B_j|}{n}\, g'_j, \qquad
        w \leftarrow \mathrm{base\_step}(w, g')

    where :math:`L_{B_j}` is the mean loss over :math:`B_j`, so :math:`g'` is the mean over the
    batch of the per-sample gradients, each taken at its micro-batch's perturbed point. With
    ``micro_batches=1`` every step is exactly :class:`~samkit.SAM`; a batch with fewer than
    :math:`M` samples is split into single samples, or into micro-batches of at least 2
    samples while a BatchNorm layer is in train mode (:math:`\lfloor n/2\rfloor` of them). With ``adaptive=True`` each
    :math:`\varepsilon_j` uses ASAM's scaling (see :class:`~samkit.ASAM`).

    How a step runs: with ``vectorize=True`` (the default) and micro-batches of equal size,
    both passes run once over all micro-batches, micro-batch first (``torch.func.vmap`` over a
    ``functional_call`` of the model): two full-batch passes per step, as SAM, each
    micro-batch at its own weights :math:`w + \varepsilon_j`. Memory: about :math:`2M`
    parameter-sized buffers during the step (the per-micro-batch weights and gradients),
    none held after it. Otherwise the micro-batches run one after another (the *loop*):
    :math:`2M` passes on :math:`1/M` of the batch each, one accumulator per parameter. The
    loop runs when the batch does not split into equal micro-batches, when the model draws
    random numbers (dropout: under ``vmap`` a micro-batch cannot draw the masks that its own
    passes would, so the loop gives each micro-batch its own masks, shared by its two
    passes), when ``torch.func`` cannot transform the model, under
    ``DistributedDataParallel``, sharded parameters, gradient accumulation or a
    ``GradScaler`` in the closure, or with ``vectorize=False``; :attr:`last_path` says why.
    Both give the same result (equal to 1e-12 in float64). A pass counts forward as 1/3 and
    backward as 2/3 either way. Needs a
    :class:`~samkit.BatchClosure` (``samkit.make_closure``), which can evaluate part of the
    batch; a plain closure raises ``TypeError``.

    BatchNorm: each micro-batch's clean pass normalises with that micro-batch's statistics
    (as on separate devices), and the running statistics receive *one* update per step, with
    the sample-weighted mean of the micro-batches' statistics:
    :math:`r \leftarrow (1-m)\,r + m\sum_j (|B_j|/n)\,s_j` (likewise for ``momentum=None``,
    the cumulative average), ``num_batches_tracked`` advancing by one. The perturbed passes
    leave them untouched. If a pass raises, the running statistics are left as before the
    step.

    Distributed data parallel: each replica splits its own batch (so :math:`M` micro-batches
    per replica). The clean passes run in ``no_sync()`` unless ``sync_ascent=True``, so each
    :math:`\varepsilon_j` comes from the replica's own micro-batch gradient; the perturbed
    passes run in ``no_sync()`` too, and the accumulated :math:`g'` is averaged over the
    replicas once per step (one all-reduce, not :math:`M`). No random draws.

    Args:
        params: parameters, named parameters or param groups; groups may set their own
            ``rho``, ``adaptive``, ``eta`` (``micro_batches`` must be the same in every group).
        base_optimizer: a ``torch.optim.Optimizer`` class or a name (``"sgd"``, ...); its
            arguments (``lr``, ``momentum``, ``weight_decay``, ...) pass through ``**kwargs``.
        rho: radius of each micro-batch's perturbation (default 0.05, SAM's default).
        micro_batches: :math:`M`, the number of micro-batches per batch (default 4).
        adaptive: ASAM-style scale-invariant perturbations.
        eta: ASAM's offset (only used when ``adaptive``).
        vectorize: run all micro-batches at once where the model allows (default ``True``);
            ``False`` always runs the loop.
        **kwargs: samkit's options of :class:`~samkit.SharpnessAwareOptimizer` (``model``,
            ``foreach``, ``on_nonfinite``, ``sync_ascent``, ...) and the base optimizer's
            arguments.

    Example::

        opt = samkit.MicroBatchSAM(model.parameters(), "sgd", rho=0.05, micro_batches=4,
                                   lr=0.05, momentum=0.9)
        for x, y in loader:
            loss = opt.step(samkit.make_closure(model, loss_fn, x, y))

    Differences from the paper:
        * The paper's implementation evaluates the micro-batches in parallel (one per
          accelerator or vectorised); samkit vectorises them where the model allows and
          otherwise runs them one after another (above). The result is the same; the wall
          time is not.
        * The paper does not say how BatchNorm running statistics are kept; samkit's rule is
          above. ``closure.outputs`` (the training accuracy of ``samkit train``) is not
          recorded, because no pass covers the whole batch.
        * ``first_step`` / ``second_step`` are not available: use ``step(closure)``.

    References:
        K. Behdin, Q. Song, A. Gupta, S. Keerthi, A. Acharya, B. Ocejo, G. Dexter, R. Khanna,
        D. Durfee, R. Mazumder. mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization.
        arXiv:2302.09693, 2023 (first version: Improved Deep Neural Network Generalization
        Using m-Sharpness-Aware Minimization, arXiv:2212.04343, 2022).
        https://arxiv.org/abs/2302.09693 ; m-sharpness: P. Foret, A. Kleiner, H. Mobahi,
        B. Neyshabur. Sharpness-Aware Minimization for Efficiently Improving
        Generalization. ICLR 2021. https://arxiv.org/abs/2010.01412
    """

    step_globals = ("micro_batches",)  # the batch is split once for the whole model
    implementation_switches = ("vectorize",)  # the loop gives the same update
    own_passes = "its passes run on micro-batches of the batch"

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        rho: float = 0.05,
        micro_batches: int = 4,
        adaptive: bool = False,
        eta: float = ASAM_ETA,
        vectorize: bool = True,
        **kwargs: Any,
    ) -> None:
        defaults = dict(rho=rho, micro_batches=micro_batches, **asam_defaults(adaptive, eta))
        super().__init__(params, base_optimizer, defaults, **kwargs)
        if not isinstance(vectorize, bool):
            raise invalid_value("vectorize", vectorize, "True or False")
        #: Run every micro-batch at once where the model allows (``torch.func``).
        self.vectorize = vectorize
        #: How the last step ran: ``""`` all micro-batches at once, else why one by one.
        self.last_path = ""
        #: Models that torch.func could not run micro-batch first (by id), and why.
        self._loop_models: dict[int, str] = {}

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        if not is_count(group.get("micro_batches")):
            raise invalid_value("micro_batches", group.get("micro_batches"), "an integer >= 1")

    @property
    def micro_batches(self) -> int:
        """:math:`M`, common to every param group."""
        return int(self.step_global("micro_batches"))

    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        if not isinstance(closure, BatchClosure):
            raise TypeError(
                f"{type(self).__name__} evaluates micro-batches of the batch: build the closure "
                "with samkit.make_closure(model, loss_fn, inputs, targets), not a plain "
                "function"
            )
        n = closure.batch_size  # M micro-batches, of at least 2 samples under BatchNorm
        m = min(self.micro_batches, max(1, n // self.smallest_sub_batch(closure)))
        if m == 1:
            self.last_path = ""  # one pass each, over the whole batch
            return super().sharpness_step(closure)  # SAM's two passes on the whole batch
        model = self.model if self.model is not None else closure.model
        parts = list(torch.arange(n).tensor_split(m))
        shares = closure.shares(parts)  # c_j / c: micro-batch j's share of the batch objective
        self.last_path = self._why_loop(closure, model, m, shares)
        if not self.last_path:
            try:
                return self._batched_step(closure, model, m, shares)
            except Unbatchable as e:  # nothing changed yet: the loop runs the step
                self._loop_models[id(model)] = self.last_path = str(e)
        return self._loop_step(closure, model, parts, shares)

    def _why_loop(self, closure: BatchClosure, model: Any, m: int, shares: list[float]) -> str:
        """Why this step runs micro-batch after micro-batch (``""``: all at once)."""
        if not self.vectorize:
            return "vectorize=False"
        if any(share == 0.0 for share in shares):
            return "a micro-batch in which nothing counts"
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        return self._loop_models.get(id(model), "") or unsupported(closure, model, params, m)

    def _loop_step(
        self, closure: BatchClosure, model: Any, parts: list[Tensor], shares: list[float]
    ) -> Any:
        """The micro-batches one after another: two passes each through the closure."""
        seen = sum(len(idx) for idx, share in zip(parts, shares) if share != 0.0)
        stats = _RunningStatsAverage(self._bn_layers_of(model))
        acc: dict[Tensor, Tensor] = {}
        loss: Any = None
        try:
            for j, (idx, share) in enumerate(zip(parts, shares)):
                if share == 0.0:  # nothing in it counts: no term of L_B, no pass
                    continue
                if stats.sums:
                    stats.reset()  # every clean pass starts from the step's statistics
                self.redraw()  # its own dropout masks, shared by its two passes
                # g_j = ∇L_{B_j}(w)
                loss_j = self.run_pass(closure, f"clean micro-batch {j + 1}", subset=idx)
                stats.add(len(idx) / seen)  # BatchNorm averages the samples it saw
                self.perturb()  # ε_j = ρ·g_j/‖g_j‖, from this micro-batch's own gradient
                self.run_pass(  # g'_j = ∇L_{B_j}(w + ε_j)
                    closure,
                    f"perturbed micro-batch {j + 1}",
                    perturbed=True,
                    sync=False,
                    subset=idx,
                )
                self.restore()
                self._accumulate(acc, share)  # g' = Σ_j c_j/c · g'_j
                loss = loss_j * share if loss is None else loss + loss_j * share  # L_B
            stats.finish()
        except BaseException:
            stats.reset()
            raise
        for p, g in acc.items():
            p.grad = g
        # The replicas' mean of g' (no-op without DDP): one all-reduce per step.
        self.all_reduce_mean_(list(acc.values()))
        self.base_step()
        return loss

    def _batched_step(self, closure: BatchClosure, model: Any, m: int, shares: list[float]) -> Any:
        """Every micro-batch at once: one clean and one perturbed pass over all of them."""
        groups = [
            GroupParams(g, [p for p in g["params"] if p.requires_grad], [])
            for g in self.param_groups
        ]
        params = [p for gp in groups for p in gp.params]
        batches = MicroBatches(closure, model, params, m)
        self.zero_grad(set_to_none=True)
        losses, grads = batches.clean()  # g_j = ∇L_{B_j}(w), for every j
        self._record_finite("clean micro-batches", losses, check_grads=True)
        weights, norms = self._perturbed_weights(groups, grads)  # w + ε_j, ε_j = ρ·g_j/‖g_j‖
        self._check_unchecked_grads(norms.sum())
        share = torch.tensor(shares, dtype=losses.dtype, device=losses.device)
        losses_p, g_p = batches.perturbed(weights, share)  # g' = Σ_j c_j/c · ∇L_{B_j}(w + ε_j)
        batches.write_running_stats()
        for p, g, used in zip(params, g_p, grads):
            p.grad = g if used is not None else None
        self._record_finite("perturbed micro-batches", (losses_p * share).sum(), check_grads=True)
        self.base_step()
        return (losses * share).sum()  # L_B

    @torch.no_grad()
    def _perturbed_weights(
        self, groups: list[GroupParams], grads: list[Tensor | None]
    ) -> tuple[list[Tensor], Tensor]:
        """``w + ε_j`` for every micro-batch ``j`` (``[M, ...]`` per parameter, written into
        the gradients) and ``‖g_j‖`` (``[M]``), as :meth:`perturb` on each micro-batch:
        ``ε_j = r·g_j/(‖g_j‖ + eps)``, ``r·T²g_j/(‖T g_j‖ + eps)`` in adaptive groups, the
        norm over every parameter with a gradient; a parameter without one stays at ``w``."""
        m = next(g.shape[0] for g in grads if g is not None)
        moves: list[tuple[Tensor, Tensor | None, Tensor | None, float]] = []
        norms: list[Tensor] = []  # per parameter: ‖T g_j‖ for every j
        k = 0
        for gp in groups:
            scales = self._asam_scales(gp) if gp.group.get("adaptive", False) else None
            for i, p in enumerate(gp.params):
                g, k = grads[k], k + 1
                t = None if scales is None else scales[i]
                moves.append((p, g, t, float(gp.group["rho"])))
                if g is not None:
                    td = (g if t is None else g * t).reshape(m, -1)
                    dtype = torch.promote_types(td.dtype, torch.float32)
                    norms.append(torch.linalg.vector_norm(td, dim=1, dtype=dtype))
        dtype = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
        norm = torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]), dim=0)
        weights = []
        for p, g, t, r in moves:
            if g is None:
                weights.append(p.detach().unsqueeze(0).repeat(m, *([1] * p.dim())))
                continue
            if t is not None:
                g.mul_(t * t)  # T²·g_j
            scale = (r / (norm + self.perturb_eps)).to(g.dtype).view(m, *([1] * p.dim()))
            weights.append(g.mul_(scale).add_(p.detach()))  # w + ε_j
        return weights, norm

    @torch.no_grad()
    def _accumulate(self, acc: dict[Tensor, Tensor], weight: float) -> None:
        """``acc[p] += weight * p.grad`` for the gradients of the last pass (new entries too)."""
        known: list[Tensor] = []
        grads: list[Tensor] = []
        for gp in self.collect():
            for p, g in zip(gp.params, gp.grads):
                if p in acc:
                    known.append(acc[p])
                    grads.append(g)
                else:  # a copy: the next pass may reuse the gradient buffers
                    acc[p] = g.detach() * weight
        if known:
            add_(known, grads, alpha=weight, foreach=self.foreach)


class _RunningStatsAverage:
    """BatchNorm running statistics after M clean passes = one update with their mean.

    Saves the statistics at the start of the step; :meth:`reset` puts them back before each
    micro-batch's clean pass, :meth:`add` accumulates what that pass wrote (weighted), and
    :meth:`finish` writes the weighted mean. The update of a running statistic is affine in
    the batch statistic, so the mean of the updated values is the update with the mean
    statistic; ``num_batches_tracked`` ends one above its saved value.
    """

    def __init__(self, layers: list[Any]) -> None:
        self.layers = [
            m for m in layers if m.training and m.track_running_stats and m.running_mean is not None
        ]
        self.saved = [
            (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
            for m in self.layers
        ]
        self.sums: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def reset(self) -> None:
        for m, (mean, var, count) in zip(self.layers, self.saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)

    @torch.no_grad()
    def add(self, weight: float) -> None:
        if not self.sums:
            self.sums = [(m.running_mean * weight, m.running_var * weight) for m in self.layers]
            return
        for m, (mean, var) in zip(self.layers, self.sums):
            mean.add_(m.running_mean, alpha=weight)
            var.add_(m.running_var, alpha=weight)

    @torch.no_grad()
    def finish(self) -> None:
        for m, (mean, var) in zip(self.layers, self.sums):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
