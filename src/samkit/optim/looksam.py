"""LookSAM (Liu et al., CVPR 2022): SAM's extra pass only every k steps."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim._tensors import add_, add_scaled_, dot, global_norm, mul_
from samkit.optim._validation import is_count
from samkit.optim.base import SharpnessAwareOptimizer, invalid_value, is_finite_nonnegative

__all__ = ["LookSAM"]


class LookSAM(SharpnessAwareOptimizer):
    r"""LookSAM: compute SAM's gradient every ``k`` steps, reuse its sharpness part in between.

    SAM's gradient :math:`g_s = \nabla L_B(w+\varepsilon)` differs from the clean gradient
    :math:`g = \nabla L_B(w)` mostly by a component orthogonal to :math:`g`, and the paper
    observes that this component changes slowly. LookSAM pays for SAM's second pass only on
    *refresh* steps (optimizer steps :math:`0, k, 2k, \dots`), caches that component
    :math:`g_v`, and adds it back, rescaled, on the other (*reuse*) steps, which run a single
    pass. With :math:`\hat g = g/(\lVert g\rVert + \epsilon)`:

    .. math::

        \text{refresh } (t \bmod k = 0):\quad
        \varepsilon &= \rho\,\hat g, \qquad g_s = \nabla L_B(w_t + \varepsilon), \qquad
        g_v = g_s - (g_s\cdot\hat g)\,\hat g, \qquad
        w_{t+1} = \mathrm{base\_step}(w_t, g_s) \\
        \text{reuse (otherwise)}:\quad
        u &= g + \alpha\,\frac{\lVert g\rVert}{\lVert g_v\rVert + \epsilon}\,g_v, \qquad
        w_{t+1} = \mathrm{base\_step}(w_t, u)

    :math:`(g_s\cdot\hat g)\,\hat g = \lVert g_s\rVert\cos\theta\;\hat g` is the projection of
    :math:`g_s` on :math:`g` (the paper's form). Inner products and norms are *global*, over
    every parameter that has a gradient (the model as one vector, as in the paper's
    Algorithm 1), and :math:`\alpha` is per param group. On a reuse step the added component
    has length :math:`\alpha\lVert g\rVert`: the cached :math:`g_v` gives the direction only.

    Cost: refresh steps run two passes (forward + backward each), reuse steps one, so
    ``1 + 1/k`` passes per step on average (1.2 for ``k=5``; a pass counts forward as 1/3 and
    backward as 2/3). Memory: one buffer per parameter (``state[p]["g_v"]``) between steps;
    during a refresh step, the clean gradient and the weights' copy instead (the old
    :math:`g_v` is dropped once the clean pass has run).

    The cached :math:`g_v` is part of ``state_dict()`` (a resumed run continues exactly, and
    the refresh schedule follows the optimizer's step counter, also saved). A refresh step
    drops the old :math:`g_v` after its clean pass and caches the new one once the step is
    *accepted*: if a refresh step fails or is skipped (``on_nonfinite="skip"``), no
    :math:`g_v` is cached, and since the step counter did not advance, the next step is a
    refresh step again, exactly as it would have been with the old :math:`g_v` kept
    (:attr:`~samkit.SharpnessAwareOptimizer.clean_pass_state`). Parameters without a cached
    :math:`g_v` (added after the last refresh, or without a gradient then) are updated with
    their plain gradient on reuse steps.

    Distributed data parallel: the reuse step's single pass is synchronised (its gradient is
    the update). On a refresh step the clean pass runs in ``no_sync()`` unless
    ``sync_ascent=True``, so each replica perturbs with its own gradient (as in SAM); the
    perturbed pass is synchronised, and the clean gradient that builds :math:`g_v` is
    averaged over the replicas first, so every replica caches the same :math:`g_v`. No random
    draws.

    Args:
        params: parameters, named parameters or param groups; groups may set their own
            ``rho`` and ``alpha`` (``k`` must be the same in every group: one pass serves
            the whole model).
        base_optimizer: a ``torch.optim.Optimizer`` class or a name (``"sgd"``, ...); its
            arguments (``lr``, ``momentum``, ``weight_decay``, ...) pass through ``**kwargs``.
        rho: radius of SAM's perturbation on refresh steps (default 0.1, the paper's value).
        k: a refresh every ``k`` optimizer steps (default 5, the paper's value); ``k=1`` is
            SAM.
        alpha: weight of the reused component, relative to ``‖g‖`` (default 0.7, the
            paper's value).
        **kwargs: samkit's options of :class:`~samkit.SharpnessAwareOptimizer` (``model``,
            ``foreach``, ``on_nonfinite``, ``sync_ascent``, ...) and the base optimizer's
            arguments.

    Example::

        opt = samkit.LookSAM(model.parameters(), "sgd", rho=0.1, k=5, alpha=0.7,
                             lr=0.05, momentum=0.9)
        for x, y in loader:
            loss = opt.step(samkit.make_closure(model, loss_fn, x, y))

    Differences from the paper / public code:
        * The first step (step 0) is a refresh step: there is no :math:`g_v` to reuse yet
          (the paper's Algorithm 1 counts steps from 1 and refreshes when ``t mod k = 0``).
        * :math:`\epsilon` (``perturb_eps``, 1e-12) is added to the norms in
          :math:`\hat g` and in the reuse scale, so zero gradients give a zero correction.
        * No layer-wise variant: the paper's Look-LayerSAM (per-layer radii for large-batch
          training) is not implemented.
        * There is no official code. The two public PyTorch versions known to us restore
          weights saved at the last refresh step on reuse steps (so the model keeps jumping
          back), compute the decomposition per tensor, and one runs two passes on every
          step; samkit runs one pass on reuse steps and never moves the weights outside a
          refresh step.
        * ``first_step`` / ``second_step`` are not available: whether a step needs a second
          pass is LookSAM's decision, so use ``step(closure)``.

    References:
        Y. Liu, S. Mai, X. Chen, C.-J. Hsieh, Y. You. Towards Efficient and Scalable
        Sharpness-Aware Minimization. CVPR 2022. https://arxiv.org/abs/2203.02714
    """

    step_globals = ("k",)  # one pass serves the whole model
    clean_pass_state = ("g_v",)  # dropped when a refresh begins
    own_passes = "whether a step takes a second pass is its own decision"

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        rho: float = 0.1,
        k: int = 5,
        alpha: float = 0.7,
        **kwargs: Any,
    ) -> None:
        defaults = dict(rho=rho, k=k, alpha=alpha)
        super().__init__(params, base_optimizer, defaults, **kwargs)

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        if not is_count(group.get("k")):
            raise invalid_value("k", group.get("k"), "an integer >= 1")
        alpha = group.get("alpha")
        if not is_finite_nonnegative(alpha):
            raise invalid_value("alpha", alpha, "a finite number >= 0")

    # ------------------------------------------------------------------ schedule
    @property
    def k(self) -> int:
        """The refresh period, common to every param group."""
        return int(self.step_global("k"))

    def refresh_due(self) -> bool:
        """Whether the next step computes SAM's gradient and refreshes the cached ``g_v``.

        True on optimizer steps ``0, k, 2k, ...`` (accepted steps, ``samkit_state["step"]``)
        and whenever nothing is cached yet.
        """
        if self.samkit_state["step"] % self.k == 0:
            return True
        state = self.state
        return not any(
            p in state and "g_v" in state[p] for group in self.param_groups for p in group["params"]
        )

    # ------------------------------------------------------------------ the step
    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        if self.refresh_due():
            return self._refresh_step(closure)
        return self._reuse_step(closure)

    def _refresh_step(self, closure: Callable[[], Any]) -> Any:
        """SAM's two passes; the update is ``g_s``; ``g_v`` is cached once accepted."""
        loss = self.run_pass(closure, "clean")  # g = ∇L_B(w)
        groups = self.collect()
        params = [p for gp in groups for p in gp.params]
        # The old g_v is not needed any more: a refresh that fails leaves none, and the next
        # step refreshes (the step count did not advance), so two buffers, not three, live
        # through the perturbed pass (g and the weights' copy).
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    self.state[p].pop("g_v", None)
        g = self.kept([t for gp in groups for t in gp.grads])  # read after the next pass
        del groups  # the clean gradients are held once, as g
        self.perturb()  # ε = ρ·ĝ, from this replica's own g (SAM's m-sharpness under DDP)
        # g builds g_v, which enters later updates: the replicas' mean (no-op without DDP).
        self.all_reduce_mean_(g)
        self.run_pass(closure, "perturbed", perturbed=True)  # g_s = ∇L_B(w + ε)
        self.restore()
        with torch.no_grad():
            g_s = self.gradients(params)
            norm_g = global_norm(g, self.foreach)
            # g_v = g_s - (g_s·ĝ) ĝ = g_s - (g_s·g)/(‖g‖ + eps)²·g, written into g (no
            # parameter's .grad since the perturbed pass): no temporary the size of the model
            mul_(g, -dot(g_s, g) / (norm_g + self.perturb_eps) ** 2, self.foreach)
            add_(g, g_s, foreach=self.foreach)
            g_v = g

        def store() -> None:
            for p, v in zip(params, g_v):
                self.state[p]["g_v"] = v

        self.on_accept(store)
        self.base_step()  # with g_s, as SAM
        return loss

    def _reuse_step(self, closure: Callable[[], Any]) -> Any:
        """One synchronised pass; the update is ``g + alpha·‖g‖/‖g_v‖·g_v``."""
        loss = self.run_pass(closure, "clean", sync=True)  # g = ∇L_B(w)
        groups = self.collect()
        with torch.no_grad():
            norm_g = global_norm([t for gp in groups for t in gp.grads], self.foreach)
            self._check_unchecked_grads(norm_g)  # the finiteness check reuses this norm
            per_group: list[tuple[float, list[Tensor], list[Tensor]]] = []
            cached: list[Tensor] = []
            for gp in groups:
                grads, g_vs = [], []
                for p, grad in zip(gp.params, gp.grads):
                    v = self.state[p].get("g_v") if p in self.state else None
                    if v is not None:
                        grads.append(grad)
                        g_vs.append(v)
                cached.extend(g_vs)
                per_group.append((float(gp.group["alpha"]), grads, g_vs))
            if cached:
                norm_v = global_norm(cached, self.foreach)
                ratio = norm_g / (norm_v + self.perturb_eps)
                for alpha, grads, g_vs in per_group:  # u = g + alpha·‖g‖/‖g_v‖·g_v, in .grad
                    if alpha == 0.0 or not grads:
                        continue
                    add_scaled_(grads, g_vs, alpha * ratio, self.foreach)
        self.base_step()  # w ← base_step(w, u)
        return loss
