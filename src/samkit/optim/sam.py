"""SAM (Foret et al., 2021) and ASAM (Kwon et al., 2021)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from samkit.optim.base import ASAM_ETA, SharpnessAwareOptimizer, asam_defaults

__all__ = ["SAM", "ASAM"]


class SAM(SharpnessAwareOptimizer):
    r"""Sharpness-Aware Minimization.

    One step, with :math:`g = \nabla L_B(w)` the clean mini-batch gradient:

    .. math::

        \varepsilon = \rho\,\frac{g}{\lVert g\rVert + \epsilon}, \qquad
        g' = \nabla L_B(w + \varepsilon), \qquad
        w \leftarrow \mathrm{base\_step}(w, g')

    The norm is the global L2 norm over every parameter that has a gradient. Two passes
    (forward + backward) per step. With ``adaptive=True`` this is ASAM (see :class:`ASAM`).

    Args:
        params: parameters, named parameters or param groups; groups may set their own
            ``rho``, ``adaptive``, ``eta`` and ``weight_scaling``.
        base_optimizer: a ``torch.optim.Optimizer`` class or a name (``"sgd"``, ``"adamw"``,
            ...); its keyword arguments (``lr``, ``momentum``, ``weight_decay`` ...) pass
            through ``**kwargs``.
        rho: radius of the neighbourhood (default 0.05).
        adaptive: ASAM's scale-invariant neighbourhood.
        eta: ASAM's offset in ``T = |w| + eta`` (only used when ``adaptive``).
        **kwargs: samkit's options of :class:`SharpnessAwareOptimizer` (``model``,
            ``foreach``, ``on_nonfinite``, ``sync_ascent``, ``max_grad_norm``,
            ``perturb_eps``) and the base optimizer's arguments.

    Example::

        opt = samkit.SAM(model.parameters(), "sgd", rho=0.05, lr=0.1, momentum=0.9)
        for x, y in loader:
            loss = opt.step(samkit.make_closure(model, loss_fn, x, y))

    Notes:
        * Weight decay belongs to the base optimizer: it is not part of the gradient that
          defines the perturbation (the common PyTorch practice; the original JAX code added
          the L2 term to the loss, hence to the ascent gradient as well).
        * BatchNorm running statistics are updated by the clean pass only (as in the
          original code); the perturbed pass leaves them untouched.
        * Under DDP the clean (ascent) pass runs in ``no_sync()``: each replica perturbs with
          its own gradient (m-sharpness with m = per-device batch), as in the original.
          ``sync_ascent=True`` synchronises it. Under FSDP2 it is always synchronised (FSDP2
          reduce-scatters every backward pass), and the norm is that of the whole sharded
          gradient.

    References:
        P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021. https://arxiv.org/abs/2010.01412
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = ASAM_ETA,
        **kwargs: Any,
    ) -> None:
        defaults = dict(rho=rho, **asam_defaults(adaptive, eta))
        super().__init__(params, base_optimizer, defaults, **kwargs)


class ASAM(SAM):
    r"""Adaptive SAM: SAM in a neighbourhood scaled by the weights.

    .. math::

        T = |w| + \eta \ \text{(weight tensors)},\quad T = 1 \ \text{(biases, norm layers)},
        \qquad \varepsilon = \rho\,\frac{T^2 \odot g}{\lVert T \odot g\rVert + \epsilon}

    then ``g' = ∇L(w + ε)`` and the base step, as in :class:`SAM`.

    Which tensors are *weights*: with plain parameters, every tensor with more than one
    dimension (conv and linear weights); biases and normalisation-layer parameters get
    ``T = 1``. With named parameters (``model.named_parameters()``) the official rule is
    used instead: every parameter whose name ends in ``weight`` (this includes BatchNorm
    weights). A param group can force the choice with ``weight_scaling=True`` (T on every
    tensor of the group) or ``weight_scaling=False`` (T = 1).

    Defaults: ``rho=0.5`` and ``eta=0.01``, the official code's values for CIFAR-10 (it uses
    ``rho=1.0`` on CIFAR-100).

    Differences from popular code: a widely copied PyTorch SAM applies ``T = |w|`` to biases
    too and has no ``eta``; samkit follows the paper and the official implementation.

    References:
        J. Kwon, J. Kim, H. Park, I. K. Choi. ASAM: Adaptive Sharpness-Aware Minimization
        for Scale-Invariant Learning of Deep Neural Networks. ICML 2021.
        https://arxiv.org/abs/2102.11600
    """

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        rho: float = 0.5,
        eta: float = ASAM_ETA,
        **kwargs: Any,
    ) -> None:
        if kwargs.pop("adaptive", True) is not True:
            raise ValueError("ASAM is always adaptive; use SAM for adaptive=False")
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, eta=eta, **kwargs)
