"""Second-order quantities of the loss: gradient, Hessian-vector products, top eigenvalues,
trace and spectral density.

All functions work with the Hessian of the batch-size-weighted mean loss over ``data``,

    L(w) = Σ_b n_b L_b(w) / Σ_b n_b,    H = ∇²L(w) = Σ_b n_b ∇²L_b(w) / Σ_b n_b,

restricted to the parameters that require grad. One *HVP* is one product ``H v``, i.e. one pass
over all of ``data`` (forward, backward with ``create_graph=True`` and a second backward per
batch — Pearlmutter's trick, "double backward").

The forward and first backward of every HVP run with ``scaled_dot_product_attention`` forced to
its math implementation (:func:`~samkit.sharpness._utils.math_attention`): the fused attention
kernels cannot be differentiated twice, so models with ``nn.MultiheadAttention`` or the
``nn.Transformer*`` layers would fail otherwise. The math kernel is exact, only slower.

References
----------
* B. A. Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
* C. Lanczos 1950; Golub & Van Loan, *Matrix Computations*, §10.1 (Lanczos, residual bounds).
* Z. Yao, A. Gholami, K. Keutzer, M. Mahoney, "PyHessian: neural networks through the lens of
  the Hessian", IEEE BigData 2020 (power iteration, Hutchinson, SLQ on neural networks).
* M. F. Hutchinson, "A stochastic estimator of the trace of the influence matrix", 1989.
* S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via stochastic Lanczos
  quadrature", SIAM J. Matrix Anal. Appl. 2017; B. Ghorbani, S. Krishnan, Y. Xiao,
  "An investigation into neural net optimization via Hessian eigenvalue density", ICML 2019.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
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
    check_vectors,
    flatten,
    grads_or_zeros,
    make_generator,
    math_attention,
    unflatten,
)

__all__ = [
    "EigenResult",
    "SpectralDensity",
    "TraceResult",
    "density_on_grid",
    "gradient",
    "hessian_trace",
    "hvp",
    "spectral_density",
    "top_eigenvalues",
]


# ----------------------------------------------------------------------------- results


@dataclass
class EigenResult:
    """Top Hessian eigenpairs.

    Attributes:
        eigenvalues: in descending order.
        eigenvectors: one list of tensors (shaped like the parameters that require grad, unit
            global L2 norm) per eigenvalue.
        num_hvp: Hessian-vector products used (each is one pass over the data).
        converged: whether every requested eigenvalue met the stopping rule.
        method: ``"lanczos"`` or ``"power"``.
        history: the estimate of the top eigenvalue after each HVP (top Ritz value for Lanczos,
            Rayleigh quotient of the first eigenvalue's iteration for power iteration).
    """

    eigenvalues: list[float]
    eigenvectors: list[list[torch.Tensor]]
    num_hvp: int
    converged: bool
    method: str
    history: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (eigenvectors are omitted: they are model-sized)."""
        return {
            "eigenvalues": [float(x) for x in self.eigenvalues],
            "num_hvp": int(self.num_hvp),
            "converged": bool(self.converged),
            "method": self.method,
            "history": [float(x) for x in self.history],
        }


@dataclass
class TraceResult:
    """Hutchinson estimate of Tr(H): the mean of ``zᵀHz`` over Rademacher vectors ``z``."""

    trace: float
    std_error: float
    num_samples: int
    samples: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["samples"] = [float(x) for x in self.samples]
        return d


@dataclass
class SpectralDensity:
    """Stochastic Lanczos quadrature: per run, Gauss quadrature nodes (Ritz values) and weights
    (squared first components of the Ritz vectors; they sum to 1 in each run).

    The density estimate is ``φ(t) = (1/R) Σ_r Σ_i weights[r][i] · δ(t − nodes[r][i])``; see
    :func:`density_on_grid` for a Gaussian-smoothed version.
    """

    nodes: list[list[float]]
    weights: list[list[float]]
    num_hvp: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [[float(x) for x in run] for run in self.nodes],
            "weights": [[float(x) for x in run] for run in self.weights],
            "num_hvp": int(self.num_hvp),
        }


# ----------------------------------------------------------------------------- operators


class _Hessian:
    """The averaged Hessian as a linear operator on flat vectors, with an HVP counter.

    One product per batch is a forward, a backward with ``create_graph=True`` (the
    *first-order graph*) and a second backward seeded with the vector (Pearlmutter's trick).
    The first-order graph of a batch does not depend on the vector, so it is built once for
    all the vectors of :meth:`matvec_many` (batch-major loop), and — when ``reuse_graph`` is
    true — kept between calls, so that later products pay only the second backward. Keeping
    it costs the memory of every batch's graph at once; ``reuse_graph=None`` (auto) keeps it
    only when ``data`` is a single batch, where that is the memory one product needs anyway.
    The results do not depend on the choice (same operations on the same graph).
    """

    def __init__(self, ev: Evaluator, reuse_graph: bool | None = None) -> None:
        self.ev = ev
        self.num_hvp = 0
        if reuse_graph is None:
            data = ev.data
            reuse_graph = hasattr(data, "__len__") and len(data) == 1
        self.reuse_graph = bool(reuse_graph)
        self._graphs: list[tuple[int, list[torch.Tensor], list[int]]] | None = None

    def _first_order(self, i: int, inputs: Any, targets: Any):
        ev = self.ev
        # Fused attention kernels have no double backward: build the graph with the math one.
        with math_attention():
            loss = ev.loss(i, inputs, targets)
            grads = torch.autograd.grad(loss, ev.params, create_graph=True, allow_unused=True)
        # gradients that are constant in w (or unused parameters) add nothing to H v
        keep = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
        return [grads[j] for j in keep], keep

    def matvec_many(
        self, vector_sets: Sequence[Sequence[torch.Tensor]]
    ) -> list[list[torch.Tensor]]:
        """``[H v for v in vector_sets]`` (each ``v`` a list of tensors shaped like the
        parameters); counts ``len(vector_sets)`` HVPs."""
        ev = self.ev
        k = len(vector_sets)
        accs = [[torch.zeros_like(p) for p in ev.params] for _ in range(k)]

        cached = self._graphs
        cache: list[tuple[int, list[torch.Tensor], list[int]]] | None = (
            [] if self.reuse_graph and cached is None else None
        )

        def batches():
            if cached is not None:
                yield from cached
                return
            for i, inputs, targets, n in ev.batches():
                grads, keep = self._first_order(i, inputs, targets)
                if cache is not None:
                    cache.append((n, grads, keep))
                yield n, grads, keep

        total = 0
        for n, grads, keep in batches():
            if keep:
                for s, (acc, vs) in enumerate(zip(accs, vector_sets)):
                    retain = self.reuse_graph or s < k - 1
                    hv = torch.autograd.grad(
                        grads,
                        ev.params,
                        grad_outputs=[vs[j] for j in keep],
                        retain_graph=retain,
                        allow_unused=True,
                    )
                    for a, h in zip(acc, hv):
                        if h is not None:
                            a.add_(h.detach(), alpha=float(n))
            total += n
        if cache is not None:
            self._graphs = cache
        self.num_hvp += k
        return [[a / total for a in acc] for acc in accs]

    def matvec_list(self, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.matvec_many([vectors])[0]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return flatten(self.matvec_list(unflatten(v, self.ev.params)))


def _loss_and_gradient(ev: Evaluator) -> tuple[float, list[torch.Tensor]]:
    acc = [torch.zeros_like(p) for p in ev.params]
    total, loss_sum = 0, 0.0
    for i, inputs, targets, n in ev.batches():
        loss = ev.loss(i, inputs, targets)
        grads = grads_or_zeros(torch.autograd.grad(loss, ev.params, allow_unused=True), ev.params)
        for a, g in zip(acc, grads):
            a.add_(g.detach(), alpha=float(n))
        loss_sum += float(loss.detach()) * n
        total += n
    return loss_sum / total, [a / total for a in acc]


def gradient(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    train_mode: bool = False,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Gradient ``∇L(w) = Σ_b n_b ∇L_b(w) / Σ_b n_b`` of the batch-size-weighted mean loss.

    Returns one tensor per parameter that requires grad (``.grad`` is not touched).
    """
    ev = Evaluator(model, loss_fn, data, train_mode=train_mode, seed=seed)
    with ev.session():
        return _loss_and_gradient(ev)[1]


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    vectors: Sequence[torch.Tensor],
    *,
    train_mode: bool = False,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Hessian-vector product ``H v`` with ``H = Σ_b n_b ∇²L_b(w) / Σ_b n_b``.

    Computed per batch by double backward: ``∇_w (∇_w L_b(w) · v)`` (Pearlmutter 1994), then
    averaged with batch-size weights. ``vectors`` is a list of tensors shaped like the
    parameters that require grad (in ``model.parameters()`` order).
    """
    ev = Evaluator(model, loss_fn, data, train_mode=train_mode, seed=seed)
    vs = check_vectors(vectors, ev.params)
    with ev.session():
        return _Hessian(ev).matvec_list(vs)


# ----------------------------------------------------------------------------- Lanczos


def _breakdown_threshold(dtype: torch.dtype, scale: float) -> float:
    return 1e3 * torch.finfo(dtype).eps * max(scale, 1e-30)


def _lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    q0: torch.Tensor,
    num_iter: int,
    *,
    k: int | None = None,
    tol: float | None = None,
    on_step: Callable[[np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor, bool]:
    """Lanczos with full reorthogonalisation ("twice is enough" classical Gram-Schmidt).

    Returns ``(theta, S, Q, converged)``: Ritz values (ascending), the eigenvectors of the
    tridiagonal matrix T (columns), the Lanczos basis (rows) and whether the top ``k`` Ritz
    pairs met ``β_j |S[j, i]| ≤ tol · |θ_i|`` (the residual ‖H y_i − θ_i y_i‖ of Ritz pair i;
    for symmetric H some eigenvalue lies within that residual of θ_i).
    """
    dim = q0.numel()
    m = min(num_iter, dim)
    Q = torch.zeros(m, dim, dtype=q0.dtype, device=q0.device)
    alphas: list[float] = []
    betas: list[float] = []
    q = q0 / torch.linalg.vector_norm(q0)
    theta = np.zeros(0)
    S = np.zeros((0, 0))
    converged = False
    for j in range(m):
        Q[j] = q
        z = matvec(q)
        a = float(torch.dot(q, z))
        z = z - a * q
        if j > 0:
            z = z - betas[-1] * Q[j - 1]
        basis = Q[: j + 1]
        for _ in range(2):
            z = z - basis.T @ (basis @ z)
        b = float(torch.linalg.vector_norm(z))
        alphas.append(a)
        T = np.diag(np.array(alphas)) + np.diag(np.array(betas), 1) + np.diag(np.array(betas), -1)
        theta, S = np.linalg.eigh(T)
        if on_step is not None:
            on_step(theta)
        scale = float(np.max(np.abs(theta))) if theta.size else 0.0
        exhausted = b <= _breakdown_threshold(q0.dtype, scale) or j + 1 == dim
        if k is not None and tol is not None and j + 1 >= k:
            top = np.arange(j, j - k, -1)
            resid = b * np.abs(S[j, top])
            floor = math.sqrt(torch.finfo(q0.dtype).eps) * scale
            if exhausted or np.all(resid <= tol * np.maximum(np.abs(theta[top]), floor)):
                converged = True
                Q = Q[: j + 1]
                break
        if exhausted:
            converged = True
            Q = Q[: j + 1]
            break
        betas.append(b)
        q = z / b
    else:
        Q = Q[:m]
    return theta, S, Q, converged


#: Probe vectors per batch-major chunk in :func:`hessian_trace` (memory: that many gradients).
_TRACE_CHUNK = 8


def _check_reuse(reuse_graph: Any) -> None:
    if reuse_graph is not None and not isinstance(reuse_graph, bool):
        raise TypeError(f"reuse_graph must be None or a bool, got {reuse_graph!r}")


def _check_common(k_name: str, k: int, max_iter: int, tol: float) -> None:
    check_positive_int(k_name, k)
    check_positive_int("max_iter", max_iter)
    check_nonneg_float("tol", tol, strictly_positive=True)


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    k: int = 1,
    *,
    method: str = "lanczos",
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
    train_mode: bool = False,
    reuse_graph: bool | None = None,
) -> EigenResult:
    """Top-``k`` eigenvalues (largest first) and eigenvectors of the Hessian ``H``.

    ``method="lanczos"`` (default): Lanczos with full reorthogonalisation from a seeded
    Gaussian start vector; after each HVP the tridiagonal matrix ``T_j = Q_jᵀ H Q_j`` is
    diagonalised (``numpy.linalg.eigh``) and iteration stops once each of the ``k`` largest Ritz
    values ``θ_i`` has residual ``‖H y_i − θ_i y_i‖ = β_j |s_{j,i}| ≤ tol·|θ_i|`` — since H is
    symmetric an eigenvalue lies within that residual of ``θ_i`` (and the eigenvalue error is
    usually far smaller, ∝ residual²/gap). ``max_iter`` caps the Krylov dimension (it is also
    capped by the number of parameters ``D``). Memory: ``max_iter`` vectors of size ``D``.
    Returns the ``k`` largest *algebraic* eigenvalues.

    ``method="power"``: PyHessian-style power iteration with deflation: for each of the ``k``
    eigenvalues, start from a seeded Gaussian vector, orthogonalise against the eigenvectors
    already found, ``v ← Hv/‖Hv‖`` and stop when the Rayleigh quotient changes by less than
    ``tol`` relative (``|λ_t − λ_{t−1}| / (|λ_{t−1}| + 1e-6) < tol``) or after ``max_iter``
    HVPs per eigenvalue (PyHessian: ``maxIter=100, tol=1e-3``). Power iteration converges to
    the eigenvalues of largest *magnitude* (which may be negative); they are returned sorted in
    descending order.

    ``reuse_graph``: keep each batch's first-order graph (forward + backward with
    ``create_graph=True``) between HVPs, so that every HVP after the first costs only the second
    backward (≈ 2 gradient passes instead of ≈ 3); the memory of all batches' graphs is held at
    once. ``None`` (default): only when ``data`` is a single batch. Results are identical.

    Raises:
        ValueError: ``k < 1``, ``k`` larger than the number of parameters, unknown ``method``,
            ``max_iter < 1`` or ``tol <= 0``.
    """
    _check_common("k", k, max_iter, tol)
    check_choice("method", method, ("lanczos", "power"))
    check_seed(seed)
    _check_reuse(reuse_graph)
    ev = Evaluator(model, loss_fn, data, train_mode=train_mode, seed=seed)
    if k > ev.dim:
        raise ValueError(f"k={k} exceeds the number of parameters that require grad ({ev.dim})")
    gen = make_generator(seed)
    with ev.session():
        op = _Hessian(ev, reuse_graph)
        if method == "lanczos":
            history: list[float] = []
            iters = max(max_iter, k)
            theta, S, Q, converged = _lanczos(
                op.matvec,
                ev.rand_flat(gen),
                iters,
                k=k,
                tol=tol,
                on_step=lambda th: history.append(float(th[-1])),
            )
            if theta.size < k:  # invariant subspace smaller than k (degenerate start)
                raise RuntimeError(
                    f"Lanczos found an invariant subspace of dimension {theta.size} < k={k}"
                )
            order = np.argsort(theta)[::-1][:k]
            vals = [float(theta[i]) for i in order]
            S_t = torch.as_tensor(S[:, order], dtype=Q.dtype, device=Q.device)
            Y = Q.T @ S_t
            vecs = []
            for i in range(k):
                y = Y[:, i] / torch.linalg.vector_norm(Y[:, i])
                vecs.append([t.clone() for t in unflatten(y, ev.params)])
            return EigenResult(vals, vecs, op.num_hvp, converged, "lanczos", history)

        # power iteration with deflation
        found: list[torch.Tensor] = []
        values: list[float] = []
        history = []
        all_converged = True
        for idx in range(k):
            v = ev.rand_flat(gen)
            v = v / torch.linalg.vector_norm(v)
            lam: float | None = None
            ok = False
            for _ in range(max_iter):
                for u in found:
                    v = v - torch.dot(u, v) * u
                v = v / torch.linalg.vector_norm(v)
                hv = op.matvec(v)
                new = float(torch.dot(v, hv))
                if idx == 0:
                    history.append(new)
                norm = torch.linalg.vector_norm(hv)
                if float(norm) == 0.0:
                    lam, ok = 0.0, True
                    break
                v = hv / norm
                if lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol:
                    lam, ok = new, True
                    break
                lam = new
            for u in found:
                v = v - torch.dot(u, v) * u
            v = v / torch.linalg.vector_norm(v)
            found.append(v)
            values.append(float(lam))
            all_converged = all_converged and ok
        order = sorted(range(k), key=lambda i: -values[i])
        vecs = [[t.clone() for t in unflatten(found[i], ev.params)] for i in order]
        return EigenResult(
            [values[i] for i in order], vecs, op.num_hvp, all_converged, "power", history
        )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    num_samples: int = 100,
    *,
    seed: int = 0,
    train_mode: bool = False,
    reuse_graph: bool | None = None,
) -> TraceResult:
    """Hutchinson estimate of ``Tr(H) = E[zᵀHz]`` with Rademacher ``z`` (entries ±1).

    Uses exactly ``num_samples`` HVPs; ``std_error`` is the sample standard deviation over
    ``sqrt(num_samples)`` (nan for one sample). The variance of one sample is
    ``2 Σ_{i≠j} H_ij²`` (zero for a diagonal Hessian). The probe vectors are multiplied
    ``_TRACE_CHUNK`` at a time, batch-major: one first-order graph per batch serves the whole
    chunk (see ``reuse_graph`` in :func:`top_eigenvalues` for keeping it across chunks).
    """
    check_positive_int("num_samples", num_samples)
    check_seed(seed)
    _check_reuse(reuse_graph)
    ev = Evaluator(model, loss_fn, data, train_mode=train_mode, seed=seed)
    gen = make_generator(seed)
    samples: list[float] = []
    with ev.session():
        op = _Hessian(ev, reuse_graph)
        done = 0
        while done < num_samples:
            zs = [
                ev.rand_flat(gen, "rademacher")
                for _ in range(min(_TRACE_CHUNK, num_samples - done))
            ]
            hzs = op.matvec_many([unflatten(z, ev.params) for z in zs])
            samples.extend(float(torch.dot(z, flatten(hz))) for z, hz in zip(zs, hzs))
            done += len(zs)
    arr = np.array(samples, dtype=np.float64)
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")
    return TraceResult(float(arr.mean()), se, num_samples, samples)


def spectral_density(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    num_runs: int = 1,
    num_iter: int = 100,
    *,
    seed: int = 0,
    train_mode: bool = False,
    reuse_graph: bool | None = None,
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ubaru et al. 2017).

    For each run: ``num_iter`` Lanczos steps (full reorthogonalisation, capped at ``D``) from
    a normalised Rademacher vector ``q``; with ``T = S diag(θ) Sᵀ`` the quadrature
    ``qᵀ f(H) q ≈ Σ_i S[0,i]² f(θ_i)`` gives nodes ``θ_i`` and weights ``S[0,i]²``. Averaging
    over runs estimates ``Tr f(H) / D``. Uses ``num_runs · num_iter`` HVPs (fewer on an early
    invariant subspace). ``reuse_graph``: see :func:`top_eigenvalues`.
    """
    check_positive_int("num_runs", num_runs)
    check_positive_int("num_iter", num_iter)
    check_seed(seed)
    _check_reuse(reuse_graph)
    ev = Evaluator(model, loss_fn, data, train_mode=train_mode, seed=seed)
    gen = make_generator(seed)
    nodes, weights = [], []
    with ev.session():
        op = _Hessian(ev, reuse_graph)
        for _ in range(num_runs):
            theta, S, _, _ = _lanczos(op.matvec, ev.rand_flat(gen, "rademacher"), num_iter)
            nodes.append([float(x) for x in theta])
            weights.append([float(x) for x in S[0, :] ** 2])
    return SpectralDensity(nodes, weights, op.num_hvp)


def density_on_grid(
    result: SpectralDensity,
    grid: Sequence[float] | np.ndarray | None = None,
    *,
    num_points: int = 1000,
    sigma: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-smoothed SLQ density ``φ_σ(t) = (1/R) Σ_r Σ_i w_ri N(t; θ_ri, σ²)`` on a grid.

    Default ``sigma``: 1% of the node range (1e-3·max(1, |θ|) if all nodes coincide); default
    grid: ``num_points`` points covering the nodes ± (5% of the range + 5σ). The density
    integrates to 1 over the real line. Returns ``(grid, density)`` as numpy arrays.
    """
    if not isinstance(result, SpectralDensity):
        raise TypeError(f"result must be a SpectralDensity, got {type(result).__name__}")
    all_nodes = np.concatenate([np.asarray(n, dtype=np.float64) for n in result.nodes])
    lo, hi = float(all_nodes.min()), float(all_nodes.max())
    span = hi - lo
    if sigma is None:
        sigma = 0.01 * span if span > 0 else 1e-3 * max(1.0, abs(hi))
    sigma = check_nonneg_float("sigma", sigma, strictly_positive=True)
    if grid is None:
        check_positive_int("num_points", num_points, minimum=2)
        pad = 0.05 * span + 5 * sigma
        t = np.linspace(lo - pad, hi + pad, num_points)
    else:
        t = np.asarray(grid, dtype=np.float64)
    dens = np.zeros_like(t)
    for nodes, w in zip(result.nodes, result.weights):
        th = np.asarray(nodes)[None, :]
        wt = np.asarray(w)[None, :]
        dens += np.sum(wt * np.exp(-((t[:, None] - th) ** 2) / (2 * sigma**2)), axis=1)
    dens /= len(result.nodes) * sigma * math.sqrt(2 * math.pi)
    return t, dens
