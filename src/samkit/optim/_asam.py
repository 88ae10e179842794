"""ASAM's scale-invariant neighbourhood, for every method that offers ``adaptive=True``.

ASAM (Kwon et al., ICML 2021) measures the perturbation in the metric of the weights:
``T = |w| + eta`` on weight tensors, 1 elsewhere, and ``ε = ρ·T²d/‖T d‖``. SAM, F-SAM,
GSAM, mSAM, ESAM and AUSAM offer it through the same three group options, declared here
once (:func:`asam_defaults`, default ``eta`` :data:`ASAM_ETA`), checked by
``SharpnessAwareOptimizer.validate_group`` and applied by ``SharpnessAwareOptimizer.perturb``
with :func:`asam_scales`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["ASAM_ETA", "asam_defaults", "asam_scales"]

#: ASAM's offset in ``T = |w| + eta`` (the official code's value): the default ``eta`` of
#: every method that offers ``adaptive=True``.
ASAM_ETA = 0.01


def asam_defaults(adaptive: bool, eta: float) -> dict[str, Any]:
    """The group options of ASAM's scaling: ``adaptive``, ``eta`` and ``weight_scaling``.

    ``adaptive`` turns the scaling on, ``eta`` is the offset in ``T = |w| + eta``, and
    ``weight_scaling`` chooses which tensors get ``T``: ``None`` (the automatic rule, see
    :class:`~samkit.ASAM`), ``True`` (every tensor of the group) or ``False`` (none).
    """
    return dict(adaptive=bool(adaptive), eta=eta, weight_scaling=None)


def asam_scales(group: dict[str, Any], params: list[Tensor]) -> list[Tensor | None]:
    """ASAM's ``T = |w| + eta`` for the weight tensors among ``params``, ``None`` (T = 1) for
    the others, by the rule of ``group``'s ``weight_scaling``.

    The automatic rule: with named parameters (``param_names`` in the group) the tensors
    whose name ends in ``weight`` (the official code's rule), otherwise every tensor with
    more than one dimension (conv and linear weights, not biases and norm layers).
    """
    eta = group.get("eta", 0.0)
    choice = group.get("weight_scaling")  # None: automatic rule
    names = group.get("param_names")
    if names is not None:
        name_of = dict(zip((id(p) for p in group["params"]), names))
    out: list[Tensor | None] = []
    for p in params:
        if choice is None:
            is_weight = name_of[id(p)].endswith("weight") if names is not None else p.dim() > 1
        else:
            is_weight = bool(choice)
        out.append(p.detach().abs().add_(eta) if is_weight else None)
    return out
