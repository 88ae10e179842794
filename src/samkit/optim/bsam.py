"""Bilateral SAM (Deng, Pang, Zhang, Huang, 2024): max-sharpness plus min-sharpness."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim._tensors import add_, dot, global_norm, scaled
from samkit.optim.base import SharpnessAwareOptimizer, invalid_value, is_finite_nonnegative

__all__ = ["BilateralSAM"]

_RATIOS = ("max_min", "one")


class BilateralSAM(SharpnessAwareOptimizer):
    r"""Bilateral SAM: penalise the rise of the loss uphill and its fall downhill.

    SAM minimises the *max-sharpness* :math:`L(w+\varepsilon_{\max}) - L(w)`. Bilateral SAM
    adds the *min-sharpness* :math:`L(w) - \min_{\lVert\varepsilon\rVert\le\rho} L(w+
    \varepsilon)`, approximated by one normalised descent step. Three passes per step, with
    :math:`\hat g_0 = g_0/(\lVert g_0\rVert+\epsilon)`:

    .. math::

        g_0 &= \nabla L_B(w), \qquad
        g_{\max} = \nabla L_B(w + \rho\,\hat g_0), \qquad
        g_{\min} = \nabla L_B(w - \rho_{\min,t}\,\hat g_0), \\
        g &= g_{\max} + g_0 - r\,g_{\min}, \qquad
        r = \frac{\lVert g_{\max}\rVert}{\lVert g_{\min}\rVert + \epsilon}, \qquad
        w \leftarrow \mathrm{base\_step}(w, g)

    and the min radius follows the learning rate: :math:`\rho_{\min,t} = \rho_{\min}\,
    \mathrm{lr}_t/\mathrm{lr}_0` with :math:`\mathrm{lr}_0` the group's initial learning rate
    (``group["initial_lr"]``, set at construction; the key torch's LR schedulers use). Any LR
    scheduler therefore drives it; with a constant LR it stays at ``rho_min``.

    To first order, :math:`g_{\max} \approx g_0 + \rho H\hat g_0` and
    :math:`g_{\min} \approx g_0 - \rho_{\min,t} H\hat g_0`, so with :math:`r = 1` the update
    is :math:`g_0 + (\rho+\rho_{\min,t})H\hat g_0`: SAM's correction with the two radii added.
    The ratio :math:`r` rescales :math:`g_{\min}` to the length of :math:`g_{\max}`. When the
    clean gradient is small next to the curvature term (late in training, on a model that
    fits its training set) :math:`r \gg 1` and :math:`-r\,g_{\min} \approx -\lVert g_{\max}
    \rVert\,\hat g_0` cancels the descent component of :math:`g_{\max}`, so the update no
    longer descends (see ``docs/methods/bsam.md`` and ``docs/results.md``).
    ``ratio="one"`` uses :math:`r = 1` instead.

    Args:
        params: parameters, named parameters or param groups; groups may set their own
            ``rho``, ``rho_min``, ``ratio``, ``official_update``.
        base_optimizer: a ``torch.optim.Optimizer`` class or a name (``"sgd"``, ...); its
            arguments (``lr``, ``momentum``, ``weight_decay``, ...) pass through ``**kwargs``.
        rho: the max-sharpness radius (default 0.05, the official recipe's value).
        rho_min: the min-sharpness radius at the initial learning rate (default 0.05); it is
            scaled by ``lr_t / lr_0`` at every step.
        ratio: ``"max_min"`` (default, the paper and official code:
            ``r = ‖g_max‖ / ‖g_min‖``) or ``"one"`` (``r = 1``, the plain first-order
            gradient of ``L(w) + L(w+ε_max) − L(w−ε_min)``).
        official_update: reproduce the official code's base step. Its ``to_min_point`` assigns
            ``p.data = state[p]["old_p"]`` and then subtracts the min perturbation in place,
            which also overwrites the saved clean weights; the base step then starts from
            ``w − rho_min_t·ĝ0`` instead of ``w``. ``False`` (default) follows the paper and
            steps from ``w``. Use ``True`` only to reproduce published numbers.
        **kwargs: samkit's options of :class:`~samkit.SharpnessAwareOptimizer` (``model``,
            ``foreach``, ``on_nonfinite``, ...) and the base optimizer's arguments.

    Example::

        opt = samkit.BilateralSAM(model.parameters(), "sgd", rho=0.05, rho_min=0.05,
                                  lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        for x, y in loader:
            loss = opt.step(samkit.make_closure(model, loss_fn, x, y))
            sched.step()   # rho_min follows the learning rate

    Differences from the paper / official code:
        * The base step is taken at ``w`` (the paper's update), not at ``w − rho_min_t·ĝ0``
          where the official code's aliasing slip leaves the weights
          (``official_update=True`` reproduces that).
        * The official code schedules ``rho_min`` with a separate ``ProportionScheduler``
          tied to its own cosine LR scheduler; samkit derives it from the group's current
          ``lr`` and ``initial_lr`` so that any scheduler works. For a schedule that ends at
          lr 0 and a min value of 0 (the official defaults) the two agree from the second
          step on. Not on the first: the official ``ProportionScheduler`` reads its cosine
          scheduler's last lr, 0.0 before that scheduler's first step, so the official
          step 1 runs with ``rho_min_t = 0`` (its third pass at ``w``); samkit's step 1 uses
          ``rho_min``.
        * No ``adaptive`` variant: the official class accepts the flag but always sets it to
          ``False``.
        * ``ε`` is added to the norms in the perturbation and in the ratio (no guard in the
          official code).
        * ``ratio="one"`` is a samkit option, not part of the paper.

    Not to be confused with pytorch-optimizer's ``BSAM``, which is *Bayesian* SAM
    (Möllenhoff & Khan, ICLR 2023), a different method.

    References:
        J. Deng, J. Pang, B. Zhang, Q. Huang. Bilateral Sharpness-Aware Minimization for
        Flatter Minima. arXiv:2409.13173, 2024. https://arxiv.org/abs/2409.13173 ; official
        code: https://github.com/ajiaaa/BSAM
    """

    own_passes = "three: the clean point, the max point and the min point"

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        rho: float = 0.05,
        rho_min: float = 0.05,
        ratio: str = "max_min",
        official_update: bool = False,
        **kwargs: Any,
    ) -> None:
        defaults = dict(
            rho=rho, rho_min=rho_min, ratio=ratio, official_update=bool(official_update)
        )
        super().__init__(params, base_optimizer, defaults, **kwargs)
        #: Diagnostics of the last step (0-dim tensors): ``norm_g0``, ``norm_max``,
        #: ``norm_min``, ``ratio`` and, when :attr:`collect_stats` is true,
        #: ``cos_update_g0`` (cosine between the update gradient and ``g0``).
        self.last_stats: dict[str, Tensor] = {}
        #: Also compute ``cos_update_g0`` (one extra pass over the gradients).
        self.collect_stats = False

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        rho_min = group.get("rho_min")
        if not is_finite_nonnegative(rho_min):
            raise invalid_value("rho_min", rho_min, "a finite number >= 0")
        if group.get("ratio") not in _RATIOS:
            raise invalid_value("ratio", group.get("ratio"), "'max_min' or 'one'")
        # The reference for rho_min's schedule; torch's LR schedulers use the same key.
        group.setdefault("initial_lr", group["lr"])

    @staticmethod
    def rho_min_t(group: dict[str, Any]) -> float:
        """The group's current min radius, ``rho_min * lr / initial_lr``."""
        lr0 = float(group.get("initial_lr", group["lr"]))
        if lr0 == 0.0:
            return float(group["rho_min"])
        return float(group["rho_min"]) * float(group["lr"]) / lr0

    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        loss = self.run_pass(closure, "clean")  # g0 = ∇L_B(w)
        groups = self.collect()
        params = [p for gp in groups for p in gp.params]
        g0 = [g.detach().clone() for gp in groups for g in gp.grads]
        g0_groups = _split(g0, groups)
        # g0 also enters the update: under DDP with a local clean pass, the update uses the
        # replicas' mean (the perturbation keeps this replica's own g0, as in SAM).
        g0_update = g0
        if self.local_gradients:
            g0_update = [g.clone() for g in g0]
            self.all_reduce_mean_(g0_update)

        # g_max = ∇L_B(w + rho·ĝ0): the max point.
        norm_g0 = self.perturb(g0_groups, radius="rho", sign=1.0)  # ‖g0‖, reused below
        self.run_pass(closure, "max", perturbed=True)
        g_max = [g.clone() for g in self.gradients(params)]
        self.restore()

        # g_min = ∇L_B(w - rho_min_t·ĝ0): the min point, one normalised descent step.
        self.perturb(g0_groups, radius=self.rho_min_t, sign=-1.0)
        self.run_pass(closure, "min", perturbed=True)
        g_min = self.gradients(params)
        self.restore()

        with torch.no_grad():
            eps = self.perturb_eps
            norm_max = global_norm(g_max, self.foreach)
            norm_min = global_norm(g_min, self.foreach)
            ratio_mm = norm_max / (norm_min + eps)  # r = ‖g_max‖ / ‖g_min‖
            # g = g_max + g0 - r·g_min, written into .grad (g_max's buffer is reused).
            update = g_max
            add_(update, g0_update, foreach=self.foreach)
            offset = 0
            for gp in groups:
                n = len(gp.params)
                r: Tensor | float = ratio_mm if gp.group["ratio"] == "max_min" else 1.0
                sl = slice(offset, offset + n)
                add_(update[sl], scaled(g_min[sl], -r, self.foreach), foreach=self.foreach)
                offset += n
            stats = {"norm_g0": norm_g0, "norm_max": norm_max}
            stats.update(norm_min=norm_min, ratio=ratio_mm)
            norm_g0_update = norm_g0
            if g0_update is not g0:
                norm_g0_update = global_norm(g0_update, self.foreach)
            if self.collect_stats:
                inner = dot(update, g0_update)  # global, also over FSDP2 shards
                norm_u = global_norm(update, self.foreach)
                stats["cos_update_g0"] = inner / (norm_u * norm_g0_update + eps)
            self.last_stats = stats
            for p, u in zip(params, update):
                p.grad = u
            self._official_shift(groups, _split(g0_update, groups), norm_g0_update)
        self.base_step()  # w ← base_step(w, g), at w
        return loss

    def _official_shift(self, groups: list, g0_groups: list[list[Tensor]], norm_g0: Tensor) -> None:
        """Move groups with ``official_update`` to ``w − rho_min_t·ĝ0`` before the base step."""
        if not any(gp.group["official_update"] for gp in groups):
            return
        denom = norm_g0 + self.perturb_eps
        for gp, g0 in zip(groups, g0_groups):
            if not gp.group["official_update"] or not gp.params:
                continue
            step = scaled(g0, self.rho_min_t(gp.group) / denom, self.foreach)
            add_(gp.params, step, alpha=-1.0, foreach=self.foreach)


def _split(flat: list[Tensor], groups: list) -> list[list[Tensor]]:
    out, offset = [], 0
    for gp in groups:
        out.append(flat[offset : offset + len(gp.params)])
        offset += len(gp.params)
    return out
