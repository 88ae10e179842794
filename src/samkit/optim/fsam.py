"""F-SAM, Friendly Sharpness-Aware Minimization (Li et al., CVPR 2024)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim._tensors import (
    add,
    add_,
    add_scaled_,
    copy_,
    is_sharded,
    like_layout,
    local,
    mul_,
    scaled,
    slices,
    where_,
)
from samkit.optim.base import (
    ASAM_ETA,
    GroupParams,
    SharpnessAwareOptimizer,
    asam_defaults,
    invalid_value,
    is_finite_nonnegative,
)

__all__ = ["FriendlySAM"]


class FriendlySAM(SharpnessAwareOptimizer):
    r"""Friendly SAM: perturb along the batch-specific part of the gradient.

    SAM's perturbation :math:`\rho\,g/\lVert g\rVert` mixes two components: the full-batch
    gradient, which F-SAM's authors show does not help generalization (and hurts it), and the
    batch-specific "noise" around it, which does. F-SAM estimates the full-batch gradient by an
    exponential moving average :math:`m` of past stochastic gradients and removes it from the
    perturbation direction. One step, with :math:`g_t = \nabla L_B(w_t)` the clean gradient:

    .. math::

        d_t &= \begin{cases} g_1 & t = 1 \\ g_t - \sigma\, m_{t-1} & t > 1 \end{cases}
        \qquad
        m_t = \begin{cases} g_1 & t = 1 \\ \lambda\, m_{t-1} + (1-\lambda)\, g_t & t > 1
        \end{cases} \\
        \varepsilon_t &= \rho\,\frac{d_t}{\lVert d_t\rVert + \epsilon}, \qquad
        g'_t = \nabla L_B(w_t + \varepsilon_t), \qquad
        w_{t+1} = \mathrm{base\_step}(w_t, g'_t)

    The first step is plain SAM and initialises the average with the first gradient; the
    average always takes the *raw* gradient :math:`g_t` (never :math:`d_t`). With
    ``sigma=0`` every step is exactly :class:`~samkit.SAM`. With ``adaptive=True`` the
    perturbation uses ASAM's scaling with :math:`d` in place of :math:`g`:
    :math:`\varepsilon = \rho\,T^2 d/(\lVert T d\rVert + \epsilon)`, ``T = |w| + eta`` on weight
    tensors (see :class:`~samkit.ASAM`).

    Two passes per step; one extra buffer per parameter (``state[p]["ema"]``, separate from
    the base optimizer's momentum), and the weights' copy during the step. The average is
    part of ``state_dict()``, so a resumed run continues exactly.

    Args:
        params: parameters, named parameters or param groups; groups may set their own
            ``rho``, ``sigma``, ``lmbda``, ``adaptive``, ``eta``.
        base_optimizer: a ``torch.optim.Optimizer`` class or a name (``"sgd"``, ...); its
            arguments (``lr``, ``momentum``, ``weight_decay``, ...) pass through ``**kwargs``.
        rho: radius of the perturbation (default 0.05; the official CIFAR recipe uses 0.2,
            samkit's registry uses 0.1 on the embedded benchmark).
        sigma: weight of the removed full-gradient estimate (default 1.0, the paper's value).
        lmbda: decay of the gradient average, in ``[0, 1)`` (default 0.6, the value of the
            official CIFAR-100 recipe and logs; the class default in the official code is 0.9
            and its ``run.sh`` also shows 0.95).
        adaptive: ASAM-style scale-invariant perturbation of ``d``.
        eta: ASAM's offset in ``T = |w| + eta`` (only used when ``adaptive``).
        **kwargs: samkit's options of :class:`~samkit.SharpnessAwareOptimizer` (``model``,
            ``foreach``, ``on_nonfinite``, ...) and the base optimizer's arguments.

    Example::

        opt = samkit.FriendlySAM(model.parameters(), "sgd", rho=0.1, lr=0.05, momentum=0.9)
        for x, y in loader:
            loss = opt.step(samkit.make_closure(model, loss_fn, x, y))

    Differences from the paper / official code:
        * Same order of operations as the official code (nblt/F-SAM, ``utils.py``): plain SAM
          on the first step with the average initialised to the first gradient, then
          ``d = g - sigma*m`` followed by the update of ``m`` with the raw gradient. Another
          public implementation feeds the modified ``d`` into the average; samkit does not.
        * ``sigma`` and ``lmbda`` are per-group hyperparameters (global in the official code).
        * ``adaptive=True`` uses samkit's ASAM rule (``T = |w| + eta`` on weight tensors only,
          ``T = 1`` on biases); the official F-SAM applies ``|w|`` to every tensor with no
          ``eta``.
        * The average is updated before the perturbed pass, as in the official code, so the
          step holds two parameter-sized buffers (the average and the weights' copy), not
          three. It takes the clean gradient only if the clean pass was finite (a NaN never
          reaches it); a step that then fails in its perturbed pass, or is skipped there
          (``on_nonfinite="skip"``, a ``GradScaler`` overflow), keeps that update, while the
          weights and the base optimizer are left as before the step
          (:attr:`~samkit.SharpnessAwareOptimizer.clean_pass_state`). The official code has
          no such check.
        * Under a ``GradScaler`` the average holds unscaled gradients, so a change of scale
          does not mix scales in ``g - sigma*m``.

    References:
        T. Li, P. Zhou, Z. He, X. Cheng, X. Huang. Friendly Sharpness-Aware Minimization.
        CVPR 2024. https://arxiv.org/abs/2403.12350 ; official code:
        https://github.com/nblt/F-SAM
    """

    clean_pass_state = ("ema",)  # m_t is made before the perturbed pass (the official order)

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        rho: float = 0.05,
        sigma: float = 1.0,
        lmbda: float = 0.6,
        adaptive: bool = False,
        eta: float = ASAM_ETA,
        **kwargs: Any,
    ) -> None:
        defaults = dict(rho=rho, sigma=sigma, lmbda=lmbda, **asam_defaults(adaptive, eta))
        super().__init__(params, base_optimizer, defaults, **kwargs)

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        sigma = group.get("sigma")
        if not is_finite_nonnegative(sigma):
            raise invalid_value("sigma", sigma, "a finite number >= 0")
        lmbda = group.get("lmbda")
        if not (is_finite_nonnegative(lmbda) and lmbda < 1.0):
            raise invalid_value("lmbda", lmbda, "a number in [0, 1)")

    @torch.no_grad()
    def ascent_direction(self, groups: list[GroupParams]) -> list[list[Tensor]]:
        """``d = g - sigma * m`` (``g`` on a parameter's first step), and the average's update.

        ``m_t = lmbda*m_{t-1} + (1-lmbda)*g_t`` (with the raw ``g_t``) is made here, before
        the perturbed pass, as in the official code: ``d`` is written over ``g`` and ``m`` is
        updated in place, slice by slice (:func:`~samkit.optim._tensors.slices`), so the step
        holds the average and the weights' copy and no third parameter-sized buffer. The
        update takes effect only if the clean pass was finite (an on-device flag, no
        synchronisation): a NaN never reaches the average. A parameter's first average
        (``m_1 = g_1``) is stored once the step is accepted. Under a ``GradScaler`` the
        average holds unscaled gradients.
        """
        directions: list[list[Tensor]] = []
        first_seen: list[tuple[Tensor, Tensor]] = []  # parameters without an average yet
        folds: list[tuple[GroupParams, list[int], list[Tensor]]] = []
        for gp in groups:
            directions.append(list(gp.grads))
            idx = [i for i, p in enumerate(gp.params) if "ema" in self.state[p]]
            if idx:
                folds.append((gp, idx, directions[-1]))
            # t = 1: d_1 = g_1 (plain SAM), and the average starts at m_1 = g_1.
            first = [i for i, p in enumerate(gp.params) if "ema" not in self.state[p]]
            kept = self.kept([gp.grads[i] for i in first])  # read once the step is accepted
            first_seen.extend((gp.params[i], g) for i, g in zip(first, kept))
        scale = self._grad_scale()
        if folds:
            ok = self.finite_so_far(folds[0][0].grads[0].device)
            for gp, idx, d in folds:
                grads = [gp.grads[i] for i in idx]
                emas = [self.state[gp.params[i]]["ema"] for i in idx]
                sigma, lmbda = float(gp.group["sigma"]), float(gp.group["lmbda"])
                for i, di in zip(idx, self._fold(grads, emas, sigma, lmbda, ok, scale)):
                    d[i] = di

        def store_first() -> None:  # m_1 = g_1 (unscaled)
            for p, g in first_seen:
                self.state[p]["ema"] = g if scale is None else g.div_(scale)

        if first_seen:
            self.on_accept(store_first)
        return directions

    def _fold(
        self,
        grads: list[Tensor],
        emas: list[Tensor],
        sigma: float,
        lmbda: float,
        ok: Tensor,
        scale: Tensor | None,
    ) -> list[Tensor]:
        """The directions ``d_t = g_t - sigma·m_{t-1}``, and ``m_t`` into ``emas`` where ``ok``.

        ``d`` is written over ``g`` (the clean pass's gradients, which the perturbed pass
        replaces; in DDP's buckets too, which that pass overwrites only after ``d`` has moved
        the weights), except between ``first_step`` and ``second_step``, where the user's
        loop owns them and ``d`` is new.
        On a CPU the flag is read at once (there is no device to wait for) and ``m`` is
        updated in place; on an accelerator ``m_t`` is formed beside ``m_{t-1}`` per slice
        and selected with ``torch.where`` on the device.
        """
        own = not self._manual_step
        take = _host_flag(ok)  # None: decided on the device
        out: list[Tensor] = []
        g_local, m_local = local(grads), local(emas)
        for run in slices(g_local):
            g = [g_local[i] for i in run]
            m = [m_local[i] for i in run]
            s = None if scale is None else scale.to(torch.promote_types(g[0].dtype, torch.float32))
            if s is None:
                d = add(g, m, alpha=-sigma, foreach=self.foreach)  # d_t = g_t - σ·m_{t-1}
            else:  # g is S·∇L: d = g - σS·m ∝ g/S - σ·m (its scale does not matter), m takes g/S
                d = scaled(m, -sigma * s, self.foreach)
                add_(d, g, foreach=self.foreach)
            if take is not False:  # m_t = λ·m_{t-1} + (1-λ)·g_t (a NaN never reaches it)
                if take:
                    new_m = m
                    mul_(m, lmbda, self.foreach)
                else:
                    new_m = scaled(m, lmbda, self.foreach)
                if s is None:
                    add_(new_m, g, alpha=1.0 - lmbda, foreach=self.foreach)
                else:
                    add_scaled_(new_m, g, (1.0 - lmbda) / s, self.foreach)
                if take is None:
                    where_(m, ok, new_m)
            if own:
                copy_(g, d, self.foreach)
                d = g
            out.extend(d)
        if own:
            return list(grads)
        return like_layout(out, grads) if is_sharded(grads) else out

    def _grad_scale(self) -> Tensor | None:
        """The scale ``S`` of this step's backward passes (the closure's ``GradScaler``, a
        0-dim tensor on its device: no synchronisation), ``None`` without scaling."""
        scaler = self._grad_scaler
        if scaler is None or not scaler.is_enabled():
            return None
        return getattr(scaler, "_scale", None)  # set by the passes' scaler.scale(loss)


def _host_flag(ok: Tensor) -> bool | None:
    """``ok`` read on the host where that costs no wait (a CPU tensor), else ``None``."""
    return bool(ok) if ok.device.type == "cpu" else None
