"""What SAM does to sharpness, checked against the theory of Wen, Ma & Li (ICLR 2023), with
samkit's own optimizer (``samkit.SAM``, plain SGD base, no momentum) and measured with
``samkit.sharpness``.

* Thm 4.8: full-batch SAM on L = ½wᵀAw (ηλ₁ < 1) ends in a 2-cycle along the top eigenvector
  v₁ with ‖w‖ = ηρλ₁/(2−ηλ₁). At w = c·v₁ one SAM step gives c' = c(1−ηλ₁) − ηλ₁ρ·sign(c),
  whose 2-cycle (c' = −c) has |c| = ηρλ₁/(2−ηλ₁).
* The toy model of their Fig. 1: L(x) = F₁(x₁,x₂)·x₃² + F₂(x₁,x₂)·x₄², the mean of the
  per-sample losses ℓ₁ = 2F₁x₃² and ℓ₂ = 2F₂x₄². On the manifold of minimisers x₃ = x₄ = 0 the
  Hessian is diag(0, 0, 2F₁, 2F₂): λ₁ = 2·max(F₁, F₂), Tr = 2(F₁ + F₂). Full-batch SAM follows
  the manifold downhill in λ₁, SAM with batch size 1 (one of ℓ₁, ℓ₂ per step, for both the
  ascent and the update) downhill in the trace.

Design of the toy (see ``F``): F₁ = 2 + x₁² + x₂², F₂ = e^{−2x₁}(1 + x₂²). For x₁ ≥ 0 (the
whole trajectory) F₁ > F₂, so λ₁ = 2F₁ has a spectral gap — Wen et al.'s full-batch result
assumes one — and is minimised at x₁ = x₂ = 0, while Tr = 2(F₁+F₂) is minimised at x₂ = 0,
x₁ = x* with x* = e^{−2x*} (x* = 0.4263). A first design with F₁ = e^{x₁}, F₂ = e^{−2x₁} (λ₁
minimised where F₁ = F₂ cross) was inconclusive: at a crossing there is no gap; full-batch SAM
oscillates along the top coordinate only, the other one decays to ~1e-270 and needs hundreds of
steps to regrow once it becomes the top one, so x₁ overshoots the crossing and cycles over
[−0.19, 0.19] (η = 0.05, ρ = 0.1) instead of settling at 0.

Why the parameters (η = 0.01, ρ = 1): L is exactly quadratic in x₃, x₄ for fixed x₁, x₂ and the
SAM perturbation is (almost exactly) along x₃/x₄, so a large ρ is harmless, and the drift along
the manifold, of order ηρ²∇F per step, is fast. The oscillation amplitude of x₃ (relative to ρ)
is a = ηλ/(2−ηλ), which weights F₁ and F₂ by (1 + aᵢ)² in the drift: a first-order-in-η bias
that shifts 1-SAM's stationary point from x* = 0.4263 to 0.411 (``_biased_stationary_point``),
which is what the runs show (mean over 40 seeds of the numpy version of this loop: 0.411, sd of
the time average 0.015).
"""

from __future__ import annotations

import math

import torch
from torch import nn

import samkit
import samkit.sharpness as S

# ----------------------------------------------------------------------------- Thm 4.8

D = 10
# The components along v_i (i > 1) die out at a rate ≈ ηλ_i per step, so the smallest eigenvalue
# sets the number of steps (0.5 here: 1000 steps shrink them by e^{-45}).
LAM = torch.tensor([10.0, 6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.8, 0.6, 0.5], dtype=torch.float64)


class Quadratic(nn.Module):
    def __init__(self, A: torch.Tensor, w: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.w = nn.Parameter(w.clone())

    def forward(self, _x):
        return 0.5 * self.w @ self.A @ self.w


def _identity_loss(out, _targets):
    return out


def test_full_batch_sam_on_a_quadratic_ends_in_the_two_cycle_along_v1():
    g = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    A = q @ torch.diag(LAM) @ q.T
    A = (A + A.T) / 2
    v1, lam1 = q[:, 0], float(LAM[0])
    eta, rho = 0.09, 0.1  # ηλ₁ = 0.9 < 1
    model = Quadratic(A, torch.randn(D, generator=torch.Generator().manual_seed(2), dtype=A.dtype))
    w = model.w
    start_cos = abs(float(w.detach() @ v1)) / float(w.detach().norm())
    assert start_cos < 0.5  # a generic start, not already aligned

    opt = samkit.SAM([w], "sgd", rho=rho, lr=eta)

    def closure():
        opt.zero_grad()
        loss = model(None)
        loss.backward()
        return loss

    for _ in range(1000):
        opt.step(closure)
    w_prev = w.detach().clone()
    opt.step(closure)
    w_end = w.detach().clone()

    radius = eta * rho * lam1 / (2 - eta * lam1)
    off_v1 = w_end - (w_end @ v1) * v1
    assert float(off_v1.norm()) < 1e-10 * radius  # |cos(w, v₁)| = 1 to ~1e-20
    assert abs(float(w_end.norm()) / radius - 1) < 1e-9
    torch.testing.assert_close(w_end, -w_prev, rtol=0, atol=1e-9 * radius)  # the 2-cycle
    # plain GD with the same η converges to 0: the cycle is SAM's doing
    assert float(w_end.norm()) > 0.03

    # samkit.sharpness at the end point agrees with the closed forms
    data = [(torch.zeros(1), torch.zeros(1))]
    eig = S.top_eigenvalues(model, _identity_loss, data, k=1, tol=1e-10, max_iter=D)
    assert abs(eig.eigenvalues[0] - lam1) < 1e-8 * lam1
    align = S.gradient_eigenvector_alignment(model, _identity_loss, data)
    assert align.cosine > 1 - 1e-6
    # worst direction at w = c·v₁, radius r: max_{‖δ‖≤r} ½(w+δ)ᵀA(w+δ) − ½wᵀAw = λ₁(|c|r + r²/2)
    r = 0.05
    worst = S.worst_direction_sharpness(model, _identity_loss, data, rho=r).value
    c = float(w_end.norm())
    assert abs(worst / (lam1 * (c * r + r * r / 2)) - 1) < 1e-4
    # the same measure at the minimum w = 0 is ρ²λ₁/2: SAM's cycle sits above it by λ₁|c|r
    assert worst > lam1 * r * r / 2 * 1.5


# ----------------------------------------------------------------------------- toy model

ETA, RHO = 0.01, 1.0
START = (1.0, 0.5, 0.3, 0.3)
STEPS_FULL, STEPS_ONE = 1000, 1500


def F(x1, x2):
    """(F₁, F₂) as tensors or floats."""
    exp = torch.exp if isinstance(x1, torch.Tensor) else math.exp
    return 2 + x1**2 + x2**2, exp(-2 * x1) * (1 + x2**2)


class Toy(nn.Module):
    """Parameter x ∈ R⁴; forward(indices) returns the per-sample losses ℓ_i, i ∈ {0, 1}."""

    def __init__(self, x):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x, dtype=torch.float64))

    def forward(self, idx):
        x1, x2, x3, x4 = self.x
        f1, f2 = F(x1, x2)
        losses = torch.stack([2 * f1 * x3**2, 2 * f2 * x4**2])
        return losses[idx]


def _mean_loss(out, _targets):
    return out.mean()


FULL = torch.tensor([0, 1])


def _train(batch_size_one: bool, steps: int, seed: int = 0) -> torch.Tensor:
    """SAM iterates (steps × 4): full batch, or one sample per step drawn uniformly."""
    model = Toy(START)
    opt = samkit.SAM(model.parameters(), "sgd", rho=RHO, lr=ETA)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, 2, (steps, 1), generator=g)
    idx = FULL
    traj = torch.empty(steps, 4, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = model(idx).mean()
        loss.backward()
        return loss

    for t in range(steps):
        if batch_size_one:
            idx = picks[t]
        opt.step(closure)
        traj[t] = model.x.detach()
    assert torch.isfinite(traj).all()
    return traj


def _manifold_measures(x1: float, x2: float) -> tuple[float, float]:
    """λ₁ and Tr of the full-batch Hessian at (x1, x2, 0, 0), measured by samkit.sharpness,
    checked against the closed forms 2·max(F₁, F₂) and 2(F₁ + F₂)."""
    model = Toy((x1, x2, 0.0, 0.0))
    data = [(FULL, torch.zeros(2))]
    lam = S.top_eigenvalues(model, _mean_loss, data, k=1, tol=1e-10).eigenvalues[0]
    tr = S.hessian_trace(model, _mean_loss, data, num_samples=4, method="hutchinson").trace
    # (Hutchinson: exact for a diagonal H)
    f1, f2 = F(x1, x2)
    assert abs(lam - 2 * max(f1, f2)) < 1e-9
    assert abs(tr - 2 * (f1 + f2)) < 1e-9
    return lam, tr


def _bisect(fn, lo, hi):
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fn(lo) * fn(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def _trace_minimiser() -> float:
    return _bisect(lambda x: x - math.exp(-2 * x), 0.0, 1.0)  # d/dx (F₁+F₂) at x₂ = 0


def _biased_stationary_point() -> float:
    """Zero of the 1-SAM drift (1+a₁)²∂F₁ + (1+a₂)²∂F₂ along x₁ (x₂ = 0), where
    a_i = ηλᵢ/(2−ηλᵢ), λᵢ = 4Fᵢ the curvature of ℓᵢ: when ℓᵢ is drawn, xᵢ₊₂ is on the 2-cycle
    of Thm 4.8 with amplitude a_i·ρ, and the x₁-gradient at the perturbed point is
    2∂Fᵢ·(|xᵢ₊₂| + ρ)²."""

    def drift(x):
        f1, f2 = F(x, 0.0)
        a1, a2 = (ETA * 4 * f / (2 - ETA * 4 * f) for f in (f1, f2))
        return (1 + a1) ** 2 * 2 * x + (1 + a2) ** 2 * (-2 * f2)

    return _bisect(drift, 0.0, 1.0)


def test_toy_model_full_batch_sam_minimises_lambda1_and_batch_one_sam_the_trace():
    full = _train(batch_size_one=False, steps=STEPS_FULL)
    one = _train(batch_size_one=True, steps=STEPS_ONE)

    # full-batch SAM: on the manifold at argmin λ₁ = (0, 0); x₄ (the non-top direction) is
    # gone, x₃ is on the 2-cycle of Thm 4.8 with λ₁ = 2F₁(0, 0) = 4
    x = full[-1]
    assert abs(float(x[0])) < 1e-5 and abs(float(x[1])) < 1e-5
    assert abs(float(x[3])) < 1e-9
    assert abs(abs(float(x[2])) / (ETA * RHO * 4 / (2 - ETA * 4)) - 1) < 1e-6

    # batch-size-1 SAM: x₂ → 0 as well, x₁ hovers (noise of order ηρ²) around the trace
    # minimiser, shifted by the O(η) bias computed in _biased_stationary_point
    tail = one[STEPS_ONE // 2 :]
    x1_mean, x2_mean = float(tail[:, 0].mean()), float(tail[:, 1].mean())
    assert abs(x2_mean) < 1e-3
    x_star, x_biased = _trace_minimiser(), _biased_stationary_point()
    assert abs(x_star - 0.4263) < 1e-4 and 0.40 < x_biased < x_star
    assert abs(x1_mean - x_biased) < 0.05, (x1_mean, x_biased)
    # it keeps both x₃ and x₄ oscillating (each sample's own 2-cycle)
    assert float(tail[:, 2].abs().min()) > 1e-3 and float(tail[:, 3].abs().min()) > 1e-3

    # the claim, in the sharpness measures at the projections onto the manifold
    lam_full, tr_full = _manifold_measures(float(x[0]), float(x[1]))
    lam_one, tr_one = _manifold_measures(x1_mean, x2_mean)
    assert abs(lam_full - 4.0) < 1e-5 and abs(tr_full - 6.0) < 1e-5
    assert lam_full < lam_one - 0.2  # full batch lowers λ₁ = 2 max(F₁, F₂) more (4 vs ≈4.34)
    assert tr_one < tr_full - 0.6  # batch size 1 lowers Tr = 2(F₁ + F₂) more (≈5.23 vs 6)
    # and each is (nearly) optimal for its own measure along the manifold
    lam_best, tr_best = 4.0, 2 * sum(F(x_star, 0.0))
    assert lam_full - lam_best < 1e-5 and tr_one - tr_best < 0.02


# ----------------------------------------------------------------------------- HVP graph reuse
# (kept here, next to the measurements above, because the test files of samkit.sharpness belong
# to another change; these check the first-order-graph reuse of samkit/sharpness/hessian.py)


def _mlp_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    data = [(x[:12], y[:12]), (x[12:20], y[12:20]), (x[20:], y[20:])]
    return model, data


def _dense_hessian(model, data):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])

    def f(flat):
        params, i = {}, 0
        for n, s in zip(names, shapes):
            params[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        out = torch.func.functional_call(model, params, (x,))
        return nn.functional.cross_entropy(out, y)

    return torch.autograd.functional.hessian(f, flat0)


def test_reused_first_order_graph_gives_identical_results_and_exact_products():
    model, data = _mlp_and_data()
    loss = nn.CrossEntropyLoss()
    H = _dense_hessian(model, data)  # data split over 3 batches: H of the weighted mean
    a = S.top_eigenvalues(model, loss, data, k=2, tol=1e-8, reuse_graph=False)
    b = S.top_eigenvalues(model, loss, data, k=2, tol=1e-8, reuse_graph=True)
    assert a.eigenvalues == b.eigenvalues and a.history == b.history
    assert a.num_hvp == b.num_hvp
    ref = torch.linalg.eigvalsh(H).flip(0)[:2]
    assert torch.allclose(torch.tensor(b.eigenvalues, dtype=H.dtype), ref, rtol=1e-6, atol=0)

    # Hutchinson in chunks of 8 (11 = 8 + 3), batch-major: each sample is exactly zᵢᵀHzᵢ for
    # the i-th Rademacher vector of the seeded stream
    n = 11
    t_auto = S.hessian_trace(model, loss, data, num_samples=n, seed=3, method="hutchinson")
    t_reuse = S.hessian_trace(
        model, loss, data, num_samples=n, seed=3, reuse_graph=True, method="hutchinson"
    )
    gen = torch.Generator().manual_seed(3)
    dim = H.shape[0]
    for i in range(n):
        z = torch.randint(0, 2, (dim,), generator=gen).to(torch.float64) * 2 - 1
        assert abs(t_auto.samples[i] - float(z @ H @ z)) < 1e-10
    assert t_auto.samples == t_reuse.samples

    # single batch: the graph is kept by default; same numbers as rebuilding it every time
    one = [(torch.cat([d[0] for d in data]), torch.cat([d[1] for d in data]))]
    c = S.top_eigenvalues(model, loss, one, k=2, tol=1e-8)
    d = S.top_eigenvalues(model, loss, one, k=2, tol=1e-8, reuse_graph=False)
    assert c.eigenvalues == d.eigenvalues
    assert torch.allclose(torch.tensor(c.eigenvalues, dtype=H.dtype), ref, rtol=1e-6, atol=0)
    # the model is untouched and nothing holds on to .grad
    assert all(p.grad is None for p in model.parameters())


def test_reuse_graph_must_be_a_bool_or_none():
    model, data = _mlp_and_data()
    loss = nn.CrossEntropyLoss()
    for fn in (S.top_eigenvalues, S.hessian_trace, S.spectral_density):
        try:
            fn(model, loss, data, reuse_graph="yes")
        except TypeError as e:
            assert "reuse_graph" in str(e)
        else:
            raise AssertionError(f"{fn.__name__} accepted reuse_graph='yes'")
