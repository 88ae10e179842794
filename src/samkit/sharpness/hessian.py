"""Second-order quantities of the loss: gradient, Hessian-vector products, top eigenvalues,
trace and spectral density.

All functions work with the Hessian of the batch-size-weighted mean loss over ``data``,

    L(w) = Σ_b n_b L_b(w) / Σ_b n_b,    H = ∇²L(w) = Σ_b n_b ∇²L_b(w) / Σ_b n_b,

restricted to the parameters that require grad. One *HVP* is one product ``H v``, i.e. one pass
over all of ``data`` (forward, backward with ``create_graph=True`` and a second backward per
batch — Pearlmutter's trick, "double backward").

``params=`` restricts every function to a block of parameters (the diagonal block ``H_BB``);
under ``torch.distributed`` the batches are those of every process and the vectors are this
process's elements (shards, for DTensor parameters): see :mod:`samkit.sharpness._distributed`.

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
* R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff, "Hutch++: Optimal Stochastic Trace
  Estimation", SOSA 2021.
* K. Wu, H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems",
  SIAM J. Matrix Anal. Appl. 22(2), 2000.
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
    grads_or_zeros,
    make_generator,
    math_attention,
)

__all__ = [
    "DEFAULT_TRACE_METHOD",
    "EigenResult",
    "SpectralDensity",
    "TRACE_METHODS",
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
    """Stochastic estimate of Tr(H) (see :func:`hessian_trace`).

    Attributes:
        trace: the estimate.
        std_error: standard error (Hutch++: of the deflated remainder's mean, given the
            sketch).
        num_samples: HVPs used.
        samples: the Hutchinson samples ``zᵀHz`` (Hutch++: those of the deflated remainder).
        method: ``"hutchinson"`` or ``"hutch++"``.
        low_rank_trace: Hutch++'s ``tr(QᵀHQ)`` over the sketch's basis (else None).
    """

    trace: float
    std_error: float
    num_samples: int
    samples: list[float] = field(default_factory=list)
    method: str = "hutchinson"
    low_rank_trace: float | None = None

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

    Vectors are this process's elements (:class:`~samkit.sharpness._distributed.Space`): the
    whole vector for plain parameters, the shards for DTensor parameters. Under several
    processes each product is the sum over every process's batches, reduced once per call of
    :meth:`matvec_many` (one all-reduce of the partial products and the sample count; for
    sharded parameters a reduce-scatter per parameter).

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
            grads = torch.autograd.grad(loss, ev.compute, create_graph=True, allow_unused=True)
        # gradients that are constant in w (or unused parameters) add nothing to H v
        keep = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
        return [grads[j] for j in keep], keep

    def matvec_many(self, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[H v for v in flats]`` (flat vectors of this process's elements); counts
        ``len(flats)`` HVPs."""
        ev = self.ev
        space = ev.space
        k = len(flats)
        vector_sets = [space.to_compute(v) for v in flats]
        accs = [[torch.zeros_like(c) for c in ev.compute] for _ in range(k)]

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
        error: Exception | None = None
        try:
            for n, grads, keep in batches():
                if keep:
                    for s, (acc, vs) in enumerate(zip(accs, vector_sets)):
                        retain = self.reuse_graph or s < k - 1
                        hv = torch.autograd.grad(
                            grads,
                            ev.compute,
                            grad_outputs=[vs[j] for j in keep],
                            retain_graph=retain,
                            allow_unused=True,
                        )
                        for a, h in zip(acc, hv):
                            if h is not None:
                                a.add_(h.detach(), alpha=float(n))
                total += n
        except Exception as e:  # raised on every process by the reduction
            if space.comm is None:
                raise
            error = e
        if cache is not None and error is None:
            self._graphs = cache
        outs, (total_all,) = space.reduce(accs, [float(total)], error, "a Hessian-vector product")
        self.num_hvp += k
        return [o / total_all for o in outs]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec_many([v])[0]


def _loss_and_gradient(ev: Evaluator) -> tuple[float, torch.Tensor]:
    """The mean loss and the flat gradient (this process's elements) over every batch."""
    acc = [torch.zeros_like(p) for p in ev.compute]
    total, loss_sum = 0, 0.0
    error: Exception | None = None
    try:
        for i, inputs, targets, n in ev.batches():
            loss = ev.loss(i, inputs, targets)
            grads = grads_or_zeros(
                torch.autograd.grad(loss, ev.compute, allow_unused=True), ev.compute
            )
            for a, g in zip(acc, grads):
                a.add_(g.detach(), alpha=float(n))
            loss_sum += float(loss.detach()) * n
            total += n
    except Exception as e:
        if ev.comm is None:
            raise
        error = e
    (flat,), (loss_sum, total) = ev.space.reduce(
        [acc], [loss_sum, float(total)], error, "the gradient"
    )
    return loss_sum / total, flat / total


def _outputs(ev: Evaluator, flat: torch.Tensor) -> list[torch.Tensor]:
    """A flat vector as a new list shaped (and laid out) like the measured parameters."""
    return [t.clone() for t in ev.space.unflatten(flat)]


def gradient(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    train_mode: bool = False,
    seed: int = 0,
    params: Any = None,
    distributed: Any = None,
) -> list[torch.Tensor]:
    """Gradient ``∇L(w) = Σ_b n_b ∇L_b(w) / Σ_b n_b`` of the batch-size-weighted mean loss.

    Returns one tensor per measured parameter (``.grad`` is not touched): by default every
    parameter that requires grad; ``params`` restricts it (a module or parameter name, a
    submodule, parameters, a parameter group). ``distributed``: see the module docstring.
    """
    ev = Evaluator(
        model, loss_fn, data, train_mode=train_mode, seed=seed, params=params,
        distributed=distributed, measure="gradient",
    )  # fmt: skip
    with ev.session():
        return _outputs(ev, _loss_and_gradient(ev)[1])


def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    vectors: Sequence[torch.Tensor],
    *,
    train_mode: bool = False,
    seed: int = 0,
    params: Any = None,
    distributed: Any = None,
) -> list[torch.Tensor]:
    """Hessian-vector product ``H v`` with ``H = Σ_b n_b ∇²L_b(w) / Σ_b n_b``.

    Computed per batch by double backward: ``∇_w (∇_w L_b(w) · v)`` (Pearlmutter 1994), then
    averaged with batch-size weights. ``vectors`` is a list of tensors shaped like the measured
    parameters (those that require grad, in ``model.parameters()`` order, or the ``params``
    selection, whose block ``H_BB`` of the Hessian is then used); for sharded (DTensor)
    parameters, DTensors laid out like them.
    """
    holder: list[torch.Tensor] = []

    def validate(ev: Evaluator) -> None:
        holder.append(ev.space.check_vectors(vectors, "vectors"))

    ev = Evaluator(
        model, loss_fn, data, train_mode=train_mode, seed=seed, params=params,
        distributed=distributed, measure="hvp", validate=validate,
    )  # fmt: skip
    with ev.session():
        return _outputs(ev, _Hessian(ev).matvec(holder[0]))


# ----------------------------------------------------------------------------- Lanczos


def _breakdown_threshold(dtype: torch.dtype, scale: float) -> float:
    return 1e3 * torch.finfo(dtype).eps * max(scale, 1e-30)


def _kept(k: int, cap: int) -> int:
    """Ritz vectors kept at a thick restart: the ``k`` wanted ones and about half of the
    rest of the basis, leaving room for at least two new Lanczos vectors."""
    return max(k, min((cap + k) // 2, cap - 2))


def _combine_rows(V: torch.Tensor, n: int, C: np.ndarray) -> None:
    """In place ``V[:m] = Cᵀ V[:n]`` (``C`` is n × m, m ≤ n), column block by column block
    so that the temporary is small (the basis is never copied whole)."""
    m = C.shape[1]
    Ct = torch.as_tensor(np.ascontiguousarray(C.T), dtype=V.dtype, device=V.device)
    step = max(1, (1 << 22) // max(n, 1))
    for s in range(0, V.shape[1], step):
        V[:m, s : s + step] = Ct @ V[:n, s : s + step]


class _Basis:
    """Lanczos vectors as rows of blocks of ``block`` rows, allocated when first needed, so
    that the memory held is that of the vectors stored (rounded up to a block), not of the
    most there could be. A bounded basis is one block of ``cap`` rows."""

    def __init__(self, like: torch.Tensor, cap: int, block: int = 16) -> None:
        self.like, self.cap, self.block = like, cap, min(block, cap)
        self.blocks: list[torch.Tensor] = []

    def _room(self, i: int) -> tuple[torch.Tensor, int]:
        b, r = divmod(i, self.block)
        while len(self.blocks) <= b:
            rows = min(self.block, self.cap - len(self.blocks) * self.block)
            self.blocks.append(self.like.new_zeros((rows, self.like.numel())))
        return self.blocks[b], r

    def __setitem__(self, i: int, v: torch.Tensor) -> None:
        blk, r = self._room(i)
        blk[r] = v

    def __getitem__(self, i: int) -> torch.Tensor:
        blk, r = self._room(i)
        return blk[r]

    def rows(self, n: int) -> list[torch.Tensor]:
        """Views of the first ``n`` rows, block by block."""
        out, left = [], n
        for blk in self.blocks:
            if left <= 0:
                break
            out.append(blk[: min(left, blk.shape[0])])
            left -= out[-1].shape[0]
        return out

    def combine(self, coeffs: np.ndarray, n: int) -> torch.Tensor:
        """``Σ_i coeffs[i] · row_i`` over the first ``n`` rows."""
        out, pos = None, 0
        for blk in self.rows(n):
            c = torch.as_tensor(
                coeffs[pos : pos + blk.shape[0]], dtype=blk.dtype, device=blk.device
            )
            part = c @ blk
            out = part if out is None else out + part
            pos += blk.shape[0]
        return out


def _lanczos(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    q0: torch.Tensor,
    num_iter: int,
    space: Any,
    *,
    k: int | None = None,
    tol: float | None = None,
    max_vectors: int | None = None,
    on_step: Callable[[np.ndarray], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor, bool, int]:
    """Lanczos with full reorthogonalisation against the kept basis, and thick restart.

    Each step multiplies the newest basis vector ``q``, orthogonalises ``z = Hq`` against
    the whole basis twice ("twice is enough" classical Gram–Schmidt) and records the
    coefficients as column ``h = Vz`` of the projected matrix ``T = V H Vᵀ``. Without restart
    ``T`` is the Lanczos tridiagonal matrix. With ``max_vectors`` smaller than the number of
    steps the basis is restarted when full (thick restart, Wu & Simon 2000): ``T`` is
    diagonalised, the basis is replaced in place by its :func:`_kept` Ritz vectors of largest
    Ritz value, ``T`` by their Ritz values, and Lanczos continues from the residual; the
    couplings of the kept Ritz vectors with the next vector (β times the last components of
    their eigenvectors) appear in the next ``h``. At most ``max_vectors`` vectors are held.

    Returns ``(theta, S, V, converged, restarts)``: Ritz values (ascending), the eigenvectors
    of ``T`` (columns), the basis (a :class:`_Basis` of ``len(theta)`` rows) and whether the top ``k`` Ritz pairs met
    ``β |S[last, i]| ≤ tol · |θ_i|`` (the residual ‖H y_i − θ_i y_i‖ of Ritz pair i — in both
    modes ``H Vᵀ = Vᵀ T + z e_lastᵀ``; for symmetric H some eigenvalue lies within that
    residual of θ_i).
    """
    dim = space.dim
    restarting = max_vectors is not None and max_vectors < min(num_iter, dim)
    total = num_iter if restarting else min(num_iter, dim)
    cap = min(max_vectors, total) if restarting else total
    V = _Basis(q0, cap, block=cap if restarting else 16)
    T = np.zeros((cap, cap))
    q = q0 / space.norm(q0)
    theta, S = np.zeros(0), np.zeros((0, 0))
    converged, n, restarts = False, 0, 0
    for _ in range(total):
        if n == cap:  # thick restart (only reached when restarting)
            theta_f, S_f = np.linalg.eigh(T[:n, :n])
            kept = _kept(k or 1, cap)
            _combine_rows(V.blocks[0], n, S_f[:, n - kept :])
            T[:] = 0.0
            T[np.arange(kept), np.arange(kept)] = theta_f[n - kept :]
            n, restarts = kept, restarts + 1
        V[n] = q
        z = matvec(q)
        basis = V.rows(n + 1)
        h = space.dots(basis, z)
        z = z - V.combine(h, n + 1)
        h2 = space.dots(basis, z)
        z = z - V.combine(h2, n + 1)
        h = h + h2
        b = space.norm(z)
        T[: n + 1, n] = h
        T[n, : n + 1] = h
        n += 1
        theta, S = np.linalg.eigh(T[:n, :n])
        if on_step is not None:
            on_step(theta)
        scale = float(np.max(np.abs(theta))) if theta.size else 0.0
        exhausted = b <= _breakdown_threshold(q0.dtype, scale) or (not restarting and n == dim)
        if k is not None and tol is not None and n >= k:
            top = np.arange(n - 1, n - 1 - k, -1)
            resid = b * np.abs(S[n - 1, top])
            floor = math.sqrt(torch.finfo(q0.dtype).eps) * scale
            if exhausted or np.all(resid <= tol * np.maximum(np.abs(theta[top]), floor)):
                converged = True
                break
        if exhausted:
            converged = True
            break
        q = z / b
    return theta, S, V, converged, restarts


def _lanczos_quadrature(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    q0: torch.Tensor,
    num_iter: int,
    space: Any,
    max_vectors: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Lanczos for quadrature: the tridiagonal matrix of ``num_iter`` steps from ``q0``,
    each new vector reorthogonalised (twice) against the last ``max_vectors`` vectors
    (all when None). Returns ``(theta, S)`` of the tridiagonal matrix."""
    dim = space.dim
    total = min(num_iter, dim)
    cap = total if max_vectors is None else max(2, min(max_vectors, total))
    V = _Basis(q0, cap, block=16 if max_vectors is None else cap)
    alphas: list[float] = []
    betas: list[float] = []
    q = q0 / space.norm(q0)
    theta, S = np.zeros(0), np.zeros((0, 0))
    for j in range(total):
        slot = j % cap
        V[slot] = q
        z = matvec(q)
        a = space.dot(q, z)
        z = z - a * q
        if j > 0:
            z = z - betas[-1] * V[(j - 1) % cap]
        held = min(j + 1, cap)
        for _ in range(2):
            z = z - V.combine(space.dots(V.rows(held), z), held)
        b = space.norm(z)
        alphas.append(a)
        T = np.diag(np.array(alphas)) + np.diag(np.array(betas), 1) + np.diag(np.array(betas), -1)
        theta, S = np.linalg.eigh(T)
        scale = float(np.max(np.abs(theta))) if theta.size else 0.0
        if b <= _breakdown_threshold(q0.dtype, scale) or j + 1 == dim:
            break
        betas.append(b)
        q = z / b
    return theta, S


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
    max_vectors: int | None = None,
    params: Any = None,
    distributed: Any = None,
) -> EigenResult:
    """Top-``k`` eigenvalues (largest first) and eigenvectors of the Hessian ``H``.

    ``method="lanczos"`` (default): Lanczos with full reorthogonalisation from a seeded
    Gaussian start vector; after each HVP the projected matrix ``T_j = Q_j H Q_jᵀ`` is
    diagonalised (``numpy.linalg.eigh``) and iteration stops once each of the ``k`` largest Ritz
    values ``θ_i`` has residual ``‖H y_i − θ_i y_i‖ = β_j |s_{j,i}| ≤ tol·|θ_i|`` — since H is
    symmetric an eigenvalue lies within that residual of ``θ_i`` (and the eigenvalue error is
    usually far smaller, ∝ residual²/gap). ``max_iter`` caps the HVPs (and, without a bound on
    the vectors, the Krylov dimension, also capped by the number of parameters ``D``). Returns
    the ``k`` largest *algebraic* eigenvalues.

    Memory: ``max_vectors=None`` (default) keeps every Lanczos vector (up to ``max_iter``
    vectors of size ``D``: exact Lanczos with full reorthogonalisation). ``max_vectors=m``
    keeps at most ``m`` (``m ≥ k + 2``) and restarts the basis when it is full: thick restart
    (K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
    problems", SIAM J. Matrix Anal. Appl. 22(2), 2000), keeping the ``k`` wanted Ritz vectors
    and about half of the rest of the basis, with full reorthogonalisation within it. The
    stopping rule is the same residual, so the accuracy is the same; it may take more HVPs.

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

    ``params`` restricts the measurement to a block of parameters (a module or parameter name,
    a submodule, parameters, an optimizer parameter group): the eigenvalues of the diagonal
    block ``H_BB``. ``distributed``: under ``torch.distributed`` (default ``None``: when it is
    initialised), the Hessian of the union of every process's batches, the same result on
    every process (``False``: this process's batches).

    Raises:
        ValueError: ``k < 1``, ``k`` larger than the number of parameters, unknown ``method``,
            ``max_iter < 1``, ``tol <= 0`` or ``max_vectors < k + 2``.
    """

    def checks() -> None:
        _check_common("k", k, max_iter, tol)
        check_choice("method", method, ("lanczos", "power"))
        check_seed(seed)
        _check_reuse(reuse_graph)
        if max_vectors is not None:
            check_positive_int("max_vectors", max_vectors, minimum=k + 2)

    def validate(ev: Evaluator) -> None:
        if k > ev.dim:
            raise ValueError(f"k={k} exceeds the number of parameters measured ({ev.dim})")

    ev = Evaluator(
        model, loss_fn, data, train_mode=train_mode, seed=seed, params=params,
        distributed=distributed, measure="top_eigenvalues",
        settings=(k, method, max_iter, tol, max_vectors), checks=checks, validate=validate,
    )  # fmt: skip
    space = ev.space
    gen = make_generator(seed)
    with ev.session():
        op = _Hessian(ev, reuse_graph)
        if method == "lanczos":
            history: list[float] = []
            iters = max(max_iter, k)
            theta, S, Q, converged, _ = _lanczos(
                op.matvec,
                ev.rand_flat(gen),
                iters,
                space,
                k=k,
                tol=tol,
                max_vectors=max_vectors,
                on_step=lambda th: history.append(float(th[-1])),
            )
            if theta.size < k:  # invariant subspace smaller than k (degenerate start)
                raise RuntimeError(
                    f"Lanczos found an invariant subspace of dimension {theta.size} < k={k}"
                )
            order = np.argsort(theta)[::-1][:k]
            vals = [float(theta[i]) for i in order]
            Y = [Q.combine(S[:, i], theta.size) for i in order]
            vecs = [_outputs(ev, y / space.norm(y)) for y in Y]
            return EigenResult(vals, vecs, op.num_hvp, converged, "lanczos", history)

        # power iteration with deflation
        found: list[torch.Tensor] = []
        values: list[float] = []
        history = []
        all_converged = True

        def deflate(v: torch.Tensor) -> torch.Tensor:
            for u in found:
                v = v - space.dot(u, v) * u
            return v

        for idx in range(k):
            v = ev.rand_flat(gen)
            v = v / space.norm(v)
            lam: float | None = None
            ok = False
            for _ in range(max_iter):
                v = deflate(v)
                v = v / space.norm(v)
                hv = op.matvec(v)
                new = space.dot(v, hv)
                if idx == 0:
                    history.append(new)
                norm = space.norm(hv)
                if norm == 0.0:
                    lam, ok = 0.0, True
                    break
                v = hv / norm
                if lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol:
                    lam, ok = new, True
                    break
                lam = new
            v = deflate(v)
            v = v / space.norm(v)
            found.append(v)
            values.append(float(lam))
            all_converged = all_converged and ok
        order = sorted(range(k), key=lambda i: -values[i])
        vecs = [_outputs(ev, found[i]) for i in order]
        return EigenResult(
            [values[i] for i in order], vecs, op.num_hvp, all_converged, "power", history
        )


#: Trace estimators of :func:`hessian_trace`, and the default (with at least 3 HVPs; chosen
#: by ``benchmarks/trace_estimators.py``: on the embedded CNN and on a decaying spectrum
#: Hutch++ has the smaller error from 20 HVPs on, see docs/sharpness.md).
TRACE_METHODS = ("hutchinson", "hutch++")
DEFAULT_TRACE_METHOD = "hutch++"


def _trace_method(method: str | None, num_samples: int) -> str:
    """``method``, or for None the default (Hutchinson below 3 HVPs, which Hutch++ needs)."""
    if method is not None:
        return method
    return DEFAULT_TRACE_METHOD if num_samples >= 3 else "hutchinson"


def _orthonormal(space: Any, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """An orthonormal basis of the span of ``vectors`` (classical Gram–Schmidt, twice; a
    vector whose remainder is below rounding relative to its norm is left out)."""
    basis: list[torch.Tensor] = []
    for v in vectors:
        size = space.norm(v)
        if size == 0.0:
            continue
        for _ in range(2):
            if basis:
                B = torch.stack(basis)
                v = v - torch.as_tensor(space.dots(B, v), dtype=v.dtype, device=v.device) @ B
        rest = space.norm(v)
        if rest > _breakdown_threshold(v.dtype, size):
            basis.append(v / rest)
    return basis


def _chunked(op: _Hessian, vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for s in range(0, len(vectors), _TRACE_CHUNK):
        out.extend(op.matvec_many(vectors[s : s + _TRACE_CHUNK]))
    return out


def _hutchpp(
    ev: Evaluator, op: _Hessian, gen: torch.Generator, m: int
) -> tuple[float, list[float]]:
    """Hutch++ with ``m`` HVPs: ``(tr(QᵀHQ), samples of the deflated remainder)``."""
    space = ev.space
    s = m // 3
    sketch = _chunked(op, [ev.rand_flat(gen, "rademacher") for _ in range(s)])
    Q = _orthonormal(space, sketch)
    del sketch
    low_rank = 0.0
    for c in range(0, len(Q), _TRACE_CHUNK):
        part = Q[c : c + _TRACE_CHUNK]
        low_rank += float(np.sum(space.pair_dots(part, op.matvec_many(part))))
    samples: list[float] = []
    left = m - s - len(Q)  # the HVPs a rank-deficient sketch did not need go to the remainder
    B = torch.stack(Q) if Q else None
    while left > 0:
        gs = [ev.rand_flat(gen, "rademacher") for _ in range(min(_TRACE_CHUNK, left))]
        if B is not None:
            gs = [
                g - torch.as_tensor(space.dots(B, g), dtype=g.dtype, device=g.device) @ B
                for g in gs
            ]
        samples.extend(float(x) for x in space.pair_dots(gs, op.matvec_many(gs)))
        left -= len(gs)
    return low_rank, samples


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    num_samples: int = 100,
    *,
    method: str | None = None,
    seed: int = 0,
    train_mode: bool = False,
    reuse_graph: bool | None = None,
    params: Any = None,
    distributed: Any = None,
) -> TraceResult:
    """Stochastic estimate of ``Tr(H)`` with exactly ``num_samples`` HVPs.

    ``method="hutchinson"``: ``Tr(H) = E[zᵀHz]`` with Rademacher ``z`` (entries ±1): the mean
    of ``num_samples`` samples ``zᵀHz`` (M. F. Hutchinson, "A stochastic estimator of the
    trace of the influence matrix for Laplacian smoothing splines", 1989). The variance of one
    sample is ``2 Σ_{i≠j} H_ij²`` (zero for a diagonal Hessian).

    ``method="hutch++"`` (``num_samples ≥ 3``): Hutch++ (R. A. Meyer, C. Musco, C. Musco,
    D. P. Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021). With
    ``s = num_samples // 3``: ``Q`` = an orthonormal basis of ``H S`` for a Rademacher sketch
    ``S`` of ``s`` columns (``s`` HVPs), ``t₁ = tr(QᵀHQ)`` (``s`` HVPs), and the remaining
    HVPs estimate the trace of the deflated ``(I − QQᵀ) H (I − QQᵀ)`` by Hutchinson with
    Rademacher vectors projected off ``Q``; estimate ``t₁ + mean``. It is unbiased for any
    symmetric ``H`` (indefinite included); for a Hessian dominated by a few large eigenvalues
    the deflated remainder has a much smaller variance, so it needs far fewer HVPs for the
    same error (O(1/ε) instead of O(1/ε²) for PSD H). If the sketch has rank below ``s`` the
    HVPs it did not need go to the remainder.

    ``std_error``: the sample standard deviation of the Hutchinson samples (for Hutch++ those
    of the deflated remainder, given ``Q``) over the square root of their number (nan for one
    sample). The probe vectors are multiplied ``_TRACE_CHUNK`` at a time, batch-major: one
    first-order graph per batch serves the whole chunk (see ``reuse_graph`` in
    :func:`top_eigenvalues` for keeping it across chunks). ``method=None`` (default):
    ``"hutch++"`` (``DEFAULT_TRACE_METHOD``), or ``"hutchinson"`` for fewer than 3 HVPs; on the
    embedded CNN Hutch++ has 2–3× smaller errors at 20–100 HVPs (``docs/sharpness.md``).
    ``params``/``distributed``: see :func:`top_eigenvalues`.
    """
    chosen = _trace_method(method, num_samples) if isinstance(num_samples, int) else method

    def checks() -> None:
        check_positive_int("num_samples", num_samples)
        check_choice("method", chosen, TRACE_METHODS)
        if chosen == "hutch++" and num_samples < 3:
            raise ValueError(
                f"num_samples must be >= 3 for method='hutch++' (a third each for the sketch, "
                f"its products and the remainder), got {num_samples!r}"
            )
        check_seed(seed)
        _check_reuse(reuse_graph)

    ev = Evaluator(
        model, loss_fn, data, train_mode=train_mode, seed=seed, params=params,
        distributed=distributed, measure="hessian_trace", settings=(num_samples, chosen),
        checks=checks,
    )  # fmt: skip
    gen = make_generator(seed)
    low_rank: float | None = None
    with ev.session():
        op = _Hessian(ev, reuse_graph)
        if chosen == "hutch++":
            low_rank, samples = _hutchpp(ev, op, gen, num_samples)
        else:
            samples = []
            done = 0
            while done < num_samples:
                zs = [
                    ev.rand_flat(gen, "rademacher")
                    for _ in range(min(_TRACE_CHUNK, num_samples - done))
                ]
                samples.extend(float(x) for x in ev.space.pair_dots(zs, op.matvec_many(zs)))
                done += len(zs)
    arr = np.array(samples, dtype=np.float64)
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else float("nan")
    mean = float(arr.mean()) if arr.size else 0.0
    trace = mean if low_rank is None else low_rank + mean
    return TraceResult(trace, se, num_samples, samples, chosen, low_rank)


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
    max_vectors: int | None = None,
    params: Any = None,
    distributed: Any = None,
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ubaru et al. 2017).

    For each run: ``num_iter`` Lanczos steps (capped at ``D``) from a normalised Rademacher
    vector ``q``; with the tridiagonal ``T = S diag(θ) Sᵀ`` the quadrature
    ``qᵀ f(H) q ≈ Σ_i S[0,i]² f(θ_i)`` gives nodes ``θ_i`` and weights ``S[0,i]²``. Averaging
    over runs estimates ``Tr f(H) / D``. Uses ``num_runs · num_iter`` HVPs (fewer on an early
    invariant subspace). ``reuse_graph``, ``params``, ``distributed``: see
    :func:`top_eigenvalues`.

    Memory: each new Lanczos vector is reorthogonalised against every earlier one
    (``max_vectors=None``, default: ``num_iter`` vectors held) or only against the last
    ``max_vectors`` (≥ 2; a restart would change the quadrature, so the window slides
    instead). The quadrature's moments ``Σ w θ^p`` stay close to ``qᵀH^pq`` without full
    reorthogonalisation (Lanczos in finite precision still gives accurate Gauss quadrature),
    at the price of repeated copies of converged outer eigenvalues among the nodes.
    """

    def checks() -> None:
        check_positive_int("num_runs", num_runs)
        check_positive_int("num_iter", num_iter)
        check_seed(seed)
        _check_reuse(reuse_graph)
        if max_vectors is not None:
            check_positive_int("max_vectors", max_vectors, minimum=2)

    ev = Evaluator(
        model, loss_fn, data, train_mode=train_mode, seed=seed, params=params,
        distributed=distributed, measure="spectral_density",
        settings=(num_runs, num_iter, max_vectors), checks=checks,
    )  # fmt: skip
    gen = make_generator(seed)
    nodes, weights = [], []
    with ev.session():
        op = _Hessian(ev, reuse_graph)
        for _ in range(num_runs):
            theta, S = _lanczos_quadrature(
                op.matvec, ev.rand_flat(gen, "rademacher"), num_iter, ev.space, max_vectors
            )
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
