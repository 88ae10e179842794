"""Sharpness notions: worst-, ascent- and average-direction sharpness, min-sharpness, the
alignment of the gradient with the top Hessian eigenvector, and :func:`measure_all`.

Every notion is evaluated *per batch* and then averaged with batch-size weights, so that with
batches of size ``m`` the result is the m-sharpness of Foret et al. (2021) / Andriushchenko et
al. (2023):  ``S_m(w) = Σ_b n_b S(w; B_b) / Σ_b n_b``, where ``S(w; B)`` is computed with the
batch loss ``L_B`` alone (for the worst/min/ascent notions the maximiser differs per batch).

References
----------
* K. Wen, T. Ma, Z. Li, "How does sharpness-aware minimization minimize sharpness?", ICLR 2023
  (worst-, ascent- and average-direction sharpness; R^Max ≈ ρ²λ₁/2, R^Avg ≈ ρ²Tr/(2D)).
* P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-aware minimization", ICLR 2021
  (m-sharpness).
* M. Andriushchenko, F. Croce, M. Müller, M. Hein, N. Flammarion, "A modern look at the
  relationship between sharpness and generalization", ICML 2023 (worst-case l2/l∞ and
  adaptive sharpness by projected gradient ascent, averaged over batches, eval mode).
* Bilateral SAM (min-sharpness ``L(w) − min_{‖ε‖≤ρ} L(w+ε)``).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._utils import (
    Evaluator,
    LossFn,
    check_choice,
    check_nonneg_float,
    check_positive_int,
    check_seed,
    make_generator,
)
from .hessian import TRACE_METHODS, _loss_and_gradient, hessian_trace, top_eigenvalues

__all__ = [
    "AlignmentResult",
    "SharpnessResult",
    "ascent_direction_sharpness",
    "average_direction_sharpness",
    "gradient_eigenvector_alignment",
    "measure_all",
    "min_sharpness",
    "worst_direction_sharpness",
]


@dataclass
class SharpnessResult:
    """A sharpness value averaged over batches.

    Attributes:
        value: batch-size-weighted mean of the per-batch values (the m-sharpness).
        per_batch: the per-batch values (for :func:`average_direction_sharpness`, the per-batch
            sample means).
        batch_sizes: the batch sizes used as weights.
        loss: the batch-size-weighted mean loss ``L(w)`` at the unperturbed weights.
        rho: the radius.
        notion: which notion was measured.
        std_error: Monte-Carlo standard error (average-direction only; else None).
        num_samples: random directions drawn (average-direction only; else None).
        info: extra settings (norm, steps, ...).
    """

    value: float
    per_batch: list[float]
    batch_sizes: list[int]
    loss: float
    rho: float
    notion: str
    std_error: float | None = None
    num_samples: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": float(self.value),
            "per_batch": [float(x) for x in self.per_batch],
            "batch_sizes": [int(x) for x in self.batch_sizes],
            "loss": float(self.loss),
            "rho": float(self.rho),
            "notion": self.notion,
            "std_error": None if self.std_error is None else float(self.std_error),
            "num_samples": None if self.num_samples is None else int(self.num_samples),
            "info": {k: v for k, v in self.info.items()},
        }


@dataclass
class AlignmentResult:
    """``|cos(∇L, v₁)|`` between the full gradient and the top Hessian eigenvector."""

    cosine: float
    eigenvalue: float
    grad_norm: float
    num_hvp: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "cosine": float(self.cosine),
            "eigenvalue": float(self.eigenvalue),
            "grad_norm": float(self.grad_norm),
            "num_hvp": int(self.num_hvp),
        }


def _weighted_mean(values: Sequence[float], sizes: Sequence[int]) -> float:
    total = sum(sizes)
    return float(sum(v * n for v, n in zip(values, sizes)) / total)


#: Why the per-batch maximisations cannot run on shards.
_PER_BATCH_SHARDED = (
    "it maximises over a perturbation of the whole model for each batch, and each process's "
    "batches would need their own perturbation, which shards laid out like the parameters "
    "cannot hold; measure an unsharded copy (distributed over processes as with DDP), or use "
    "average_direction_sharpness, which shares its directions between batches"
)


def _union(ev: Evaluator, error: Exception | None, *lists: Sequence[float]) -> tuple[list, ...]:
    """Per-batch lists over every process's batches, in rank order (this process's own when
    it measures alone); a failure on any process raises on every process."""
    if ev.comm is None:
        if error is not None:
            raise error
        return tuple(list(x) for x in lists)
    ev.comm.sum_scalars([], error, "the per-batch values")
    return tuple(ev.comm.gather_floats(list(x), "the per-batch values") for x in lists)


# ----------------------------------------------------------------------------- PGD engine


def _project(u: torch.Tensor, rho: float, norm: str) -> torch.Tensor:
    if norm == "l2":
        n = float(torch.linalg.vector_norm(u))
        return u * (rho / n) if n > rho else u
    return u.clamp(-rho, rho)


def _pgd_batch(
    ev: Evaluator,
    index: int,
    inputs: Any,
    targets: Any,
    *,
    rho: float,
    steps: int,
    step_size: float,
    norm: str,
    adaptive: bool,
    sign: float,
    gen: torch.Generator,
    init_scale: float,
) -> tuple[float, float]:
    """Maximise ``f(u) = sign·(L_B(w + T⊙u) − L_B(w))`` over ``u`` in the ρ-ball of ``norm``.

    ``T = |w|`` if adaptive else 1. Projected normalised-gradient ascent (l2: ``u + η g/‖g‖``;
    l∞: ``u + η sign(g)``), from a small random start ``u₀`` (``init_scale·ρ`` in norm), with
    step halving whenever a step does not improve ``f``; the best iterate (``u = 0``
    included) is kept. Returns ``(max f, L_B(w))``.
    """
    with torch.no_grad():
        loss0 = float(ev.loss(index, inputs, targets))
    scale = torch.cat([p.detach().abs().reshape(-1) for p in ev.compute]) if adaptive else None

    def value_and_grad(u: torch.Tensor) -> tuple[float, torch.Tensor]:
        u = u.detach().requires_grad_(True)
        delta = u * scale if scale is not None else u
        loss = ev.loss(index, inputs, targets, ev.perturbed(ev.space.to_compute(delta)))
        (g,) = torch.autograd.grad(loss, u, allow_unused=True)
        if g is None:
            g = torch.zeros_like(u)
        return sign * (float(loss.detach()) - loss0), sign * g.detach()

    if norm == "l2":
        z = ev.rand_flat(gen, "normal")
        zn = float(torch.linalg.vector_norm(z))
        u = z * (init_scale * rho / zn) if zn > 0 else z
    else:
        u = ev.rand_flat(gen, "uniform") * (init_scale * rho)
    best = 0.0
    cur_f, cur_g = value_and_grad(u)
    best = max(best, cur_f)
    eta = step_size
    for _ in range(steps):
        if norm == "l2":
            gn = float(torch.linalg.vector_norm(cur_g))
            if gn == 0.0 or not math.isfinite(gn):
                break
            prop = _project(u + (eta / gn) * cur_g, rho, norm)
        else:
            if not bool(torch.any(cur_g != 0)):
                break
            prop = _project(u + eta * torch.sign(cur_g), rho, norm)
        f, g = value_and_grad(prop)
        if math.isfinite(f) and f > best:
            best = f
        if math.isfinite(f) and f >= cur_f:
            u, cur_f, cur_g = prop, f, g
        else:
            eta *= 0.5
    return best, loss0


def _pgd_sharpness(
    notion: str,
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float,
    steps: int,
    step_size: float | None,
    norm: str,
    adaptive: bool,
    seed: int,
    train_mode: bool,
    sign: float,
    init_scale: float,
    distributed: bool | None,
) -> SharpnessResult:
    holder: dict[str, float] = {}

    def checks() -> None:
        holder["rho"] = check_nonneg_float("rho", rho)
        check_positive_int("steps", steps, minimum=0)
        check_choice("norm", norm, ("l2", "linf"))
        check_seed(seed)
        holder["step_size"] = check_nonneg_float(
            "step_size", holder["rho"] if step_size is None else step_size
        )
        holder["init_scale"] = check_nonneg_float("init_scale", init_scale)
        if holder["init_scale"] > 1:
            raise ValueError(f"init_scale must be in [0, 1], got {init_scale!r}")

    ev = Evaluator(
        model, loss_fn, data, train_mode=train_mode, seed=seed, distributed=distributed,
        measure=f"{notion}_sharpness" if notion != "min" else "min_sharpness",
        settings=(rho, steps, step_size, norm, adaptive, init_scale), checks=checks,
        sharded_ok=False, sharded_reason=_PER_BATCH_SHARDED,
    )  # fmt: skip
    rho, step_size, init_scale = holder["rho"], holder["step_size"], holder["init_scale"]
    values, sizes, losses = [], [], []
    error: Exception | None = None
    gen = make_generator(seed)
    with ev.session():
        if rho > 0:  # one random start per batch, drawn in order over the union of batches
            for _ in range(ev.offset):
                ev.rand_flat(gen, "normal" if norm == "l2" else "uniform")
        try:
            for i, inputs, targets, n in ev.batches():
                if rho == 0:
                    with torch.no_grad():
                        v, l0 = 0.0, float(ev.loss(i, inputs, targets))
                else:
                    v, l0 = _pgd_batch(
                        ev, i, inputs, targets, rho=rho, steps=steps, step_size=step_size,
                        norm=norm, adaptive=adaptive, sign=sign, gen=gen, init_scale=init_scale,
                    )  # fmt: skip
                values.append(v)
                losses.append(l0)
                sizes.append(n)
        except Exception as e:
            if ev.comm is None:
                raise
            error = e
    values, losses, sizes = _union(ev, error, values, losses, sizes)
    sizes = [int(n) for n in sizes]
    info = {
        "norm": norm,
        "adaptive": bool(adaptive),
        "steps": int(steps),
        "step_size": float(step_size),
        "seed": int(seed),
    }
    return SharpnessResult(
        _weighted_mean(values, sizes), values, sizes, _weighted_mean(losses, sizes), rho,
        notion, info=info,
    )  # fmt: skip


def worst_direction_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float,
    *,
    steps: int = 20,
    step_size: float | None = None,
    norm: str = "l2",
    adaptive: bool = False,
    init_scale: float = 0.01,
    seed: int = 0,
    train_mode: bool = False,
    distributed: Any = None,
) -> SharpnessResult:
    """Worst-direction (worst-case) sharpness, per batch then averaged (m-sharpness):

        R^Max_ρ(w; B) = max_{δ ∈ 𝔹} L_B(w + δ) − L_B(w),

    with ``𝔹 = {‖δ‖₂ ≤ ρ}`` (``norm="l2"``), ``{‖δ‖_∞ ≤ ρ}`` (``"linf"``), or with
    ``adaptive=True`` the same balls scaled elementwise by ``|w|`` (``δ = |w|⊙u``, ``u`` in the
    ρ-ball; Andriushchenko et al. 2023; parameters equal to 0 are not perturbed). Near a minimum
    R^Max ≈ ρ²λ₁/2 (Wen et al. 2023).

    Maximised by projected gradient ascent in ``u``: ``u ← Π(u + η g/‖g‖)`` (l2) or
    ``u ← Π(u + η sign g)`` (l∞), from a small random start (``init_scale·ρ``; at a minimum
    the gradient is zero, so a gradient start would stall), step size ``η = step_size``
    (default ``ρ``) halved whenever a step does not increase the loss (the step is then
    rejected). The best iterate is kept, including ``δ = 0``, so the value is ≥ 0 — it is a
    lower bound on the true maximum. Cost per batch: ``steps + 1`` forward/backward passes plus
    one forward. Differences from Andriushchenko et al.: their fixed step size; the
    step halving here makes the ascent monotone. The random starts are drawn one per batch,
    in order, from a generator seeded with ``seed``.

    ``distributed``: under ``torch.distributed`` (default ``None``: when it is initialised)
    the batches are those of every process (each maximised where it is, the average and
    ``per_batch`` over all of them, in rank order), the same result on every process; with
    sharded (DTensor) parameters it raises TypeError (each batch needs its own perturbation
    of the whole model).

    Raises:
        ValueError: ``rho < 0``, ``steps < 0``, unknown ``norm``, empty ``data``.
    """
    return _pgd_sharpness(
        "worst_direction", model, loss_fn, data, rho, steps, step_size, norm, adaptive, seed,
        train_mode, +1.0, init_scale, distributed,
    )  # fmt: skip


def min_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float,
    *,
    steps: int = 20,
    step_size: float | None = None,
    norm: str = "l2",
    init_scale: float = 0.01,
    seed: int = 0,
    train_mode: bool = False,
    distributed: Any = None,
) -> SharpnessResult:
    """Min-sharpness (Bilateral SAM), per batch then averaged:

        R^Min_ρ(w; B) = L_B(w) − min_{‖δ‖ ≤ ρ} L_B(w + δ)   (≥ 0),

    by projected gradient *descent* with the same scheme as :func:`worst_direction_sharpness`
    (normalised steps, step halving on failure, best iterate kept, ``δ = 0`` included).
    """
    return _pgd_sharpness(
        "min", model, loss_fn, data, rho, steps, step_size, norm, False, seed, train_mode,
        -1.0, init_scale, distributed,
    )  # fmt: skip


def ascent_direction_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float,
    *,
    train_mode: bool = False,
    seed: int = 0,
    distributed: Any = None,
) -> SharpnessResult:
    """Ascent-direction sharpness (Wen et al. 2023), per batch then averaged:

        R^Asc_ρ(w; B) = L_B(w + ρ ∇L_B(w)/‖∇L_B(w)‖) − L_B(w)

    (the perturbation of one SAM step with batch ``B``). It is undefined where
    ``∇L_B(w) = 0`` exactly: such a batch gives ``nan`` (so does the average) and a
    ``RuntimeWarning`` is issued — no exception, so that :func:`measure_all` still reports the
    other measures at a stationary point. Cost per batch: one forward/backward, one forward.
    ``distributed``: as in :func:`worst_direction_sharpness` (sharded parameters are refused).
    """
    holder: dict[str, float] = {}

    def checks() -> None:
        holder["rho"] = check_nonneg_float("rho", rho)

    ev = Evaluator(
        model, loss_fn, data, train_mode=train_mode, seed=seed, distributed=distributed,
        measure="ascent_direction_sharpness", settings=(rho,), checks=checks,
        sharded_ok=False, sharded_reason=_PER_BATCH_SHARDED,
    )  # fmt: skip
    rho = holder["rho"]
    values, sizes, losses, zero = [], [], [], []
    error: Exception | None = None
    with ev.session():
        try:
            for i, inputs, targets, n in ev.batches():
                loss = ev.loss(i, inputs, targets)
                grads = torch.autograd.grad(loss, ev.compute, allow_unused=True)
                g = torch.cat(
                    [
                        (torch.zeros_like(p) if gi is None else gi.detach()).reshape(-1)
                        for gi, p in zip(grads, ev.compute)
                    ]
                )
                gn = float(torch.linalg.vector_norm(g))
                l0 = float(loss.detach())
                if gn == 0.0:
                    values.append(float("nan"))
                else:
                    delta = ev.space.to_compute(g * (rho / gn))
                    with torch.no_grad():
                        l1 = float(ev.loss(i, inputs, targets, ev.perturbed(delta)))
                    values.append(l1 - l0)
                zero.append(float(gn == 0.0))
                losses.append(l0)
                sizes.append(n)
        except Exception as e:
            if ev.comm is None:
                raise
            error = e
    values, losses, sizes, zero = _union(ev, error, values, losses, sizes, zero)
    sizes = [int(n) for n in sizes]
    zero_batches = [j for j, z in enumerate(zero) if z]
    if zero_batches:
        warnings.warn(
            f"ascent-direction sharpness is undefined where the gradient is exactly zero "
            f"(batches {zero_batches}); returning nan for them",
            RuntimeWarning,
            stacklevel=2,
        )
    return SharpnessResult(
        _weighted_mean(values, sizes), values, sizes, _weighted_mean(losses, sizes), rho,
        "ascent_direction",
    )  # fmt: skip


def average_direction_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float,
    *,
    num_samples: int = 20,
    distribution: str = "sphere",
    seed: int = 0,
    train_mode: bool = False,
    distributed: Any = None,
) -> SharpnessResult:
    """Average-direction sharpness, a Monte-Carlo estimate of

        R^Avg_ρ(w) = E_v [L(w + v)] − L(w),

    with ``distribution="sphere"``: ``v = ρ z/‖z‖``, ``z ~ N(0, I_D)`` — uniform on the sphere of
    radius ρ, as Wen et al. (2023) define it (near a minimum ≈ ρ² Tr(H)/(2D); exact for a
    quadratic since ``E[vᵀAv] = ρ² Tr(A)/D`` on that sphere), or ``"gaussian"``: ``v ~ N(0, ρ²
    I_D)`` (≈ ρ² Tr(H)/2; the "average-case" sharpness of Andriushchenko et al.).

    Each of the ``num_samples`` directions is shared by all batches (the measure is linear in
    the loss, so per-batch and full-data averaging coincide in expectation); the value is the
    mean over samples of ``Σ_b n_b (L_b(w+v) − L_b(w)) / Σ_b n_b`` and ``std_error`` its
    standard error (nan for one sample). Cost: ``num_samples + 1`` forwards per batch.
    ``distributed``: under ``torch.distributed`` the batches of every process (also with
    sharded parameters: the directions are drawn as the whole vector and kept as shards).
    """
    holder: dict[str, float] = {}

    def checks() -> None:
        holder["rho"] = check_nonneg_float("rho", rho)
        check_positive_int("num_samples", num_samples)
        check_choice("distribution", distribution, ("sphere", "gaussian"))
        check_seed(seed)

    ev = Evaluator(
        model, loss_fn, data, train_mode=train_mode, seed=seed, distributed=distributed,
        measure="average_direction_sharpness", settings=(rho, num_samples, distribution),
        checks=checks,
    )  # fmt: skip
    rho = holder["rho"]
    space = ev.space
    gen = make_generator(seed)
    error: Exception | None = None
    with ev.session(), torch.no_grad():
        source = list(ev.batches())  # the batches are evaluated num_samples + 1 times
        sizes = [n for _, _, _, n in source]
        per_batch = np.zeros((num_samples, len(source)))
        base: list[float] = []
        try:
            base = [float(ev.loss(i, x, y)) for i, x, y, _ in source]
        except Exception as e:
            if ev.comm is None:
                raise
            error = e
        for s in range(num_samples):
            z = ev.rand_flat(gen, "normal")
            v = z * (rho / space.norm(z)) if distribution == "sphere" else z * rho
            over = ev.perturbed(space.to_compute(v))  # gathers shards: every process
            if error is not None:
                continue
            try:
                for j, (i, x, y, _n) in enumerate(source):
                    per_batch[s, j] = float(ev.loss(i, x, y, over)) - base[j]
            except Exception as e:
                if ev.comm is None:
                    raise
                error = e
    weights = np.asarray(sizes, dtype=np.float64)
    sums = per_batch @ weights
    total = float(weights.sum())
    if ev.comm is not None:
        *sums_all, total = ev.comm.sum_scalars([*sums.tolist(), total], error, "the losses")
        sums = np.asarray(sums_all)
    per_sample = sums / total
    means, base, sizes = _union(ev, error, per_batch.mean(axis=0).tolist(), base, sizes)
    sizes = [int(n) for n in sizes]
    se = float(per_sample.std(ddof=1) / math.sqrt(num_samples)) if num_samples > 1 else math.nan
    return SharpnessResult(
        float(per_sample.mean()),
        [float(x) for x in means],
        sizes,
        _weighted_mean(base, sizes),
        rho,
        "average_direction",
        std_error=se,
        num_samples=num_samples,
        info={"distribution": distribution, "seed": int(seed)},
    )


def _cosine(space: Any, g: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
    """``(|cos(g, v)|, ‖g‖)`` over the whole vectors (nan cosine where ``g = 0``)."""
    gn = space.norm(g)
    if gn == 0.0:
        return float("nan"), gn
    return abs(space.dot(g, v)) / (gn * space.norm(v)), gn


def gradient_eigenvector_alignment(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    train_mode: bool = False,
    max_vectors: int | None = None,
    distributed: Any = None,
) -> AlignmentResult:
    """``|cos(∇L(w), v₁)| = |∇Lᵀv₁| / ‖∇L‖`` with ``v₁`` the top Hessian eigenvector (Lanczos,
    :func:`~samkit.sharpness.top_eigenvalues`, with ``max_vectors``) and ``∇L`` the full
    (batch-averaged) gradient.

    Wen et al. (2023) show that full-batch SAM drives this alignment towards 1. Where
    ``∇L = 0`` exactly the cosine is undefined: ``nan`` with a ``RuntimeWarning``.
    ``distributed``: see :func:`top_eigenvalues` (sharded parameters work).
    """
    ev = Evaluator(
        model, loss_fn, data, train_mode=train_mode, seed=seed, distributed=distributed,
        measure="gradient_eigenvector_alignment",
    )  # fmt: skip
    with ev.session():
        _, g = _loss_and_gradient(ev)
    eig = top_eigenvalues(
        model, loss_fn, ev.data, 1, max_iter=max_iter, tol=tol, seed=seed, train_mode=train_mode,
        max_vectors=max_vectors, distributed=distributed,
    )  # fmt: skip
    cos, gn = _cosine(ev.space, g, ev.space.flatten(eig.eigenvectors[0]))
    if gn == 0.0:
        warnings.warn(
            "gradient is exactly zero: its alignment with the top eigenvector is undefined (nan)",
            RuntimeWarning,
            stacklevel=2,
        )
    return AlignmentResult(cos, eig.eigenvalues[0], gn, eig.num_hvp)


_MEASURES = ("lambda_max", "trace", "worst_direction", "ascent_direction", "average_direction",
             "alignment")  # fmt: skip


def _error_text(exc: BaseException) -> str:
    """``"TypeName: message"`` on one line."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def measure_all(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float = 0.05,
    *,
    measures: Sequence[str] | None = None,
    lanczos_iter: int = 30,
    lanczos_tol: float = 1e-3,
    trace_samples: int = 20,
    worst_steps: int = 10,
    worst_norm: str = "l2",
    average_samples: int = 10,
    seed: int = 0,
    train_mode: bool = False,
    reuse_graph: bool | None = None,
    trace_method: str | None = None,
    max_vectors: int | None = None,
    distributed: Any = None,
) -> dict[str, Any]:
    """The main sharpness measures in one call, as a flat JSON-serialisable dict.

    ``measures`` selects a subset of ``("lambda_max", "trace", "worst_direction",
    "ascent_direction", "average_direction", "alignment")`` (default: all). Cost, in passes over
    ``data``: λ₁ ≤ ``lanczos_iter`` HVPs (each ≈ 2-3 gradient passes); trace ``trace_samples``
    HVPs; worst-direction ``worst_steps + 1`` gradient passes; ascent 1 gradient pass + 1
    forward; average ``average_samples + 1`` forwards; alignment reuses λ₁'s eigenvector when
    both are requested (else it runs its own Lanczos) plus one gradient pass.

    Keys: ``loss``, ``lambda_max``, ``lambda_max_converged``, ``trace``, ``trace_std_error``,
    ``worst_direction``, ``ascent_direction``, ``average_direction``,
    ``average_direction_std_error``, ``alignment``, ``num_hvp``, ``rho``, ``seconds``,
    ``errors`` (only the keys of the selected measures, plus ``loss``, ``rho``, ``num_hvp``,
    ``seconds`` and ``errors``). ``reuse_graph`` is passed to the λ₁ and trace computations
    (see :func:`~samkit.sharpness.top_eigenvalues`), ``trace_method`` to the trace
    (:func:`~samkit.sharpness.hessian_trace`; None: its default), ``max_vectors`` to λ₁'s
    Lanczos.

    ``distributed``: under ``torch.distributed`` (default ``None``: when it is initialised)
    every measure is over the union of every process's batches, the same dict on every
    process (call it on every process; write from :func:`~samkit.sharpness.is_writer`).
    With sharded (DTensor) parameters the worst- and ascent-direction sharpness fail (their
    ``errors`` say why) and the others are measured.

    **A failing measure does not lose the others.** The settings are validated first (a bad
    value raises ``ValueError``/``TypeError`` at once), and so are the loss and gradient at
    ``w`` (an exception there is raised: nothing could be measured). After that, an exception
    raised by one measure — a layer without a second derivative, running out of memory —
    sets that measure's keys to ``None``, records ``"ExceptionType: message"`` under
    ``errors[name]`` (``name`` as in ``measures``; ``errors`` is ``{}`` when every measure
    succeeded), issues a ``RuntimeWarning`` and goes on with the next measure. ``alignment``
    needs the top eigenvector, so it fails when λ₁'s computation fails. ``num_hvp`` counts
    the HVPs of the measures that succeeded. ``None`` without an entry in ``errors`` means
    undefined, not failed: ascent direction and alignment where the gradient is exactly zero.
    """
    selected: list[str] = []

    def checks() -> None:
        check_nonneg_float("rho", rho)
        if measures is None:
            selected.extend(_MEASURES)
        else:
            if isinstance(measures, str):
                raise TypeError("measures must be a sequence of names, not a str")
            selected.extend(check_choice("measure", m, _MEASURES) for m in measures)
        check_positive_int("lanczos_iter", lanczos_iter)
        check_nonneg_float("lanczos_tol", lanczos_tol, strictly_positive=True)
        check_positive_int("trace_samples", trace_samples)
        if trace_method is not None:
            check_choice("trace_method", trace_method, TRACE_METHODS)
        check_positive_int("worst_steps", worst_steps, minimum=0)
        check_choice("norm", worst_norm, ("l2", "linf"))
        check_positive_int("average_samples", average_samples)
        check_seed(seed)
        if reuse_graph is not None and not isinstance(reuse_graph, bool):
            raise TypeError(f"reuse_graph must be None or a bool, got {reuse_graph!r}")
        if max_vectors is not None:
            check_positive_int("max_vectors", max_vectors, minimum=3)

    t0 = time.perf_counter()
    ev = Evaluator(
        model, loss_fn, data, train_mode=train_mode, seed=seed, distributed=distributed,
        measure="measure_all", checks=checks,
        settings=(rho, measures, lanczos_iter, lanczos_tol, trace_samples, trace_method,
                  worst_steps, worst_norm, average_samples, max_vectors),
    )  # fmt: skip
    rho = float(rho)
    data = ev.data
    out: dict[str, Any] = {"rho": rho}
    errors: dict[str, str] = {}
    num_hvp = 0
    with ev.session():
        loss, grads = _loss_and_gradient(ev)
    out["loss"] = loss
    model = ev.model  # unwrapped from DistributedDataParallel

    def failed(name: str, keys: Sequence[str], message: str) -> None:
        for key in keys:
            out[key] = None
        errors[name] = message
        warnings.warn(
            f"measure_all: {name} failed and is reported as None ({message}); "
            "the other measures are unaffected",
            RuntimeWarning,
            stacklevel=3,
        )

    eig = None
    if "lambda_max" in selected or "alignment" in selected:
        try:
            eig = top_eigenvalues(
                model, loss_fn, data, 1, max_iter=lanczos_iter, tol=lanczos_tol, seed=seed,
                train_mode=train_mode, reuse_graph=reuse_graph, max_vectors=max_vectors,
                distributed=distributed,
            )  # fmt: skip
        except Exception as e:
            if "lambda_max" in selected:
                failed("lambda_max", ("lambda_max", "lambda_max_converged"), _error_text(e))
            if "alignment" in selected:
                failed(
                    "alignment", ("alignment",),
                    f"needs the top Hessian eigenvector, which failed: {_error_text(e)}",
                )  # fmt: skip
        else:
            num_hvp += eig.num_hvp
            if "lambda_max" in selected:
                out["lambda_max"] = eig.eigenvalues[0]
                out["lambda_max_converged"] = eig.converged
    if "trace" in selected:
        try:
            tr = hessian_trace(
                model, loss_fn, data, trace_samples, method=trace_method, seed=seed,
                train_mode=train_mode, reuse_graph=reuse_graph, distributed=distributed,
            )  # fmt: skip
        except Exception as e:
            failed("trace", ("trace", "trace_std_error"), _error_text(e))
        else:
            num_hvp += tr.num_samples
            out["trace"] = tr.trace
            out["trace_std_error"] = None if math.isnan(tr.std_error) else tr.std_error
    if "worst_direction" in selected:
        try:
            out["worst_direction"] = worst_direction_sharpness(
                model, loss_fn, data, rho, steps=worst_steps, norm=worst_norm, seed=seed,
                train_mode=train_mode, distributed=distributed,
            ).value  # fmt: skip
        except Exception as e:
            failed("worst_direction", ("worst_direction",), _error_text(e))
    if "ascent_direction" in selected:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                val = ascent_direction_sharpness(
                    model, loss_fn, data, rho, train_mode=train_mode, distributed=distributed
                ).value
        except Exception as e:
            failed("ascent_direction", ("ascent_direction",), _error_text(e))
        else:
            out["ascent_direction"] = None if math.isnan(val) else val
    if "average_direction" in selected:
        try:
            avg = average_direction_sharpness(
                model, loss_fn, data, rho, num_samples=average_samples, seed=seed,
                train_mode=train_mode, distributed=distributed,
            )  # fmt: skip
        except Exception as e:
            failed(
                "average_direction", ("average_direction", "average_direction_std_error"),
                _error_text(e),
            )  # fmt: skip
        else:
            out["average_direction"] = avg.value
            out["average_direction_std_error"] = (
                None if avg.std_error is None or math.isnan(avg.std_error) else avg.std_error
            )
    if "alignment" in selected and eig is not None:
        cos, _ = _cosine(ev.space, grads, ev.space.flatten(eig.eigenvectors[0]))
        out["alignment"] = None if math.isnan(cos) else cos
    out["num_hvp"] = num_hvp
    out["seconds"] = time.perf_counter() - t0
    out["errors"] = errors
    return out
