"""GSAM, surrogate-gap guided SAM (Zhuang et al., ICLR 2022)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from samkit.optim._tensors import add_, dot, global_norm, mul_
from samkit.optim.base import (
    ASAM_ETA,
    SharpnessAwareOptimizer,
    asam_defaults,
    invalid_value,
    is_finite_nonnegative,
)

__all__ = ["GSAM"]


class GSAM(SharpnessAwareOptimizer):
    r"""GSAM: SAM's descent plus an ascent of the clean loss orthogonal to SAM's gradient.

    SAM minimises the perturbed loss :math:`f_p(w) = L(w+\varepsilon)`; GSAM also minimises
    the *surrogate gap* :math:`h = f_p - f`, which near a minimum is about
    :math:`\rho^2\lambda_{\max}/2` (the dominant Hessian eigenvalue). It follows SAM's
    gradient :math:`g_p` and, orthogonally to it (so :math:`f_p` is not affected to first
    order), *ascends* the clean loss, which lowers :math:`h`. One step, with
    :math:`g = \nabla L_B(w)`:

    .. math::

        \varepsilon &= \rho_t\,\frac{g}{\lVert g\rVert + \epsilon}, \qquad
        g_p = \nabla L_B(w + \varepsilon), \qquad
        \hat g_p = \frac{g_p}{\lVert g_p\rVert + \epsilon}, \\
        g_\perp &= g - (g\cdot\hat g_p)\,\hat g_p, \qquad
        d = g_p - \alpha\,g_\perp, \qquad w \leftarrow \mathrm{base\_step}(w, d)

    with global inner products and norms (all parameters as one vector) and :math:`\alpha`
    per param group. With ``alpha=0`` and ``rho_min=None`` every step is exactly
    :class:`~samkit.SAM`.

    The radius follows the learning rate linearly, as in the paper's schedule
    (:math:`(\rho_t-\rho_{\min})/(\rho_{\max}-\rho_{\min}) = (\mathrm{lr}_t -
    \mathrm{lr}_{\min})/(\mathrm{lr}_{\max}-\mathrm{lr}_{\min})`) with
    :math:`\mathrm{lr}_{\max}` the schedule's peak and :math:`\mathrm{lr}_{\min} = 0`:

    .. math::

        \rho_t = \rho_{\min} + (\rho - \rho_{\min})\,
            \min\!\Big(1, \frac{\mathrm{lr}_t}{\mathrm{lr}_{\max}}\Big)

    where :math:`\mathrm{lr}_{\max}` is ``group["max_lr"]`` when the group has it
    (``OneCycleLR`` puts its peak there; so can you, for another schedule whose peak is
    above the initial lr), else ``group["initial_lr"]`` (set at construction, the key
    torch's LR schedulers use), so any scheduler drives it. :math:`\rho_t` never exceeds
    ``rho``. ``rho_min=None`` (default) keeps :math:`\rho_t = \rho`.

    Cost: two passes (forward + backward each) per step, as SAM; besides SAM's work, one
    copy of the clean gradient (one buffer per parameter, freed after the step), one inner
    product, and two in-place operations on the gradients (the update is computed as
    :math:`(1 + \alpha\,g\cdot g_p/(\lVert g_p\rVert+\epsilon)^2)\,g_p - \alpha\,g`).

    Distributed data parallel: the clean pass runs in ``no_sync()`` unless
    ``sync_ascent=True``, so each replica perturbs with its own gradient (as in SAM); the
    perturbed pass is synchronised, and the clean gradient :math:`g`, which enters the update
    through :math:`g_\perp`, is averaged over the replicas right after its pass. The
    decomposition then uses the same :math:`g` and :math:`g_p` on every replica. No random
    draws.

    Args:
        params: parameters, named parameters or param groups; groups may set their own
            ``rho``, ``rho_min``, ``alpha``, ``adaptive``, ``eta``.
        base_optimizer: a ``torch.optim.Optimizer`` class or a name (``"sgd"``, ...); its
            arguments (``lr``, ``momentum``, ``weight_decay``, ...) pass through ``**kwargs``.
        rho: the radius at the peak learning rate, :math:`\rho_{\max}` (default 0.05,
            SAM's default; the paper tunes it per model).
        alpha: weight of the orthogonal ascent (default 0.4, the official PyTorch CIFAR
            example; the official ViT-B/32 ImageNet configuration uses 0.6).
        rho_min: the radius when the learning rate reaches 0; ``None`` (default) means a
            constant ``rho``. Must not exceed ``rho``.
        adaptive: ASAM-style scale-invariant perturbation (``T = |w| + eta`` on weight
            tensors, see :class:`~samkit.ASAM`); the decomposition is unchanged.
        eta: ASAM's offset (only used when ``adaptive``).
        **kwargs: samkit's options of :class:`~samkit.SharpnessAwareOptimizer` (``model``,
            ``foreach``, ``on_nonfinite``, ``sync_ascent``, ...) and the base optimizer's
            arguments.

    Example::

        opt = samkit.GSAM(model.parameters(), "sgd", rho=0.1, rho_min=0.02, alpha=0.4,
                          lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
        for x, y in loader:
            loss = opt.step(samkit.make_closure(model, loss_fn, x, y))
            sched.step()   # rho_t follows the learning rate

    Differences from the paper / official code:
        * The official code schedules :math:`\rho_t` with a scheduler object tied to its
          own lr scheduler, between given ``lr_max`` and ``lr_min`` (the JAX ImageNet
          configuration uses ``lr_min = 0.01·lr_max``); samkit reads the group's current lr
          and takes ``lr_min = 0`` and ``lr_max`` = the peak above, so the two agree for
          schedules that end at lr 0, from the second step on: in the official PyTorch
          example the radius scheduler reads its lr scheduler's last lr, 0.0 before that
          scheduler's first step, so the first step runs with :math:`\rho_t = \rho_{\min}`
          (the two agree on every step only when ``rho_min = rho``).
        * :math:`\hat g_p` carries ``perturb_eps`` in its norm; the official PyTorch code
          writes the same projection as ``cos·‖g‖·g_p/(‖g_p‖+eps)`` with
          ``cos = g·g_p/(‖g‖‖g_p‖+eps)``: equal up to the eps terms. samkit evaluates
          :math:`d` in the equivalent form above, in place.
        * Under DDP the official PyTorch code runs *both* passes in ``no_sync()``,
          decomposes per replica and then all-reduces the final direction (with a SUM, i.e.
          a world-size-times larger gradient, in its versions up to March 2022; later
          versions average). samkit synchronises the perturbed pass and averages ``g``, so
          the decomposition sees the replicas' mean gradients.
        * ``adaptive=True`` uses samkit's ASAM rule. The official PyTorch code scales the
          perturbation by ``w²`` with the norm of ``|w|·g`` on every tensor (no ``eta``); the
          JAX code multiplies SAM's perturbation by ``|w|``.
        * The official JAX code also offers ``minimize_fp=False`` (decompose ``g_p`` along
          ``g`` and descend ``g + alpha·(g_p)_⊥``); samkit implements the paper's update only.
        * ``first_step`` / ``second_step`` are not available: use ``step(closure)``.

    References:
        J. Zhuang, B. Gong, L. Yuan, Y. Cui, H. Adam, N. Dvornek, S. Tatikonda, J. Duncan,
        T. Liu. Surrogate Gap Minimization Improves Sharpness-Aware Training. ICLR 2022.
        https://arxiv.org/abs/2203.08065 ; official code:
        https://github.com/juntang-zhuang/GSAM (PyTorch) and
        https://github.com/google-research/big_vision (JAX, ``trainers/proj/gsam``)
    """

    own_passes = "it needs the clean and the perturbed gradient together"

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        rho: float = 0.05,
        alpha: float = 0.4,
        rho_min: float | None = None,
        adaptive: bool = False,
        eta: float = ASAM_ETA,
        **kwargs: Any,
    ) -> None:
        defaults = dict(rho=rho, alpha=alpha, rho_min=rho_min, **asam_defaults(adaptive, eta))
        super().__init__(params, base_optimizer, defaults, **kwargs)

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        alpha = group.get("alpha")
        if not is_finite_nonnegative(alpha):
            raise invalid_value("alpha", alpha, "a finite number >= 0")
        rho_min = group.get("rho_min")
        if rho_min is not None:
            if not is_finite_nonnegative(rho_min):
                raise invalid_value("rho_min", rho_min, "a finite number >= 0 or None")
            if rho_min > group["rho"]:
                raise ValueError(
                    f"Invalid rho_min value: {rho_min} (larger than rho={group['rho']})"
                )
        # lr_0 of rho_t's schedule; torch's LR schedulers use the same key.
        group.setdefault("initial_lr", group["lr"])

    @staticmethod
    def rho_t(group: dict[str, Any]) -> float:
        """The group's current radius: ``rho_min + (rho - rho_min) * min(1, lr / lr_max)``,
        ``lr_max`` the group's ``max_lr`` (``OneCycleLR``'s peak) or else its ``initial_lr``."""
        rho = float(group["rho"])
        rho_min = group.get("rho_min")
        if rho_min is None:
            return rho
        lr_max = float(group.get("max_lr", group.get("initial_lr", group["lr"])))
        if lr_max == 0.0:
            return rho
        return float(rho_min) + (rho - float(rho_min)) * min(1.0, float(group["lr"]) / lr_max)

    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        loss = self.run_pass(closure, "clean")  # g = ∇L_B(w)
        groups = self.collect()
        params = [p for gp in groups for p in gp.params]
        alphas = [(float(gp.group["alpha"]), len(gp.params)) for gp in groups]
        g = self.kept([t for gp in groups for t in gp.grads])  # read after the next pass
        del groups  # the clean gradients are held once, as g
        self.perturb(radius=self.rho_t)  # ε = ρ_t·g/‖g‖, from this replica's own g
        # g enters the update through g_perp: the replicas' mean (no-op without DDP).
        self.all_reduce_mean_(g)
        self.run_pass(closure, "perturbed", perturbed=True)  # g_p = ∇L_B(w + ε)
        self.restore()
        if any(a != 0.0 for a, _ in alphas):
            with torch.no_grad():
                g_p = self.gradients(params, fill=True)  # the update is written into .grad
                norm_p = global_norm(g_p, self.foreach)
                self._check_unchecked_grads(norm_p)  # the finiteness check reuses this norm
                # d = g_p - alpha·(g - (g·ĝ_p)·ĝ_p) = (1 + alpha·c)·g_p - alpha·g, in place in
                # .grad, with c = g·g_p / (‖g_p‖ + eps)²: no temporary the size of the model.
                c = dot(g, g_p) / (norm_p + self.perturb_eps) ** 2
                if all(a == alphas[0][0] for a, _ in alphas):  # one alpha: one call
                    alphas = [(alphas[0][0], len(params))]
                offset = 0
                for alpha, n in alphas:
                    sl = slice(offset, offset + n)
                    offset += n
                    if alpha != 0.0 and n:
                        mul_(g_p[sl], 1.0 + alpha * c, self.foreach)
                        add_(g_p[sl], g[sl], alpha=-alpha, foreach=self.foreach)
        self.base_step()  # w ← base_step(w, d)
        return loss
