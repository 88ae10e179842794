"""Sparse SAM, SSAM-F and SSAM-D (Mi et al., NeurIPS 2022)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from samkit.optim import _tensors as T
from samkit.optim._distributed import Group, replicas_of, through_flat
from samkit.optim._rng import check_seed
from samkit.optim._validation import is_count
from samkit.optim.base import SharpnessAwareOptimizer, invalid_value, is_finite_nonnegative
from samkit.optim.closure import BatchClosure

__all__ = ["SSAM", "per_sample_squared_gradients"]

MODES = ("fisher", "dynamic")
SCORES = ("gradient", "weight", "random")

#: Per-sample gradients are computed in chunks whose gradients hold at most this many values.
_CHUNK_VALUES = 1 << 25


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
    ``num_samples`` samples :math:`N`. It is refreshed every ``update_freq`` epochs, at the
    first step of epochs :math:`e` with :math:`e \bmod \text{update\_freq} = 0`. The samples
    are the first samples of that step's batch (and of the following steps' batches when
    ``num_samples`` exceeds the batch size; the old mask stays in use until the new one is
    complete). Per-sample gradients come from ``torch.func`` (``functional_call`` +
    ``vmap(grad(...))``), in chunks, with the model in eval mode (no dropout, BatchNorm
    running statistics; nothing in the model changes). Until the first mask exists the step is
    plain SGD with the clean gradient (one pass): with ``num_samples`` at most the batch size
    this never happens, since the first step computes its mask before its passes.

    **SSAM-D** (``mode="dynamic"``): starts from a random mask; every ``update_freq``
    epochs (at the first step of the epoch, epoch 0 included) it drops the
    :math:`\lfloor n_\text{live}\, r_e\rfloor` live coordinates with the lowest
    ``drop_score`` (default :math:`|g|`) and regrows as many coordinates that were dead,
    those with the highest ``grow_score`` (default random), so the number of live
    coordinates stays :math:`k`. The drop rate follows
    :math:`r_e = \text{drop\_rate}\cdot(1 + \cos(\pi e / \text{epochs}))/2`. Random draws
    come from a generator seeded by ``(seed, epoch, group)``, so they are reproducible and
    need no saved generator state.

    **State.** The mask is a ``bool`` tensor per parameter (``state[p]["mask"]``, one byte
    per coordinate, part of :meth:`state_dict` and restored as ``bool``), so a resumed run
    continues with the same mask; a Fisher sum being accumulated over several steps is saved
    too (``state[p]["fisher"]``). Masks and sums change only when a step is accepted.

    **Cost.** SAM's two passes plus, per refresh, ``num_samples`` per-sample gradients (SSAM-F;
    counted in the closure's ``grad_evals``/``forward_evals`` as ``num_samples`` samples of
    forward and backward) or a top-k over the coordinates (SSAM-D). Nothing is saved per step
    by the sparsity: the perturbed pass is a dense pass (the paper's speed-up needs sparse
    kernels).

    **FSDP2.** SSAM-D runs on sharded (``DTensor``) parameters (FSDP2's layouts: ``Shard(0)``
    on one mesh dimension, ``Replicate`` on any others) and takes the same masks as on one
    process, without gathering: masks are ``bool`` DTensors laid out as their parameters,
    each process scores its own shards (its slice of the same seeded random draws, streamed),
    and the global top-k is a radix selection over the shards (four all-reduces of a
    256-bin histogram and one all-gather of one count per selection, at refresh steps only;
    ties at the k-th score are taken by process rank, then in order). SSAM-F refuses sharded
    parameters with a ``TypeError`` (:attr:`fsdp_unsupported`): its per-sample gradients
    through ``torch.func`` need whole parameters and cannot run through FSDP2's hooks.

    **DDP.** The clean (ascent) pass is local by default, as in SAM. The mask is identical on
    every replica: SSAM-F sums the Fisher scores and sample counts over the replicas (each
    replica scores its own samples), SSAM-D scores with the replicas' mean gradient, random
    draws are seeded identically, and in both modes the finished mask is broadcast from the
    first replica, so it is the same bit for bit.

    Args:
        params: parameters, named parameters or param groups; groups may set their own
            ``rho`` and ``sparsity``; the other options must be the same in every group.
        base_optimizer: a ``torch.optim.Optimizer`` class or a name (``"sgd"``, ...).
        rho: radius (default 0.1; the official argparse default is 0.05, the authors'
            CIFAR-100 command lines use 0.2).
        sparsity: fraction :math:`s` of coordinates *not* perturbed, in ``[0, 1]``
            (default 0.5).
        mode: ``"fisher"`` (SSAM-F, default) or ``"dynamic"`` (SSAM-D).
        num_samples: samples of the Fisher information (SSAM-F; default 128).
        update_freq: refresh the mask every this many epochs (default 1).
        drop_rate: initial drop rate of SSAM-D (default 0.5).
        drop_score: SSAM-D's score to keep live coordinates: ``"gradient"`` (|g|, default),
            ``"weight"`` (|w|) or ``"random"``.
        grow_score: SSAM-D's score to regrow dead coordinates: ``"random"`` (default),
            ``"gradient"`` or ``"weight"``.
        epochs: length of the run in epochs, for SSAM-D's drop-rate schedule (required with
            ``mode="dynamic"``).
        seed: seed of SSAM-D's random draws (default ``None``: 0).
        **kwargs: samkit's options of :class:`~samkit.SharpnessAwareOptimizer` and the base
            optimizer's arguments.

    Example::

        opt = samkit.SSAM(model.parameters(), "sgd", rho=0.1, sparsity=0.5, lr=0.05,
                          momentum=0.9)
        for epoch in range(epochs):
            opt.set_epoch(epoch)
            for x, y in loader:
                loss = opt.step(samkit.make_closure(model, loss_fn, x, y))

    Differences from the paper / official code:
        * The official SSAM-F computes the Fisher with a separate batch-size-1 loader over
          the training set, with the model in train mode, and refreshes the mask *after* the
          first step of a refresh epoch, so the run's first step has an all-zero mask (an
          SGD step, with two passes). samkit scores the first samples of the batches it is
          given, in eval mode, before the step's passes: the first step already uses its
          mask. When a mask needs more samples than a batch holds, the steps before the
          first mask are SGD steps with one pass.
        * The official SSAM-D refreshes after the perturbation of the refresh step (the new
          mask takes effect at the next step); samkit refreshes before the perturbation. Its
          kept/regrown counts round separately (the live count may drift by one); samkit
          keeps exactly :math:`k` live coordinates.
        * Per-group sparsity (top-k within each param group); the official code has one
          global value.
        * The norm in :math:`\varepsilon` has ``perturb_eps`` 1e-12 (official: 1e-7).

    References:
        P. Mi, L. Shen, T. Ren, Y. Zhou, X. Sun, R. Ji, D. Tao. Make Sharpness-Aware
        Minimization Stronger: A Sparsified Perturbation Approach. NeurIPS 2022.
        https://arxiv.org/abs/2210.05177 ; official code:
        https://github.com/Mi-Peng/Sparse-Sharpness-Aware-Minimization
    """

    method_name = "ssam"
    needs_epoch = True
    #: The mask schedule: one for the whole model.
    step_globals = (
        "mode",
        "num_samples",
        "update_freq",
        "drop_rate",
        "drop_score",
        "grow_score",
        "epochs",
    )
    own_passes = "its mask is refreshed inside step()"

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
        defaults = dict(
            rho=rho,
            sparsity=sparsity,
            mode=mode,
            num_samples=num_samples,
            update_freq=update_freq,
            drop_rate=drop_rate,
            drop_score=drop_score,
            grow_score=grow_score,
            epochs=epochs,
        )
        super().__init__(params, base_optimizer, defaults, **kwargs)
        self.samkit_state.update(
            ssam_seed=0 if seed is None else seed,
            ssam_mask_epoch=None,  # epoch of the last completed refresh
            ssam_fisher_count=0,  # samples in the Fisher sum being accumulated
        )

    # ------------------------------------------------------------------ hyperparameters
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
            "SSAM mode='fisher' scores coordinates with per-sample gradients through "
            "torch.func (vmap over a functional_call), which needs whole parameters and cannot "
            "run through FSDP2's gather and reduce-scatter hooks; use mode='dynamic'"
        )

    # ------------------------------------------------------------------ masks
    def _mask_params(self) -> list[list[Tensor]]:
        """Per group, the parameters a mask covers (those that require a gradient)."""
        return [[p for p in g["params"] if p.requires_grad] for g in self.param_groups]

    def _current_masks(self) -> dict[Tensor, Tensor] | None:
        masks = {p: st["mask"] for p, st in self.state.items() if "mask" in st}
        return masks or None

    def _refresh_due(self, epoch: int) -> bool:
        if self.samkit_state.get("ssam_fisher_count", 0) > 0:
            return True  # a Fisher sum is being completed
        return (
            epoch % int(self.step_global("update_freq")) == 0
            and self.samkit_state.get("ssam_mask_epoch") != epoch
        )

    @property
    def masks(self) -> dict[Tensor, Tensor]:
        """The current mask of every parameter (``bool``, shaped like the parameter)."""
        return self._current_masks() or {}

    def density(self) -> float:
        """Fraction of the covered coordinates that are perturbed (``1 - sparsity``)."""
        masks = self.masks
        total = sum(m.numel() for m in masks.values())
        if not total:
            return float("nan")
        if T.is_sharded(list(masks.values())):  # sum the shards' counts: one all-reduce
            ms = [m.double() for m in masks.values()]
            return float(T.dot(ms, ms)) / total
        return sum(int(m.sum()) for m in masks.values()) / total

    # ------------------------------------------------------------------ the step
    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        epoch = self.current_epoch()
        mode = self.step_global("mode")
        replicas = replicas_of(getattr(closure, "model", None))
        refresh = self._refresh_due(epoch)
        masks = self._current_masks()
        fresh = False  # SSAM-D's initial masks, drawn in this step

        if mode == "fisher" and refresh:
            new = self._fisher_refresh(closure, epoch, replicas)  # committed on accept
            if new is not None:
                masks = new
        elif mode == "dynamic" and masks is None:
            masks, fresh = self._random_masks(replicas), True
        if masks is None:  # SSAM-F before its first mask: a plain (synchronised) SGD step
            loss = self.run_pass(closure, "clean", sync=True)
            self.base_step()
            return loss

        loss = self.run_pass(closure, "clean")
        groups = self.collect()
        if mode == "dynamic" and refresh:
            masks = self._drop_and_regrow(groups, masks, epoch, replicas)
            self._commit_masks(masks, epoch)
        elif fresh:
            self._commit_masks(masks, None)

        directions: list[list[Tensor]] = []
        for gp in groups:
            if gp.group["sparsity"] == 0.0:  # all coordinates live: g ⊙ 1 = g
                directions.append(gp.grads)
                continue
            m = [masks.get(p) for p in gp.params]
            directions.append(_masked(gp.grads, m, self.foreach))
        self.perturb(directions, norm_of=[gp.grads for gp in groups])
        self.run_pass(closure, "perturbed", perturbed=True)
        self.restore()
        self.base_step()
        return loss

    def _commit_masks(self, new: dict[Tensor, Tensor], epoch: int | None) -> None:
        def commit() -> None:
            for p, m in new.items():
                self.state[p]["mask"] = m
            if epoch is not None:
                self.samkit_state["ssam_mask_epoch"] = epoch

        self.on_accept(commit)

    def _fisher_refresh(
        self, closure: Any, epoch: int, replicas: Group | None
    ) -> dict[Tensor, Tensor] | None:
        """Score this batch's samples; the new masks once ``num_samples`` are scored."""
        covered = self._mask_params()
        if all(g["sparsity"] in (0.0, 1.0) for g in self.param_groups):
            masks = self._top_k(covered, [[torch.zeros_like(p) for p in ps] for ps in covered])
            self._commit_masks(masks, epoch)
            return masks
        if not isinstance(closure, BatchClosure):
            raise TypeError(
                "SSAM (mode='fisher') scores coordinates with per-sample gradients and needs "
                "the batch: build the closure with samkit.make_closure(model, loss_fn, inputs, "
                "targets), or use mode='dynamic'"
            )
        needed = int(self.step_global("num_samples"))
        count = int(self.samkit_state.get("ssam_fisher_count", 0))
        k = min(needed - count, closure.batch_size)
        flat_params = [p for ps in covered for p in ps]
        model = self.model if self.model is not None else closure.model
        module = model.module if hasattr(model, "no_sync") else model
        scores = per_sample_squared_gradients(
            module, closure.loss_fn, closure.inputs, closure.targets, flat_params, k
        )
        closure.forward_evals += k / closure.batch_size
        closure.grad_evals += k / closure.batch_size
        scored = k
        if replicas is not None:  # sum the replicas' scores and sample counts
            *scores, count = through_flat(
                scores + [scores[0].new_tensor([k])], replicas.all_reduce_
            )
            scored = int(count)
        if self.on_nonfinite != "ignore":
            total = torch.stack([s.sum() for s in scores]).sum()
            self._record_finite("fisher", total, False)
        sums = [
            s if "fisher" not in self.state[p] else self.state[p]["fisher"] + s
            for p, s in zip(flat_params, scores)
        ]
        if count + scored < needed:

            def keep_accumulating() -> None:
                for p, s in zip(flat_params, sums):
                    self.state[p]["fisher"] = s
                self.samkit_state["ssam_fisher_count"] = count + scored

            self.on_accept(keep_accumulating)
            return None
        per_group, i = [], 0
        for ps in covered:
            per_group.append(sums[i : i + len(ps)])
            i += len(ps)
        masks = self._top_k(covered, per_group)
        if replicas is not None:
            _broadcast_masks(masks, replicas)

        def finish() -> None:
            for p in flat_params:
                self.state[p].pop("fisher", None)
            self.samkit_state["ssam_fisher_count"] = 0

        self.on_accept(finish)
        self._commit_masks(masks, epoch)
        return masks

    def _top_k(
        self, covered: list[list[Tensor]], scores: list[list[Tensor]]
    ) -> dict[Tensor, Tensor]:
        """Per group, the masks keeping the ``d - round(d·s)`` highest-scoring coordinates."""
        masks: dict[Tensor, Tensor] = {}
        for group, params, sc in zip(self.param_groups, covered, scores):
            if not params:
                continue
            flat = torch.cat([s.reshape(-1).float() for s in sc])
            keep = _kept(flat.numel(), group["sparsity"])
            chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            if keep == flat.numel():
                chosen.fill_(True)
            elif keep > 0:
                chosen[torch.topk(flat, keep, sorted=False).indices] = True
            masks.update(zip(params, _split(chosen, params)))
        return masks

    def _generator_seed(self, epoch: int, group: int, purpose: int) -> int:
        seed = int(self.samkit_state.get("ssam_seed", 0))
        return (seed * 1_000_003 + (epoch + 1) * 10_007 + group * 101 + purpose) % (1 << 63)

    def _random_scores(self, params: list[Tensor], epoch: int, group: int, purpose: int):
        gen = torch.Generator().manual_seed(self._generator_seed(epoch, group, purpose))
        n = sum(p.numel() for p in params)
        return torch.rand(n, generator=gen).to(params[0].device)

    def _random_local(self, layout: _ShardLayout, epoch: int, group: int, purpose: int):
        """This process's entries of :meth:`_random_scores` (the same draws, streamed)."""
        gen = torch.Generator().manual_seed(self._generator_seed(epoch, group, purpose))
        out = torch.empty(layout.local_numel)
        drawn = filled = 0
        for begin, length in layout.ranges:
            while drawn < begin:  # draws of other processes' shards: discarded
                n = min(begin - drawn, _CHUNK_VALUES)
                torch.rand(n, generator=gen)
                drawn += n
            if length:
                out[filled : filled + length] = torch.rand(length, generator=gen)
                drawn, filled = drawn + length, filled + length
        return out.to(layout.device)

    def _random_masks(self, replicas: Group | None) -> dict[Tensor, Tensor]:
        """SSAM-D's initial masks: ``k`` coordinates drawn uniformly per group."""
        covered = self._mask_params()
        if T.is_sharded([p for ps in covered for p in ps]):
            masks: dict[Tensor, Tensor] = {}
            for gi, (group, ps) in enumerate(zip(self.param_groups, covered)):
                if not ps:
                    continue
                layout = _ShardLayout(ps)
                scores = self._random_local(layout, -1, gi, 0)
                keep = _kept(layout.numel, group["sparsity"])
                masks.update(zip(ps, layout.masks(_select_top(scores, keep, layout.group))))
            return masks
        scores = [
            [self._random_scores(ps, -1, gi, 0)] if ps else [] for gi, ps in enumerate(covered)
        ]
        masks = self._top_k(covered, scores)
        if replicas is not None:
            _broadcast_masks(masks, replicas)
        return masks

    @torch.no_grad()
    def _drop_and_regrow(
        self,
        groups: list[Any],
        masks: dict[Tensor, Tensor],
        epoch: int,
        replicas: Group | None,
    ) -> dict[Tensor, Tensor]:
        grads = {p: g for gp in groups for p, g in zip(gp.params, gp.grads)}
        needs_grad = "gradient" in (self.step_global("drop_score"), self.step_global("grow_score"))
        if needs_grad and self.local_gradients:  # score with the replicas' mean gradient
            mean = [g.clone() for g in grads.values()]
            self.all_reduce_mean_(mean)
            grads = dict(zip(grads, mean))
        rate = float(self.step_global("drop_rate"))
        total = int(self.step_global("epochs"))
        rate *= (1.0 + math.cos(math.pi * min(epoch, total) / total)) / 2.0
        new: dict[Tensor, Tensor] = {}
        if T.is_sharded([p for ps in self._mask_params() for p in ps]):
            for gi, params in enumerate(self._mask_params()):
                if params:
                    new.update(self._drop_and_regrow_shards(params, grads, masks, rate, epoch, gi))
            return new
        for gi, params in enumerate(self._mask_params()):
            if not params:
                continue
            live = torch.cat([masks[p].reshape(-1) for p in params])
            n_live = int(live.sum())
            n_drop = min(int(n_live * rate), live.numel() - n_live)
            if n_drop == 0:
                new.update((p, masks[p]) for p in params)
                continue
            keep_score = self._scores("drop_score", params, grads, epoch, gi, 1)
            grow_score = self._scores("grow_score", params, grads, epoch, gi, 2)
            lowest = torch.tensor(-math.inf, device=live.device)
            kept = torch.topk(torch.where(live, keep_score, lowest), n_live - n_drop).indices
            grown = torch.topk(torch.where(live, lowest, grow_score), n_drop).indices
            chosen = torch.zeros_like(live)
            chosen[kept] = True
            chosen[grown] = True
            new.update(zip(params, _split(chosen, params)))
        if replicas is not None:
            _broadcast_masks(new, replicas)
        return new

    def _drop_and_regrow_shards(self, params, grads, masks, rate, epoch, gi):
        """:meth:`_drop_and_regrow` of one group on shards: the same selection, no gather."""
        import torch.distributed as dist

        layout = _ShardLayout(params)
        live = torch.cat([m.reshape(-1) for m in T._local([masks[p] for p in params])])
        n_live = live.sum().to(torch.int64).reshape(1)
        if layout.group is not None:
            dist.all_reduce(n_live, group=layout.group)
        n_live = int(n_live)
        n_drop = min(int(n_live * rate), layout.numel - n_live)
        if n_drop == 0:
            return {p: masks[p] for p in params}

        def scores(key: str, purpose: int) -> Tensor:
            kind = self.step_global(key)
            if kind == "random":
                return self._random_local(layout, epoch, gi, purpose)
            if kind == "weight":
                parts = T._local([p.detach() for p in params])
            else:
                zeros = [torch.zeros_like(p) for p in params]
                parts = T._local([grads.get(p, z) for p, z in zip(params, zeros)])
            return torch.cat([t.abs().reshape(-1).float() for t in parts])

        lowest = torch.tensor(-math.inf, device=live.device)
        keep_score, grow_score = scores("drop_score", 1), scores("grow_score", 2)
        kept = _select_top(torch.where(live, keep_score, lowest), n_live - n_drop, layout.group)
        grown = _select_top(torch.where(live, lowest, grow_score), n_drop, layout.group)
        return dict(zip(params, layout.masks(kept | grown)))

    def _scores(self, key, params, grads, epoch, group, purpose) -> Tensor:
        kind = self.step_global(key)
        if kind == "random":
            return self._random_scores(params, epoch, group, purpose)
        if kind == "weight":
            parts = [p.detach().abs().reshape(-1).float() for p in params]
        else:
            parts = [
                grads[p].abs().reshape(-1).float()
                if p in grads
                else torch.zeros(p.numel(), device=p.device)
                for p in params
            ]
        return torch.cat(parts)

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts every saved tensor to its parameter's dtype: masks come back as bool.
        for st in self.state.values():
            if "mask" in st:
                st["mask"] = st["mask"].to(torch.bool)


def _kept(n: int, sparsity: float) -> int:
    return n - min(n, int(round(n * sparsity)))


def _split(flat: Tensor, params: list[Tensor]) -> list[Tensor]:
    out, i = [], 0
    for p in params:
        out.append(flat[i : i + p.numel()].view(p.shape).to(p.device))
        i += p.numel()
    return out


def _broadcast_masks(masks: dict[Tensor, Tensor], replicas: Group) -> None:
    """Make ``masks`` the first replica's, bit for bit (in place)."""
    if not masks:
        return
    params = list(masks)
    flags = through_flat([masks[p] for p in params], replicas.broadcast_, torch.uint8)
    for p, m in zip(params, flags):
        masks[p] = m.to(torch.bool)


def _masked(grads: list[Tensor], masks: list[Tensor | None], foreach: bool) -> list[Tensor]:
    """``g ⊙ m`` per tensor (``m`` None: the whole tensor)."""
    pairs = [(i, g, m) for i, (g, m) in enumerate(zip(grads, masks)) if m is not None]
    out = list(grads)
    if not pairs:
        return out
    if T.is_sharded([g for _, g, _ in pairs]):  # shard by shard (masks share the layout)
        gs = [g for _, g, _ in pairs]
        local = _masked(T._local(gs), T._local([m for _, _, m in pairs]), foreach)
        for (i, _, _), r in zip(pairs, T._like_layout(local, gs)):
            out[i] = r
        return out
    if foreach:
        idx = [i for i, _, _ in pairs]
        gs = [g for _, g, _ in pairs]
        ms = [m for _, _, m in pairs]
        plan = T.Buckets(gs)
        for index, g_bucket, m_bucket in zip(plan.index, plan.split(gs), plan.split(ms)):
            for k, r in zip(index, torch._foreach_mul(g_bucket, m_bucket)):
                out[idx[k]] = r
    else:
        for i, g, m in pairs:
            out[i] = g * m
    return out


def per_sample_squared_gradients(
    module: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    inputs: Any,
    targets: Tensor,
    params: list[Tensor],
    k: int,
) -> list[Tensor]:
    r""":math:`\sum_{n<k} (\nabla_p \ell(x_n, y_n))^2` for each of ``params``.

    ``ℓ(x_n, y_n) = loss_fn(module(x_n[None]), y_n[None]).sum()`` on the first ``k`` samples,
    computed with ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``) in chunks,
    with ``module`` in eval mode (restored afterwards). Parameters that are not ``module``'s
    get zeros. Returns float tensors shaped like ``params`` (float64 stays float64).
    """
    from torch.func import functional_call, grad, vmap

    names = {p: n for n, p in module.named_parameters()}
    wanted = {names[p]: p.detach() for p in params if p in names}
    acc = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
    if not wanted or k <= 0:
        return acc

    def sample_loss(weights: dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        x1 = tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, x)
        out = functional_call(module, weights, (x1,), strict=False)
        return loss_fn(out, y.unsqueeze(0)).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    size = sum(p.numel() for p in wanted.values())
    chunk = max(1, min(k, _CHUNK_VALUES // max(size, 1)))
    position = {names[p]: i for i, p in enumerate(params) if p in names}
    modes = [m.training for m in module.modules()]
    module.eval()
    try:
        for lo in range(0, k, chunk):
            hi = min(k, lo + chunk)
            xs = tree_map(lambda t, a=lo, b=hi: t[a:b] if isinstance(t, Tensor) else t, inputs)
            gs = per_sample(wanted, xs, targets[lo:hi])
            for name, g in gs.items():
                a = acc[position[name]]
                a.add_(g.to(a.dtype).square().sum(0))
    except (RuntimeError, TypeError, NotImplementedError) as e:
        raise RuntimeError(
            "SSAM (mode='fisher') computes per-sample gradients with torch.func "
            "(functional_call + vmap(grad)), which this model or loss_fn does not support: "
            f"{e}. Use mode='dynamic' instead."
        ) from e
    finally:
        for m, training in zip(module.modules(), modes):
            m.training = training
    return acc


class _ShardLayout:
    """Where each parameter's local shard lies in its param group's flat vector (FSDP2).

    The flat vector is the concatenation of the whole parameters, flattened, in group order,
    as SSAM's single-process selection sees it. Supported layouts are FSDP2's: every
    parameter a ``DTensor`` on one mesh with one placement list, ``Shard(0)`` on at most one
    mesh dimension and ``Replicate`` on the others (HSDP), so each local shard is one
    contiguous range of its parameter's flattened elements.
    """

    def __init__(self, params: list[Tensor]) -> None:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        layouts = {
            (p.device_mesh, tuple(p.placements)) if isinstance(p, DTensor) else None for p in params
        }
        mesh_placements = layouts.pop() if len(layouts) == 1 else None
        sharded = (
            []
            if mesh_placements is None
            else [d for d, pl in enumerate(mesh_placements[1]) if not pl.is_replicate()]
        )
        if (
            mesh_placements is None
            or len(sharded) > 1
            or any(mesh_placements[1][d] != _shard0() for d in sharded)
        ):
            raise TypeError(
                "SSAM mode='dynamic' on sharded parameters needs every parameter of a param "
                "group to be a DTensor with the same mesh and placements, Shard(0) on at most "
                "one mesh dimension and Replicate on the others (FSDP2's layouts); got "
                f"{sorted(map(str, layouts | {mesh_placements}))}"
            )
        mesh, placements = mesh_placements
        self.group = mesh.get_group(sharded[0]) if sharded else None
        self.params = params
        self.ranges: list[tuple[int, int]] = []
        self.local_shapes: list[tuple[int, ...]] = []
        offset = 0
        for p in params:
            shape, origin = compute_local_shape_and_global_offset(p.shape, mesh, placements)
            row = math.prod(p.shape[1:])
            length = math.prod(shape)
            self.ranges.append((offset + origin[0] * row if length else offset, length))
            self.local_shapes.append(tuple(shape))
            offset += p.numel()
        self.numel = offset
        self.local_numel = sum(n for _, n in self.ranges)
        self.device = params[0].device

    def masks(self, chosen: Tensor) -> list[Tensor]:
        """The local flat selection as ``bool`` DTensors laid out as the parameters."""
        out, i = [], 0
        for shape, (_, n) in zip(self.local_shapes, self.ranges):
            out.append(chosen[i : i + n].view(shape).clone())
            i += n
        return T._like_layout(out, self.params)


def _shard0() -> Any:
    from torch.distributed.tensor import Shard

    return Shard(0)


def _select_top(scores: Tensor, k: int, group: Any) -> Tensor:
    """Which local entries are among the ``k`` largest of every process's ``scores``.

    ``scores`` (float32) are this process's part of a vector split over the processes of
    ``group`` (``None``: not split). A radix selection on the scores' order-preserving
    32-bit keys, one byte at a time: four all-reduces of a 256-bin histogram find the
    ``k``-th largest key; nothing is gathered. Entries tied with it are taken by process
    rank, then in local order (one all-gather of one count). Without ties at the ``k``-th
    value the selection equals ``torch.topk``'s.
    """
    import torch.distributed as dist

    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k <= 0:
        return chosen
    bits = scores.float().view(torch.int32).to(torch.int64)
    key = torch.where(bits >= 0, bits + (1 << 31), -1 - bits)  # float order, in [0, 2^32)
    candidates = torch.ones_like(chosen)
    remaining = k
    for shift in (24, 16, 8, 0):
        byte = (key >> shift) & 255
        hist = torch.bincount(byte[candidates], minlength=256).to(torch.int64)
        if group is not None:
            dist.all_reduce(hist, group=group)
        counts = hist.tolist()
        above = 0
        for b in range(255, -1, -1):
            if above + counts[b] >= remaining:
                break
            above += counts[b]
        chosen |= candidates & (byte > b)
        candidates &= byte == b
        remaining -= above
    ties = candidates.nonzero().reshape(-1)
    before = 0
    if group is not None:
        count = torch.tensor([ties.numel()], dtype=torch.int64, device=scores.device)
        counts_all = [torch.empty_like(count) for _ in range(dist.get_world_size(group))]
        dist.all_gather(counts_all, count, group=group)
        rank = dist.get_rank(group)
        before = sum(int(c) for c in counts_all[:rank])
    take = max(0, min(ties.numel(), remaining - before))
    chosen[ties[:take]] = True
    return chosen
