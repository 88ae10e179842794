"""ESAM, Efficient Sharpness-Aware Minimization (Du et al., ICLR 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim._compat import is_compiled
from samkit.optim._rng import OwnedGenerator, check_seed, initial_rng_state
from samkit.optim._validation import is_fraction
from samkit.optim.base import ASAM_ETA, SharpnessAwareOptimizer, asam_defaults, invalid_value
from samkit.optim.closure import BatchClosure

__all__ = ["ESAM", "selection_size", "top_increase"]


def selection_size(fraction: float, n: int) -> int:
    """``⌈fraction·n⌉`` samples (at least 1, at most ``n``), robust to float rounding.

    ``0.07 * 100`` is ``7.000000000000001`` in floating point: rounding the product to 9
    decimals first keeps exact products exact.
    """
    return max(1, min(n, math.ceil(round(fraction * n, 9))))


def top_increase(increase: Tensor, k: int) -> Tensor:
    """Batch positions of the ``k`` largest entries of ``increase``, in ascending order.

    Ties are broken by batch position (the earlier sample wins): a stable descending sort.
    """
    order = torch.sort(increase, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


class ESAM(SharpnessAwareOptimizer):
    r"""Efficient SAM: perturb a random subset of the weights, descend on the sharpest data.

    ESAM cuts SAM's cost with two strategies applied in every step.

    **Stochastic Weight Perturbation (SWP).** Each parameter tensor is *chosen* with
    probability :math:`\beta` (an independent Bernoulli draw per tensor, every step, from the
    optimizer's own seeded generator). Unchosen tensors do not compute weight gradients in
    the first backward pass (their ``requires_grad`` is switched off for that pass and always
    switched back, also when the pass raises) and are not perturbed. Two cases draw after the
    first pass instead, which then computes every tensor's gradient and drops the unchosen
    ones (the same numbers): a model that runs through ``torch.compile`` (switching
    ``requires_grad`` would recompile it at every step) and a step with tensors not yet seen
    in a full pass (the first step, a tensor just unfrozen), since the fallback below draws
    among the tensors that *receive* a gradient (a trainable but unused head does not).
    With :math:`m` the mask and :math:`g = \nabla L_B(w)` (defined on the chosen tensors
    only):

    .. math::

        \varepsilon = \frac{\rho}{\beta}\,\frac{m \odot g}{\lVert m \odot g\rVert + \epsilon}

    The :math:`1/\beta` is the paper's: it makes the expected perturbation over the masks
    comparable to SAM's, but it also makes the actual radius :math:`\rho/\beta` (twice
    :math:`\rho` at :math:`\beta = 0.5`). To get SAM's radius :math:`\rho_{SAM}`, pass
    ``rho = beta * rho_SAM``.

    **Sharpness-Sensitive Data Selection (SDS).** With the per-sample losses
    :math:`\ell_i(w)` of the first pass and :math:`\ell_i(w+\varepsilon)` of a forward-only
    pass at the perturbed weights, keep the :math:`k = \lceil\gamma\,|B|\rceil` samples with
    the largest increase :math:`\ell_i(w+\varepsilon) - \ell_i(w)` (:math:`B^+`), and take the
    gradient of their mean loss at the perturbed weights:

    .. math::

        g' = \nabla_w \frac{1}{|B^+|}\sum_{i \in B^+} \ell_i(w + \varepsilon), \qquad
        w \leftarrow \mathrm{base\_step}(w, g')

    Ties in the increase are broken by batch position (a stable sort: the earlier sample is
    kept). With ``beta=1`` and ``gamma=1`` every step is exactly :class:`~samkit.SAM` (the
    same passes, bit for bit): ``gamma=1`` skips the selection pass, ``beta=1`` draws no
    mask.

    Cost per step, in full-batch units: forwards :math:`1 + 1 + \gamma` (the clean pass, the
    selection pass without graph, the pass on :math:`B^+`) and backwards :math:`1 + \gamma`,
    where the first backward skips the weight gradients of about :math:`1-\beta` of the
    tensors. With forward = 1/3 and backward = 2/3 of a pass that is
    :math:`(2 + \gamma)/3 + 2(1 + \gamma)/3` = 1.83 passes at the defaults, not counting the
    saving of SWP (SAM: 2).

    Args:
        params: parameters, named parameters or param groups; groups may set their own
            ``rho``, ``beta``, ``adaptive``, ``eta``.
        base_optimizer: a ``torch.optim.Optimizer`` class or a name (``"sgd"``, ...); its
            arguments (``lr``, ``momentum``, ``weight_decay``, ...) pass through ``**kwargs``.
        rho: the paper's radius (default 0.05, the official class default and its ResNet-18
            recipe); the perturbation's norm is ``rho / beta``.
        beta: probability that a parameter tensor is perturbed, in ``(0, 1]`` (default 0.5,
            the paper's WideResNet/PyramidNet value; its ResNet-18 recipe uses 0.6).
        gamma: fraction of the batch kept for the second pass, in ``(0, 1]`` (default 0.5,
            the paper's value).
        adaptive: ASAM's scale-invariant perturbation, ``T = |w| + eta`` on weight tensors.
        eta: ASAM's offset (only used when ``adaptive``).
        seed: seed of the generator that draws the masks (default ``None``:
            ``torch.initial_seed()``, so ``torch.manual_seed(s)`` before building the optimizer
            makes runs reproducible). Its state is part of ``state_dict()``.
        **kwargs: samkit's options of :class:`~samkit.SharpnessAwareOptimizer` (``model``,
            ``foreach``, ``on_nonfinite``, ``sync_ascent``, ...) and the base optimizer's
            arguments.

    Measured on MNIST-1D (``docs/methods/esam.md``): at ``rho`` = SAM's good radius the
    ``1/beta`` doubles it and training collapses; at ``rho = beta * rho_SAM`` ESAM matches SAM
    on clean labels, but with 25 % label noise the data selection (``gamma < 1``) trains
    pass 2 mostly on mislabelled samples and fails, while ``gamma = 1`` matches SAM.

    ``gamma < 1`` needs a :class:`~samkit.BatchClosure` whose ``loss_fn`` returns per-sample
    losses (``samkit.make_closure(model, nn.CrossEntropyLoss(reduction="none"), x, y)``;
    ``samkit train`` builds one); ``gamma=1`` works with a standard closure too. The loss
    returned by :meth:`step` is the clean pass's batch objective (weighted and padded as
    the loss function says), as for every method. With BatchNorm in train mode
    :math:`B^+` has at least 2 samples.

    Example::

        opt = samkit.ESAM(model.parameters(), "sgd", rho=0.05, beta=0.5, gamma=0.5,
                          lr=0.05, momentum=0.9, model=model)
        for x, y in loader:
            loss = opt.step(samkit.make_closure(model, loss_fn, x, y))

    Distributed (DDP):
        * SDS is local: each replica keeps the ``⌈gamma·|B_r|⌉`` samples of its own shard with
          the largest increase; the second pass is synchronised, so every replica applies
          the same averaged gradient (replicas stay bit-identical).
        * The first pass runs in ``no_sync()`` whenever a mask leaves a tensor out (DDP's
          reducer expects a gradient for every parameter in a synchronised backward).
          With ``sync_ascent=True`` the chosen tensors' gradients are then averaged over the
          replicas by one explicit all-reduce, and rank 0's mask is broadcast to every
          replica before the pass, so all replicas perturb the same tensors even if they
          were given different seeds (the all-reduce needs the same tensors everywhere; it
          cannot deadlock). With the default ``sync_ascent=False`` each replica perturbs
          with its own mask and gradient (local, like SAM's ascent) and no collective runs
          in the first pass.
        * Drive ESAM through a :class:`~samkit.BatchClosure` under DDP (a standard closure
          runs its own synchronised backward, which DDP refuses when a tensor is left out).

    FSDP2 (``fully_shard``): every pass is synchronised (FSDP2 reduce-scatters every
    backward), so the first process's mask is always broadcast to the processes sharing the
    parameters' mesh (whatever ``sync_ascent`` says): a left-out tensor must be left out by
    every process, or their reduce-scatters would not match.

    Differences from the paper / official code (dydjw9/Efficient_SAM, ``utils/Esam.py``):
        * The official selection keeps the samples with ``increase > cutoff`` where cutoff
          is the ``k``-th largest increase, i.e. ``k - 1`` samples (fewer with ties); samkit
          keeps exactly ``k = ⌈gamma·|B|⌉``, ties broken by batch position. The official
          code keeps every sample when ``gamma >= 0.99``; samkit only at ``gamma = 1``.
        * The official code crashes when no tensor is chosen (a real risk for small models).
          samkit then perturbs one tensor chosen uniformly at random among those that
          receive a gradient (a second draw from the same generator), so a step always
          perturbs something.
        * The official mask is drawn with Python's global ``random`` after each base step
          and applies to the next step (the first step perturbs every tensor); samkit draws
          it at the start of each step from its own seeded ``torch.Generator``, saved in
          ``state_dict()``, and every step uses a fresh mask.
        * BatchNorm running statistics are updated by the clean pass only; the official
          selection forward pass (train mode, at the perturbed weights) updates them too.
        * ``eps`` in the normalisation is ``perturb_eps`` (1e-12) instead of 1e-7, and
          ``adaptive=True`` uses samkit's ASAM rule (``T = |w| + eta`` on weight tensors,
          1 on biases) where the official code multiplies every tensor by ``|w|``.

    References:
        J. Du, H. Yan, J. Feng, J. T. Zhou, L. Zhen, R. S. M. Goh, V. Y. F. Tan.
        Efficient Sharpness-aware Minimization for Improved Training of Neural Networks.
        ICLR 2022. https://arxiv.org/abs/2110.03141 ; official code:
        https://github.com/dydjw9/Efficient_SAM
    """

    step_globals = ("gamma",)  # one subset of the batch per step

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        rho: float = 0.05,
        beta: float = 0.5,
        gamma: float = 0.5,
        adaptive: bool = False,
        eta: float = ASAM_ETA,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        seed = check_seed(seed)
        defaults = dict(rho=rho, beta=beta, gamma=gamma, **asam_defaults(adaptive, eta))
        super().__init__(params, base_optimizer, defaults, **kwargs)
        self.samkit_state["rng_state"] = initial_rng_state(seed)
        self._draws = OwnedGenerator("rng_state")
        #: Which trainable tensors received a gradient in the last step's full pass.
        self._receives: dict[Tensor, bool] = {}

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        for key in ("beta", "gamma"):
            if not is_fraction(group.get(key)):
                raise invalid_value(key, group.get(key), "a number in (0, 1]")

    @property
    def gamma(self) -> float:
        """The data-selection fraction (one value for the whole step, as every group's)."""
        return float(self.step_global("gamma"))

    @staticmethod
    def _radius(group: dict[str, Any]) -> float:
        return float(group["rho"]) / float(group["beta"])

    # ------------------------------------------------------------------ the step
    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        gamma = self.gamma
        select = gamma < 1.0
        if select and not isinstance(closure, BatchClosure):
            raise TypeError(
                "ESAM with gamma < 1 selects samples by their per-sample losses: build the "
                "closure with samkit.make_closure(model, loss_fn, inputs, targets) and a "
                "loss_fn that returns one loss per sample (reduction='none'), or use gamma=1"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        trainable = [p for p in params if p.requires_grad]
        draw = any(float(g["beta"]) < 1.0 for g in self.param_groups)
        # SWP, each tensor kept with probability β, among the tensors that get a gradient.
        # Drawn before pass 1 (the left-out tensors skip their weight gradients) when those
        # are known and the model runs eagerly; else drawn after it, from every tensor's
        # gradient (the same result; one torch.compile graph; it sees the gradients).
        model = self.model if self.model is not None else getattr(closure, "model", None)
        after = draw and (is_compiled(model) or any(p not in self._receives for p in trainable))
        before = draw and not after
        left_out = (
            self._draw_left_out(closure, [p for p in trainable if self._receives[p]])
            if before
            else []
        )

        # Pass 1 at w, ℓ_i(w), without the weight gradients of the tensors left out.
        sync = False if (left_out or after) else None
        try:
            for p in left_out:
                p.requires_grad_(False)
            clean = self.run_pass(closure, "clean", sync=sync, per_sample=select)
        finally:
            for p in left_out:
                p.requires_grad_(True)
        loss = closure.last_objective if select else clean  # the batch objective
        if after:
            left_out = self._draw_left_out(closure, [p for p in trainable if p.grad is not None])
            for p in left_out:
                p.grad = None
        if sync is False and self.sync_ascent:
            # The pass was local (see "Distributed" in the docstring): average the chosen
            # tensors' gradients explicitly, the same tensors on every replica.
            self.all_reduce_mean_([g for gp in self.collect() for g in gp.grads])

        # ε = (ρ/β)·(m ⊙ g)/‖m ⊙ g‖: the left-out tensors have no gradient, so their ε is 0.
        self.perturb(radius=self._radius)
        if select:
            # SDS: ℓ_i(w + ε) forward only; B⁺ = the ⌈γ|B|⌉ largest increases (at least 2
            # samples under BatchNorm in train mode); pass 2 on B⁺.
            perturbed = self.run_pass(
                closure, "select", perturbed=True, backward=False, per_sample=True
            )
            n = int(clean.shape[0])
            k = max(selection_size(gamma, n), min(n, self.smallest_sub_batch(closure)))
            top = top_increase(perturbed - clean, k)
            self.run_pass(closure, "perturbed", perturbed=True, subset=top)
        else:
            self.run_pass(closure, "perturbed", perturbed=True)
        # Every trainable tensor took part in pass 2: which of them receive a gradient.
        self._receives = {p: p.grad is not None for p in trainable}
        self.restore()
        self.base_step()  # w ← base_step(w, g')
        return loss

    def _draw_left_out(self, closure: Any, receivers: list[Tensor]) -> list[Tensor]:
        """This step's SWP mask: the trainable tensors that are *not* perturbed.

        One uniform number per parameter (every group, in order) from the optimizer's
        generator; a tensor is chosen when its number is below its group's ``beta``. If no
        tensor of ``receivers`` (those that get a gradient) is chosen, one of them is chosen
        uniformly at random (a second draw): a step always perturbs something.
        """
        params = [p for g in self.param_groups for p in g["params"]]
        betas = [float(g["beta"]) for g in self.param_groups for _ in g["params"]]
        gen = self._draws.take(self.samkit_state)
        u = torch.rand(len(params), generator=gen, dtype=torch.float64)
        chosen = [bool(ui < b) for ui, b in zip(u.tolist(), betas)]
        ids = {id(p) for p in receivers}
        candidates = [i for i, p in enumerate(params) if id(p) in ids]
        if candidates and not any(chosen[i] for i in candidates):
            pick = int(torch.randint(len(candidates), (1,), generator=gen))
            chosen[candidates[pick]] = True
        self.on_accept(lambda: self._draws.put(self.samkit_state))
        chosen = self._agree_on_mask(closure, chosen)
        return [p for p, c in zip(params, chosen) if not c and p.requires_grad]

    def _agree_on_mask(self, closure: Any, chosen: list[bool]) -> list[bool]:
        """Every process of a synchronised pass uses the first process's mask.

        Under DDP with ``sync_ascent`` and always under FSDP2 (whose passes are always
        synchronised): one broadcast (:meth:`agree`). Local ascent passes keep each
        process's own draw.
        """
        flags = torch.tensor(chosen, dtype=torch.uint8)
        agreed = self.agree(flags, getattr(closure, "model", None), replicas=self.sync_ascent)
        return [bool(f) for f in agreed.tolist()]
