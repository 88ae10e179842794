r"""Per-sample squared gradients summed over samples: an empirical Fisher diagonal.

SSAM-F (Sparse SAM with a Fisher mask) scores every coordinate ``j`` of the model by
:math:`F_j = \sum_n (\partial_j \ell_n)^2` over a number of samples. The per-sample
gradients come from ``torch.func``: ``vmap`` over ``grad`` of a ``functional_call``, in
chunks that bound the memory, with the model in eval mode (restored afterwards) and run
eagerly even when it is ``torch.compile``'d (dynamo cannot trace ``torch.func``'s tensors,
and would then skip the model's frame for every later pass too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from samkit.optim._compat import compiler_disabled
from samkit.optim._distributed import Group, through_flat
from samkit.optim._tensors import global_norm

__all__ = [
    "NonFiniteSamples",
    "add_fisher_scores",
    "fisher_scores",
    "per_sample_squared_gradients",
]

#: The chunk rule: per-sample gradients are computed for as many samples at once as hold at
#: most this many values together (2**20: 4 MiB in float32), and at least one sample. A
#: model of 2**20 parameters or more takes one sample at a time: the Fisher pass then needs
#: one per-sample gradient beside the accumulator, whatever ``num_samples`` (issue 21).
_CHUNK_VALUES = 1 << 20


class NonFiniteSamples(Exception):
    """A chunk of per-sample gradients was not finite; ``samples`` were added before it."""

    def __init__(self, samples: int) -> None:
        super().__init__(f"non-finite per-sample gradients after {samples} samples")
        self.samples = samples


def per_sample_squared_gradients(
    module: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    inputs: Any,
    targets: Tensor,
    params: list[Tensor],
    k: int,
    into: list[Tensor] | None = None,
    finite_only: bool = False,
) -> list[Tensor]:
    r""":math:`\sum_{n<k} (\nabla_p \ell(x_n, y_n))^2` for each of ``params``.

    ``ℓ(x_n, y_n) = loss_fn(module(x_n[None]), y_n[None]).sum()`` on the first ``k`` samples,
    computed with ``torch.func`` (``vmap`` over ``grad`` of a ``functional_call``) in chunks,
    with ``module`` in eval mode (restored afterwards). Parameters that are not ``module``'s
    get zeros. Returns float tensors shaped like ``params`` (float64 stays float64): new
    ones, or ``into`` with the squares added in place. ``finite_only``: each chunk's
    gradients are checked before they are added (one synchronisation per chunk), and
    :class:`NonFiniteSamples` is raised at the first chunk that is not finite, with the
    number of samples already added.
    """
    from torch.func import functional_call, grad, vmap

    names = {p: n for n, p in module.named_parameters()}
    wanted = {names[p]: p.detach() for p in params if p in names}
    acc = into if into is not None else [_zero_sum(p) for p in params]
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
        with compiler_disabled():  # dynamo cannot trace torch.func's tensors: run eagerly
            for lo in range(0, k, chunk):
                hi = min(k, lo + chunk)
                xs = tree_map(lambda t, a=lo, b=hi: t[a:b] if isinstance(t, Tensor) else t, inputs)
                gs = per_sample(wanted, xs, targets[lo:hi])
                if finite_only and not torch.isfinite(global_norm(list(gs.values()))):
                    raise NonFiniteSamples(lo)
                for name, g in gs.items():
                    a = acc[position[name]]
                    for gn in g.to(a.dtype):  # Σ_n g_n², without a chunk-sized temporary
                        a.addcmul_(gn, gn)
                del gs
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


def _zero_sum(p: Tensor) -> Tensor:
    """A sum of squares for ``p``, at zero: float, at least float32 (float64 stays)."""
    return torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))


def fisher_scores(
    model: nn.Module,
    closure: Any,
    params: list[Tensor],
    k: int,
    replicas: Group | None,
    into: list[Tensor] | None = None,
    finite_only: bool = False,
) -> tuple[list[Tensor], int]:
    """The Fisher scores of ``params`` over the first ``k`` samples of a batch, and how many
    samples they hold.

    ``closure`` (a :class:`~samkit.BatchClosure`) gives the batch and ``loss_fn``, and counts
    the ``k`` samples' forward and backward passes in its ``forward_evals``/``grad_evals``.
    Under DDP (``replicas``) the scores and the counts are summed over the replicas, each of
    which scored its own samples. In one process the scores may be added into ``into`` in
    place, chunk by chunk, each checked first (``finite_only``: see
    :func:`per_sample_squared_gradients`).
    """
    module = model.module if hasattr(model, "no_sync") else model
    closure.forward_evals += k / closure.batch_size
    closure.grad_evals += k / closure.batch_size
    if replicas is None:
        scores = per_sample_squared_gradients(
            module, closure.loss_fn, closure.inputs, closure.targets, params, k, into, finite_only
        )
        return scores, k
    scores = per_sample_squared_gradients(
        module, closure.loss_fn, closure.inputs, closure.targets, params, k
    )
    *scores, n = through_flat(scores + [scores[0].new_tensor([k])], replicas.all_reduce_)
    return scores, int(n)


def add_fisher_scores(
    state: Any,
    model: nn.Module,
    closure: Any,
    params: list[Tensor],
    k: int,
    replicas: Group | None,
    finite_only: bool,
) -> int:
    """Add the Fisher scores of the first ``k`` samples (of each replica's batch) into
    ``state[p]["fisher"]`` (zeros when a sum starts); returns the samples added.

    In one process the squares go into the sums in place, chunk by chunk, each chunk checked
    first with ``finite_only``; under DDP the replicas' scores are summed in a buffer of
    their own, checked, then added. A chunk or a sum that is not finite raises
    :class:`NonFiniteSamples` with the samples added before it.
    """
    for p in params:
        if "fisher" not in state[p]:
            state[p]["fisher"] = _zero_sum(p)
    sums = [state[p]["fisher"] for p in params]
    if replicas is None:
        return fisher_scores(model, closure, params, k, None, sums, finite_only)[1]
    scores, scored = fisher_scores(model, closure, params, k, replicas)
    if finite_only and not torch.isfinite(
        global_norm(scores)
    ):  # the same sums, hence the same answer, everywhere
        raise NonFiniteSamples(0)
    for f, s in zip(sums, scores):
        f.add_(s)
    return scored
