"""AUSAM, Asymptotic Unbiased Sample Sampling to speed up SAM (Deng, Pang, Zhang, 2024)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim._rng import OwnedGenerator, check_seed, initial_rng_state
from samkit.optim._validation import is_fraction
from samkit.optim.base import ASAM_ETA, SharpnessAwareOptimizer, asam_defaults, invalid_value
from samkit.optim.closure import BatchClosure
from samkit.optim.esam import selection_size

__all__ = ["AUSAM", "sampling_weights"]


def sampling_weights(scores: Tensor, seen: Tensor, max_ratio: float) -> Tensor:
    """Unnormalised sampling weights of a batch's samples from their scores (float64).

    ``w_i = max(s_i, s_max / max_ratio)`` for samples with a score, where ``s_max`` is the
    largest score in the batch; a sample never seen gets ``s_max`` (the highest weight), so
    new samples are tried first. The largest weight is therefore at most ``max_ratio``
    times the smallest. Without any positive score in the batch the weights are uniform.
    """
    scores = scores.to(torch.float64)
    top = scores[seen].max() if bool(seen.any()) else scores.new_zeros(())
    if not float(top) > 0.0:  # nothing known yet (or every known score is 0): uniform
        return torch.ones_like(scores)
    weights = torch.where(seen, scores, top)
    return weights.clamp(min=float(top) / max_ratio)


class AUSAM(SharpnessAwareOptimizer):
    r"""AUSAM: SAM's two passes on a subset of each batch, sampled by each sample's sharpness.

    SAM's extra cost is spent equally on every sample of a batch. AUSAM spends it on the
    samples for which the sharpness step matters most: those with a large per-sample gradient
    norm (GNS), which the paper estimates for free by the *difference in loss before and after
    the perturbation*

    .. math::

        \mathrm{DLP}_i = \lvert \ell_i(w + \varepsilon) - \ell_i(w) \rvert
        \approx \rho\,\lvert \nabla \ell_i(w)^\top \hat g \rvert,

    available for every sample that took part in a step. Each sample keeps its *average*
    DLP over the steps it took part in (:math:`\mathrm{ADLP}_i`, by dataset index), and every
    step samples :math:`k = \lceil f\,|B| \rceil` samples of the batch :math:`B` without
    replacement with probabilities proportional to

    .. math::

        w_i = \max\!\Big(\mathrm{ADLP}_i,\ \frac{\max_{j \in B} \mathrm{ADLP}_j}{r}\Big),
        \qquad w_i = \max_{j \in B} \mathrm{ADLP}_j \ \text{for a sample never seen},

    so the most and the least likely samples of a batch differ by at most the factor
    :math:`r` (``max_ratio``) and a new sample is tried first. On the sampled subset
    :math:`S` the step is SAM:

    .. math::

        g = \nabla L_S(w), \quad \varepsilon = \rho\,\frac{g}{\lVert g\rVert + \epsilon}, \quad
        g' = \nabla L_S(w + \varepsilon), \quad w \leftarrow \mathrm{base\_step}(w, g')

    and the per-sample losses of the two passes give the new DLPs of :math:`S` (recorded once
    the step is accepted). ``fraction=1`` is exactly :class:`~samkit.SAM` (every sample,
    no draw); ``max_ratio=1`` samples uniform random subsets.

    Cost per step: two passes on :math:`f\,|B|` samples, i.e. :math:`2f` full-batch passes
    (1.0 at the default ``fraction=0.5``, the cost of SGD), plus the draw.

    Args:
        params: parameters, named parameters or param groups; groups may set their own
            ``rho``, ``adaptive``, ``eta``.
        base_optimizer: a ``torch.optim.Optimizer`` class or a name (``"sgd"``, ...); its
            arguments (``lr``, ``momentum``, ``weight_decay``, ...) pass through ``**kwargs``.
        rho: SAM's radius on the subset (default 0.05).
        fraction: the sampled fraction of each batch, in ``(0, 1]`` (default 0.5).
        max_ratio: bound on the ratio of the largest to the smallest sampling weight in a
            batch, ``>= 1`` (default 4).
        adaptive, eta: ASAM's scale-invariant perturbation (see :class:`~samkit.ASAM`).
        seed: seed of the generator that draws the subsets (default ``None``:
            ``torch.initial_seed()``). Its state is part of ``state_dict()``.
        **kwargs: samkit's options of :class:`~samkit.SharpnessAwareOptimizer` and the base
            optimizer's arguments.

    Measured on MNIST-1D (``docs/methods/ausam.md``): at SGD's number of gradient
    evaluations AUSAM matches SAM on clean labels; with 25 % label noise the ADLP sampling
    favours mislabelled samples and loses about 4 points to SAM, while uniform subsets
    (``max_ratio=1``) with a smaller radius (0.025) match SAM on both.

    Needs a :class:`~samkit.BatchClosure` with dataset indices and per-sample losses:
    ``samkit.make_closure(model, nn.CrossEntropyLoss(reduction="none"), x, y, indices=idx)``
    (``samkit train`` builds one). The loss returned by :meth:`step` is the clean objective
    of the sampled subset (:math:`L_S(w)`, weighted and padded like the batch's); with
    ``fraction=1`` the batch's, as SAM's. ``closure.outputs`` is not filled (no pass sees
    the whole batch). With BatchNorm in train mode the subset has at least 2 samples.

    State: ``samkit_state["adlp"]`` (float64, the average DLP per dataset index) and
    ``samkit_state["adlp_count"]`` (int64, how many DLPs each average holds; 0 = never seen)
    grow to the largest index seen so far, on the CPU, and are part of ``state_dict()`` with
    the generator's state, so a resumed run samples exactly as the uninterrupted one.

    Distributed (DDP): each replica samples from its own shard, with its own scores (the
    scores of the samples it has seen; a checkpoint written by one rank holds that rank's
    scores). Both passes run a full backward on every replica, whatever the subset sizes,
    so replicas with different shard or subset sizes do not deadlock; the second pass is
    synchronised and the replicas stay bit-identical. The first pass follows
    ``sync_ascent`` like SAM's.

    Where the paper (no public code) is silent or was not available in detail, samkit chose:
        * the probability rule above (weights proportional to ADLP, floored at
          ``max / max_ratio`` within the batch, never-seen samples at the batch maximum) and
          the default ``max_ratio=4``;
        * ADLP as the plain running mean of a sample's DLPs (every observation weighs the
          same), DLP as the absolute loss difference;
        * sampling inside each mini-batch (the data loader is untouched), without replacement,
          ``fraction=0.5`` by default (the paper varies the ratio to trade speed for accuracy);
        * the subset's losses only: samples left out of a step get no new DLP.

    References:
        J. Deng, J. Pang, B. Zhang. Asymptotic Unbiased Sample Sampling to Speed Up
        Sharpness-Aware Minimization. AAAI 2025. https://arxiv.org/abs/2406.08001
    """

    step_globals = ("fraction", "max_ratio")  # one subset of the batch per step

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        rho: float = 0.05,
        fraction: float = 0.5,
        max_ratio: float = 4.0,
        adaptive: bool = False,
        eta: float = ASAM_ETA,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        seed = check_seed(seed)
        defaults = dict(
            rho=rho, fraction=fraction, max_ratio=max_ratio, **asam_defaults(adaptive, eta)
        )
        super().__init__(params, base_optimizer, defaults, **kwargs)
        self.samkit_state["rng_state"] = initial_rng_state(seed)
        self.samkit_state["adlp"] = torch.zeros(0, dtype=torch.float64)
        self.samkit_state["adlp_count"] = torch.zeros(0, dtype=torch.int64)
        self._draws = OwnedGenerator("rng_state")

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        if not is_fraction(group.get("fraction")):
            raise invalid_value("fraction", group.get("fraction"), "a number in (0, 1]")
        ratio = group.get("max_ratio")
        if not (
            isinstance(ratio, (int, float))
            and not isinstance(ratio, bool)
            and 1.0 <= ratio < float("inf")
        ):
            raise invalid_value("max_ratio", ratio, "a finite number >= 1")

    @property
    def fraction(self) -> float:
        """The sampled fraction of each batch (one value for the whole step)."""
        return float(self.step_global("fraction"))

    @property
    def max_ratio(self) -> float:
        """The bound on the ratio of sampling weights (one value for the whole step)."""
        return float(self.step_global("max_ratio"))

    def scores(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The ADLP of dataset ``indices`` and whether each has one (CPU tensors)."""
        idx = indices.detach().to("cpu", torch.int64)
        adlp, count = self.samkit_state["adlp"], self.samkit_state["adlp_count"]
        if adlp.numel() == 0:
            return torch.zeros(idx.shape, dtype=torch.float64), torch.zeros(idx.shape, dtype=bool)
        inside = idx < adlp.numel()
        safe = torch.where(inside, idx, torch.zeros_like(idx))
        return torch.where(inside, adlp[safe], 0.0), inside & (count[safe] > 0)

    # ------------------------------------------------------------------ the step
    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        indices = _indices_of(closure)
        fraction, max_ratio = self.fraction, self.max_ratio
        n = int(indices.shape[0])
        subset: Tensor | None = None
        if fraction < 1.0:  # k = ⌈f·|B|⌉, at least 2 under BatchNorm in train mode
            k = max(selection_size(fraction, n), min(n, self.smallest_sub_batch(closure)))
            if k < n:
                scores, seen = self.scores(indices)
                weights = sampling_weights(scores, seen, max_ratio)
                gen = self._draws.take(self.samkit_state)  # S: k of B, without replacement
                drawn = torch.multinomial(weights, k, replacement=False, generator=gen)
                self.on_accept(lambda: self._draws.put(self.samkit_state))
                subset = torch.sort(drawn).values

        before = self.run_pass(closure, "clean", subset=subset, per_sample=True)  # ℓ_i(w), i ∈ S
        loss = closure.last_objective  # L_S(w): the objective on S (class weights, padding)
        self.perturb()  # ε = ρ·g/‖g‖ with g = ∇L_S(w)
        after = self.run_pass(closure, "perturbed", perturbed=True, subset=subset, per_sample=True)
        self.restore()
        chosen = indices if subset is None else indices[subset.to(indices.device)]
        dlp = (after - before).abs()  # DLP_i = |ℓ_i(w + ε) - ℓ_i(w)|, into ADLP_i once accepted
        self.on_accept(lambda: self._record(chosen, dlp))
        self.base_step()
        return loss

    @torch.no_grad()
    def _record(self, indices: Tensor, dlp: Tensor) -> None:
        """Fold this step's DLPs into the running means (duplicates in a batch included)."""
        idx = indices.detach().to("cpu", torch.int64)
        values = dlp.detach().to("cpu", torch.float64).reshape(-1)
        adlp, count = self.samkit_state["adlp"], self.samkit_state["adlp_count"]
        size = int(idx.max()) + 1
        if size > adlp.numel():  # grow to the largest index seen
            adlp = torch.cat([adlp, adlp.new_zeros(size - adlp.numel())])
            count = torch.cat([count, count.new_zeros(size - count.numel())])
        sums = adlp.new_zeros(size).index_add_(0, idx, values)
        adds = count.new_zeros(size).index_add_(0, idx, torch.ones_like(idx))
        touched = adds > 0
        total = count[:size] + adds
        new_mean = (adlp[:size] * count[:size] + sums) / total.clamp(min=1)
        adlp[:size] = torch.where(touched, new_mean, adlp[:size])
        count[:size] = total
        self.samkit_state["adlp"], self.samkit_state["adlp_count"] = adlp, count


def _indices_of(closure: Any) -> Tensor:
    if not isinstance(closure, BatchClosure):
        raise TypeError(
            "AUSAM keeps a score per training sample: build the closure with "
            "samkit.make_closure(model, loss_fn, inputs, targets, indices=idx), where idx "
            "holds the dataset indices of the batch and loss_fn returns per-sample losses"
        )
    indices = closure.indices
    if indices is None:
        raise ValueError(
            "AUSAM needs the dataset index of every sample in the batch: pass "
            "indices=idx (a LongTensor of shape [batch]) to samkit.make_closure"
        )
    if not isinstance(indices, Tensor) or indices.dtype.is_floating_point or indices.dim() != 1:
        raise TypeError(
            f"AUSAM needs integer dataset indices of shape [batch], got {indices!r}"
            if not isinstance(indices, Tensor)
            else f"AUSAM needs integer dataset indices of shape [batch], got dtype "
            f"{indices.dtype} and shape {tuple(indices.shape)}"
        )
    if indices.numel() and int(indices.min()) < 0:
        raise ValueError(f"Invalid dataset index: {int(indices.min())} (indices must be >= 0)")
    return indices
