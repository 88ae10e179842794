"""Sparse SAM, SSAM-F and SSAM-D (Mi et al., NeurIPS 2022)."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim._coordinates import Coordinates, coordinates, kept_count, live_fraction
from samkit.optim._distributed import Group, first_replica_flags, replicas_of
from samkit.optim._per_sample import (
    NonFiniteSamples,
    add_fisher_scores,
    per_sample_squared_gradients,
)
from samkit.optim._rng import check_seed, draw_seed
from samkit.optim._validation import is_count
from samkit.optim.base import SharpnessAwareOptimizer, invalid_value, is_finite_nonnegative
from samkit.optim.closure import BatchClosure

__all__ = ["SSAM", "per_sample_squared_gradients"]

MODES = ("fisher", "dynamic")
SCORES = ("gradient", "weight", "random")


class _Draw(enum.IntEnum):
    """What a seeded draw of SSAM-D is for: part of its key (:func:`draw_seed`)."""

    INITIAL = 0  # the initial mask (drawn with epoch _INITIAL_EPOCH)
    DROP = 1  # drop_score="random"
    GROW = 2  # grow_score="random"
    JOINED = 3  # the mask of a parameter that joins (unfrozen or added) between updates


_INITIAL_EPOCH = -1


class SSAM(SharpnessAwareOptimizer):
    r"""Sparse SAM: SAM's perturbation on a sparse, periodically refreshed set of coordinates.

    One step, with :math:`g = \nabla L_B(w)` the clean gradient and :math:`m \in \{0,1\}^d`
    the mask:

    .. math::

        \varepsilon = \rho\,\frac{g \odot m}{\lVert g\rVert + \epsilon}, \qquad
        g' = \nabla L_B(w + \varepsilon), \qquad w \leftarrow \mathrm{base\_step}(w, g').

    The norm is that of the *whole* gradient (as in the official code), so the masked
    coordinates move exactly as in SAM and the others stay. The mask keeps
    :math:`k = d - \mathrm{round}(d \cdot s)` coordinates (``sparsity`` :math:`s`), chosen
    globally over all parameters of a param group (over the whole model with one group).
    ``sparsity=0`` is SAM exactly.

    **SSAM-F** (``mode="fisher"``): the mask keeps the :math:`k` coordinates with the largest
    empirical Fisher information :math:`F_j = \sum_{n \le N} (\partial_j \ell_n)^2` over
    ``num_samples`` samples, refreshed at the first step of epochs :math:`e` with
    :math:`e \bmod \text{update\_freq} = 0`. The samples are the first of that step's batch
    (and of the next steps' batches when ``num_samples`` exceeds the batch size; the old mask
    stays in use until the new one is complete), their gradients from ``torch.func`` in eval
    mode. Before the first mask exists a step is plain SGD (never when ``num_samples`` is at
    most the batch size).

    **SSAM-D** (``mode="dynamic"``): starts from a random mask; every ``update_freq``
    epochs (at the first step of the epoch, epoch 0 included) it drops the
    :math:`\lfloor n_\text{live}\, r_e\rfloor` live coordinates with the lowest
    ``drop_score`` and regrows dead ones with the highest ``grow_score`` until :math:`k` are
    live (:math:`k` from the group's sparsity at that update: a changed sparsity takes
    effect there), with :math:`r_e = \text{drop\_rate}\cdot(1 + \cos(\pi e /
    \text{epochs}))/2`. Its draws are seeded by ``(seed, epoch, group)``: reproducible, no
    saved generator state.

    A parameter unfrozen between updates gets a mask at its first step: SSAM-D draws
    :math:`k` of its coordinates at random, SSAM-F perturbs none until its next refresh.

    **State, cost, processes** (``docs/methods/ssam.md``): the masks (``state[p]["mask"]``)
    and a Fisher sum in progress are saved. SSAM-D's masks change on accepted steps only;
    SSAM-F's scores are checked at once (one synchronisation, on Fisher steps only), added
    into the sum in place, and the mask they complete is committed at once, so a step that
    fails after its Fisher pass keeps them (:attr:`clean_pass_state`). The perturbed pass
    stays dense; the mask is the same on every DDP replica; SSAM-F refuses FSDP2.

    Args:
        params: parameters, named parameters or param groups; groups may set their own
            ``rho`` and ``sparsity``; the other options must be the same in every group.
        base_optimizer: a ``torch.optim.Optimizer`` class or a name (``"sgd"``, ...).
        rho: radius (default 0.1; the official argparse default is 0.05, the authors'
            CIFAR-100 command lines use 0.2).
        sparsity: fraction :math:`s` of coordinates *not* perturbed, in ``[0, 1]`` (default 0.5).
        mode: ``"fisher"`` (SSAM-F, default) or ``"dynamic"`` (SSAM-D).
        num_samples: samples of the Fisher information (SSAM-F; default 128).
        update_freq: refresh the mask every this many epochs (default 1).
        drop_rate: initial drop rate of SSAM-D (default 0.5).
        drop_score, grow_score: SSAM-D's scores to keep live and to regrow dead coordinates:
            ``"gradient"`` (|g|), ``"weight"`` (|w|) or ``"random"`` (defaults: ``"gradient"``
            and ``"random"``).
        epochs: length of the run in epochs, for SSAM-D's drop-rate schedule (required with
            ``mode="dynamic"``).
        seed: seed of SSAM-D's random draws (default ``None``: 0).
        **kwargs: samkit's options and the base optimizer's arguments.

    Example::

        opt = samkit.SSAM(model.parameters(), "sgd", rho=0.1, sparsity=0.5, lr=0.05, momentum=0.9)
        for epoch in range(epochs):
            opt.set_epoch(epoch)
            for x, y in loader:
                loss = opt.step(samkit.make_closure(model, loss_fn, x, y))

    Differences from the paper / official code:
        * The official SSAM-F scores with a separate batch-size-1 loader, in train mode, and
          refreshes *after* the first step of a refresh epoch (the run's first step has an
          all-zero mask); its first sample's gradient adds onto the perturbed gradient left in
          ``.grad`` before it is squared. samkit scores the first samples of the batches it is
          given, in eval mode, before the step's passes, each from its own gradient.
        * The official SSAM-D refreshes after the refresh step's perturbation and rounds its
          kept/regrown counts separately (the live count may drift by one); samkit
          refreshes before it and keeps exactly :math:`k` live coordinates.
        * Per-group sparsity (a top-k per param group); the official code has one global value.
        * The norm in :math:`\varepsilon` has ``perturb_eps`` 1e-12 (official: 1e-7).

    References:
        P. Mi, L. Shen, T. Ren, Y. Zhou, X. Sun, R. Ji, D. Tao. Make Sharpness-Aware
        Minimization Stronger: A Sparsified Perturbation Approach. NeurIPS 2022.
        https://arxiv.org/abs/2210.05177 ; official code:
        https://github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization
    """

    needs_epoch = True
    #: The mask schedule: one for the whole model.
    step_globals = (
        "mode", "num_samples", "update_freq", "drop_rate", "drop_score", "grow_score", "epochs"
    )  # fmt: skip
    own_passes = "its mask is refreshed inside step()"
    clean_pass_state = ("fisher", "mask", "ssam_fisher_count", "ssam_mask_epoch")  # SSAM-F

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        rho: float = 0.1,
        sparsity: float = 0.5,
        mode: str = "fisher",
        num_samples: int = 128,
        update_freq: int = 1,
        drop_rate: float = 0.5,
        drop_score: str = "gradient",
        grow_score: str = "random",
        epochs: int | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if seed is not None:
            check_seed(seed)  # the same rule as ESAM's and AUSAM's seeds; None is kept
        defaults = dict(rho=rho, sparsity=sparsity, mode=mode, num_samples=num_samples)
        defaults.update(update_freq=update_freq, drop_rate=drop_rate, drop_score=drop_score)
        defaults.update(grow_score=grow_score, epochs=epochs)
        super().__init__(params, base_optimizer, defaults, **kwargs)
        self.samkit_state.update(
            ssam_seed=0 if seed is None else seed,
            ssam_mask_epoch=None,  # epoch of the last completed refresh
            ssam_fisher_count=0,  # samples in the Fisher sum being accumulated
        )

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        s = group.get("sparsity")
        if not (is_finite_nonnegative(s) and s <= 1.0):
            raise ValueError(f"Invalid sparsity value: {s!r} (in [0, 1])")
        mode = group.get("mode")
        if mode not in MODES:
            raise invalid_value("mode", mode, "'fisher' or 'dynamic'")
        for key in ("num_samples", "update_freq"):
            if not is_count(group.get(key)):
                raise invalid_value(key, group.get(key), "an integer >= 1")
        r = group.get("drop_rate")
        if not (is_finite_nonnegative(r) and r <= 1.0):
            raise invalid_value("drop_rate", r, "a number in [0, 1]")
        for key in ("drop_score", "grow_score"):
            if group.get(key) not in SCORES:
                raise invalid_value(key, group.get(key), f"one of {', '.join(SCORES)}")
        epochs = group.get("epochs")
        if epochs is not None and not is_count(epochs):
            raise invalid_value("epochs", epochs, "an integer >= 1 or None")
        if mode == "dynamic" and epochs is None:
            raise ValueError(
                "Invalid epochs value: None: SSAM mode='dynamic' needs epochs= (the length of "
                "the run, for its drop-rate schedule)"
            )

    @property
    def fsdp_unsupported(self) -> str | None:  # type: ignore[override]
        """SSAM-F cannot run on sharded parameters (the reason); SSAM-D can (``None``)."""
        if self.step_global("mode") != "fisher":
            return None
        return (
            "SSAM mode='fisher' scores coordinates with per-sample gradients through torch.func "
            "(vmap over a functional_call), which needs whole parameters; use mode='dynamic'"
        )

    @property
    def masks(self) -> dict[Tensor, Tensor]:
        """The current mask of every parameter (``bool``, shaped like the parameter)."""
        return {p: st["mask"] for p, st in self.state.items() if "mask" in st}

    def density(self) -> float:
        """Fraction of the covered coordinates that are perturbed (``1 - sparsity``)."""
        return live_fraction(list(self.masks.values()))

    # ------------------------------------------------------------------ the step
    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        epoch = self.current_epoch()
        mode = self.step_global("mode")
        replicas = replicas_of(getattr(closure, "model", None))
        refresh = self.samkit_state["ssam_fisher_count"] > 0 or (  # a Fisher sum to complete
            epoch % int(self.step_global("update_freq")) == 0
            and self.samkit_state["ssam_mask_epoch"] != epoch
        )
        masks = self.masks or None
        initial_draw = False  # SSAM-D's initial masks are drawn in this step
        if mode == "fisher" and refresh:  # m = the top k of the Fisher scores
            new = self._fisher_refresh(closure, epoch, replicas)  # committed on accept
            masks = masks if new is None else new
        elif mode == "dynamic" and masks is None:  # m = k coordinates drawn at random
            masks, initial_draw = self._random_masks(replicas), True
        if masks is None:  # SSAM-F before its first mask: a plain (synchronised) SGD step
            loss = self.run_pass(closure, "clean", sync=True)
            self.base_step()
            return loss
        joined = self._masks_of_joined(masks, epoch, replicas)  # unfrozen since the last update
        if joined:
            masks = {**masks, **joined}
            self._commit_masks(joined, None)

        loss = self.run_pass(closure, "clean")  # g = ∇L_B(w)
        groups = self.collect()
        if mode == "dynamic" and refresh:  # drop the weakest live coordinates, regrow as many
            masks = self._drop_and_regrow(groups, masks, epoch, replicas)
            self._commit_masks(masks, epoch)
        elif initial_draw:
            self._commit_masks(masks, None)
        # ε = ρ·(g ⊙ m)/‖g‖: normalised by the whole gradient's norm; g ⊙ m written into g
        grads = [gp.grads for gp in groups]
        live = [
            [masks.get(p) for p in gp.params] if gp.group["sparsity"] else None for gp in groups
        ]
        self.perturb(grads, norm_of=grads, mask=live)
        del groups, grads  # released before the perturbed pass
        self.run_pass(closure, "perturbed", perturbed=True)  # g' = ∇L_B(w + ε)
        self.restore()
        self.base_step()  # w ← base_step(w, g')
        return loss

    def _commit_masks(
        self, new: dict[Tensor, Tensor], epoch: int | None, at_once: bool = False
    ) -> None:
        """Store the masks (and the update's epoch) on accept, or ``at_once`` (SSAM-F's)."""

        def commit() -> None:
            for p, m in new.items():
                self.state[p]["mask"] = m
            if epoch is not None:
                self.samkit_state["ssam_mask_epoch"] = epoch

        commit() if at_once else self.on_accept(commit)

    def _mask_params(self) -> list[list[Tensor]]:
        """Per group, the parameters a mask covers (those that require a gradient)."""
        return [[p for p in g["params"] if p.requires_grad] for g in self.param_groups]

    def _masks_of_joined(self, masks: dict[Tensor, Tensor], epoch: int, replicas: Group | None):
        """Masks for parameters without one (unfrozen or added since the last update): SSAM-D
        draws ``k`` of their coordinates at random, SSAM-F perturbs none until its next
        refresh; the next update takes them into the group's top-k."""
        new = {p for ps in self._mask_params() for p in ps if p not in masks}
        if not new or self.step_global("mode") == "fisher":
            return {p: torch.zeros_like(p, dtype=torch.bool) for p in new}
        return self._random_masks(replicas, epoch, _Draw.JOINED, new)

    # ------------------------------------------------------------------ SSAM-F
    def _fisher_refresh(
        self, closure: Any, epoch: int, replicas: Group | None
    ) -> dict[Tensor, Tensor] | None:
        """Score this batch's samples; the new masks once ``num_samples`` are scored."""
        if all(g["sparsity"] in (0.0, 1.0) for g in self.param_groups):  # no scores needed
            masks = self._top_k(lambda gi, c: [torch.zeros_like(p) for p in c.params])
            self._commit_masks(masks, epoch)
            return masks
        if not isinstance(closure, BatchClosure):
            raise TypeError(
                "SSAM (mode='fisher') scores coordinates with per-sample gradients and needs "
                "the batch: build the closure with samkit.make_closure(model, loss_fn, inputs, "
                "targets), or use mode='dynamic'"
            )
        needed = int(self.step_global("num_samples"))
        count = int(self.samkit_state["ssam_fisher_count"])
        covered = self._mask_params()
        params = [p for ps in covered for p in ps]
        model = self.model if self.model is not None else closure.model
        # F_j = Σ_n (∂_j ℓ_n)² over the first samples of this batch (and of every replica's)
        k = min(needed - count, closure.batch_size)
        try:  # F += Σ g_n², checked now (on Fisher steps only): finite samples count at once
            scored = add_fisher_scores(
                self.state, model, closure, params, k, replicas, self.on_nonfinite != "ignore"
            )
        except NonFiniteSamples as e:  # F holds the finite samples before the bad ones
            self.samkit_state["ssam_fisher_count"] = count + e.samples
            self._record_finite("fisher", float("nan"), False)
            self.verify_finite()  # raises, or skips the step
            raise
        self.samkit_state["ssam_fisher_count"] = count + scored  # finite samples count at once
        if count + scored < needed:
            return None
        fisher = {p: self.state[p].pop("fisher") for p in params}  # released once selected
        masks = self._top_k(lambda gi, c: [fisher[p] for p in c.params], replicas)  # no copy
        self.samkit_state["ssam_fisher_count"] = 0
        self._commit_masks(masks, epoch, at_once=True)  # the scores were finite
        return masks

    def _top_k(
        self,
        scores: Callable[[int, Coordinates], Tensor | list[Tensor]],
        replicas: Group | None = None,
        among: set[Tensor] | None = None,
    ) -> dict[Tensor, Tensor]:
        """Per group, the masks keeping the ``k = d - round(d·s)`` coordinates with the highest
        ``scores(group index, coordinates)`` (of the parameters ``among``, default all);
        under DDP the first replica's."""
        masks: dict[Tensor, Tensor] = {}
        for gi, (group, params) in enumerate(zip(self.param_groups, self._mask_params())):
            params = params if among is None else [p for p in params if p in among]
            if params:
                coords = coordinates(params)
                keep = kept_count(coords.numel, group["sparsity"])
                masks.update(zip(params, coords.masks(coords.top(scores(gi, coords), keep))))
        return first_replica_flags(masks, replicas)

    # ------------------------------------------------------------------ SSAM-D
    def _random_masks(
        self, replicas: Group | None, epoch=_INITIAL_EPOCH, draw=_Draw.INITIAL, among=None
    ) -> dict[Tensor, Tensor]:
        """``k`` coordinates drawn uniformly per group (of the parameters ``among``)."""
        return self._top_k(lambda gi, c: c.random(self._seed(epoch, gi, draw)), replicas, among)

    @torch.no_grad()
    def _drop_and_regrow(
        self, groups: list[Any], masks: dict[Tensor, Tensor], epoch: int, replicas: Group | None
    ) -> dict[Tensor, Tensor]:
        """Drop the ⌊n_live·r_e⌋ live coordinates with the lowest ``drop_score``, regrow as many
        dead ones with the highest ``grow_score``; the live count becomes the group's ``k``
        (a changed sparsity: fewer kept or more regrown)."""
        grads = {p: g for gp in groups for p, g in zip(gp.params, gp.grads)}
        needs_grad = "gradient" in (self.step_global("drop_score"), self.step_global("grow_score"))
        if needs_grad:  # score with the replicas' mean gradient
            grads = dict(zip(grads, self.replicas_mean(list(grads.values()))))
        total = int(self.step_global("epochs"))  # r_e = drop_rate·(1 + cos(π e/E))/2
        rate = float(self.step_global("drop_rate"))
        rate *= (1.0 + math.cos(math.pi * min(epoch, total) / total)) / 2.0
        new: dict[Tensor, Tensor] = {}
        for gi, (group, params) in enumerate(zip(self.param_groups, self._mask_params())):
            if not params:
                continue
            coords = coordinates(params)
            live = coords.flat([masks[p] for p in params])
            n_live = coords.count(live)
            k = kept_count(coords.numel, group["sparsity"])  # the sparsity now (it may change)
            # keep n_live - ⌊n_live·r_e⌋ live ones, at most k; regrow dead ones up to k in all
            n_grow = min(k - min(n_live - int(n_live * rate), k), coords.numel - n_live)
            n_keep = k - n_grow
            if n_keep == n_live and n_grow == 0:
                new.update((p, masks[p]) for p in params)
                continue
            keep_score = self._score("drop_score", coords, grads, self._seed(epoch, gi, _Draw.DROP))
            grow_score = self._score("grow_score", coords, grads, self._seed(epoch, gi, _Draw.GROW))
            lowest = torch.tensor(-math.inf, device=live.device)
            kept = coords.top(torch.where(live, keep_score, lowest), n_keep)
            grown = coords.top(torch.where(live, lowest, grow_score), n_grow)
            new.update(zip(params, coords.masks(kept | grown)))
        return first_replica_flags(new, replicas)

    def _score(
        self, key: str, coords: Coordinates, grads: dict[Tensor, Tensor], seed: int
    ) -> Tensor:
        """The ``drop_score`` or ``grow_score`` (``key``) of every coordinate of a group."""
        kind = self.step_global(key)
        if kind == "random":  # drawn from ``seed``
            return coords.random(seed)
        if kind == "weight":  # |w|
            parts = [p.detach() for p in coords.params]
        else:  # |g|, 0 for a parameter without a gradient
            parts = [grads[p] if p in grads else torch.zeros_like(p) for p in coords.params]
        return coords.flat(parts).abs().float()

    def _seed(self, epoch: int, group: int, draw: _Draw) -> int:
        return draw_seed(int(self.samkit_state["ssam_seed"]), epoch, group, draw)
