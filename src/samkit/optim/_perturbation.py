"""The weights moved to ``w + ε`` and back, at the memory floor.

``SharpnessAwareOptimizer.perturb`` chooses the direction ``d`` and the radius; this module
moves the weights and puts them back:

* :class:`Perturbation`: the step's tensors flattened over param groups (direction, radius,
  ASAM's ``T``), and :meth:`Perturbation.apply`, which adds ``ε = r·d/(‖d‖ + eps)`` (or
  ``r·T²d/(‖T d‖ + eps)``) to the weights *without building ε*: the product is formed
  inside the addition (:func:`~samkit.optim._tensors.add_scaled_`), so the only
  parameter-sized memory a perturbation needs is the copy of the clean weights;
* :class:`SavedWeights`: that copy, made by :meth:`~SavedWeights.save` and copied back
  bit-exactly by :meth:`~SavedWeights.restore`. It is allocated when the weights move and
  released when they are restored, so nothing parameter-sized is held between steps; the
  (device, dtype) plan of the parameter list is cached, keyed on the parameters' identities,
  dtypes and devices (a model cast after a step, ``model.double()``, keeps its parameters'
  identities but gets a new plan).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from samkit.optim._tensors import Buckets, add_scaled_, copy_, masked_

__all__ = ["Perturbation", "SavedWeights"]


class Perturbation:
    """One perturbation's tensors, flattened over the param groups that take part.

    ``directions`` are ``d`` (``T ⊙ d`` in groups with ``adaptive=True``, new tensors that
    :meth:`apply` may change), ``norm_tensors`` the tensors whose global norm normalises
    (``directions``, or ``T ⊙ norm_of``), ``scales`` ASAM's ``T`` (``None``: 1) and
    ``radii`` the signed radius of each tensor's group.
    """

    __slots__ = ("params", "directions", "norm_tensors", "scales", "radii", "masks")

    def __init__(
        self,
        groups: list[Any],
        directions: list[list[Tensor]],
        norm_of: list[list[Tensor]] | None,
        radius: str | Callable[[dict[str, Any]], float],
        sign: float,
        scales_of: Callable[[Any], list[Tensor | None]],
        masks: list[list[Tensor | None]] | None = None,
    ) -> None:
        self.params: list[Tensor] = []
        self.directions: list[Tensor] = []
        self.norm_tensors: list[Tensor] = []
        self.scales: list[Tensor | None] = []
        self.radii: list[float] = []
        self.masks: list[Tensor | None] = []
        norm_src = directions if norm_of is None else norm_of
        mask_src = masks if masks is not None else [None] * len(groups)
        for gp, d, n, m in zip(groups, directions, norm_src, mask_src):
            if not gp.params:
                continue
            self.masks.extend([None] * len(gp.params) if m is None else m)
            r = float(radius(gp.group) if callable(radius) else gp.group[radius])
            if gp.group.get("adaptive", False):
                t = scales_of(gp)
                self.directions.extend(di if ti is None else ti * di for ti, di in zip(t, d))
                if norm_of is not None:
                    self.norm_tensors.extend(ni if ti is None else ti * ni for ti, ni in zip(t, n))
                self.scales.extend(t)
            else:
                self.directions.extend(d)
                if norm_of is not None:
                    self.norm_tensors.extend(n)
                self.scales.extend([None] * len(d))
            self.params.extend(gp.params)
            self.radii.extend([sign * r] * len(gp.params))
        if norm_of is None:
            self.norm_tensors = self.directions

    @torch.no_grad()
    def apply(self, denom: Tensor, foreach: bool, plan: Buckets) -> None:
        """``w += r·d/denom`` (``r·T²d/denom`` where ASAM scales), no temporary per tensor.

        Only the adaptive directions (``T ⊙ d``, this object's own) are changed, into
        ``T² ⊙ d``, and masked ones, into ``d ⊙ m`` (the caller's to change); any other
        direction that is a gradient or a method's buffer is read only.
        """
        masked_(self.directions, self.masks, foreach)
        for i, t in enumerate(self.scales):
            if t is not None:
                self.directions[i].mul_(t)
        self.norm_tensors = []
        if all(r == self.radii[0] for r in self.radii):
            add_scaled_(self.params, self.directions, self.radii[0] / denom, foreach, plan)
            return
        by_radius: dict[float, list[int]] = {}  # per-group radii: one call per radius
        for i, r in enumerate(self.radii):
            by_radius.setdefault(r, []).append(i)
        for r, idx in by_radius.items():
            add_scaled_(
                [self.params[i] for i in idx], [self.directions[i] for i in idx], r / denom, foreach
            )


class SavedWeights:
    """The clean weights while the model sits at ``w + ε``; :meth:`restore` copies them back.

    The copy lives from :meth:`save` to :meth:`restore` only (one buffer per parameter, made
    at each save). The parameter list's (device, dtype) plan is cached.
    """

    __slots__ = ("params", "buffers", "_key", "_plan")

    def __init__(self) -> None:
        self.params: list[Tensor] = []
        self.buffers: list[Tensor] = []
        self._key: tuple[Any, ...] | None = None
        self._plan: Buckets | None = None

    def plan(self, params: list[Tensor]) -> Buckets:
        """The (device, dtype) plan of ``params``, rebuilt when a parameter, its dtype or its
        device changed since the last call."""
        key = tuple((id(p), p.dtype, p.device) for p in params)
        if key != self._key or self._plan is None:
            self._key, self._plan = key, Buckets(params)
        return self._plan

    @torch.no_grad()
    def save(self, params: list[Tensor], foreach: bool, plan: Buckets) -> None:
        """Copy ``params`` (the clean weights) into new buffers."""
        self.buffers = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        copy_(self.buffers, params, foreach, plan)
        self.params = params

    @torch.no_grad()
    def restore(self, foreach: bool) -> None:
        """Copy the saved weights back (bit-exact) and release the copy."""
        if not self.params:
            return
        params, buffers = self.params, self.buffers
        self.params, self.buffers = [], []
        copy_(params, buffers, foreach, self.plan(params))

    def __bool__(self) -> bool:
        return bool(self.params)
