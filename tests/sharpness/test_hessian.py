"""HVP, eigenvalues and trace of a small float64 MLP against its dense Hessian
(``torch.func.hessian``), batch averaging / m-sharpness, and PyHessian as an optional oracle."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import samkit.sharpness as S


def make_mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def make_batches(dtype=torch.float64, sizes=(3, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64).to(dtype),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in sizes
    ]


LOSS = nn.CrossEntropyLoss()


def dense_hessian(model, batches):
    """Dense Hessian of the size-weighted mean loss w.r.t. the flattened parameters."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]
    total = sum(x.shape[0] for x, _ in batches)

    def f(flat):
        chunks = torch.split(flat, sizes)
        pd = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        out = 0.0
        for x, y in batches:
            out = out + LOSS(functional_call(model, pd, (x,)), y) * x.shape[0]
        return out / total

    flat = torch.cat([p.reshape(-1) for p in params])
    return torch.func.hessian(f)(flat), torch.func.grad(f)(flat)


@pytest.fixture(scope="module")
def setup():
    model = make_mlp()
    batches = make_batches()
    H, g = dense_hessian(model, batches)
    return model, batches, H, g


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def test_gradient_and_hvp_match_dense(setup):
    model, batches, H, g = setup
    torch.testing.assert_close(flat(S.gradient(model, LOSS, batches)), g, rtol=1e-12, atol=1e-13)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
        hv = S.hvp(model, LOSS, batches, v)
        assert [t.shape for t in hv] == [p.shape for p in model.parameters()]
        torch.testing.assert_close(flat(hv), H @ flat(v), rtol=1e-10, atol=1e-12)


def test_top_eigenvalues_match_dense(setup):
    model, batches, H, _ = setup
    evals = torch.linalg.eigvalsh(H)
    top = evals.flip(0)[:3]
    r = S.top_eigenvalues(model, LOSS, batches, k=3, tol=1e-8)
    assert r.converged
    torch.testing.assert_close(
        torch.tensor(r.eigenvalues, dtype=torch.float64), top, rtol=1e-6, atol=1e-9
    )
    # eigenvector residual ‖Hv − λv‖ small
    v = flat(r.eigenvectors[0])
    assert float((H @ v - r.eigenvalues[0] * v).norm()) < 1e-4 * abs(r.eigenvalues[0])
    # power iteration converges to the largest-magnitude eigenvalue
    p = S.top_eigenvalues(model, LOSS, batches, k=1, method="power", tol=1e-10, max_iter=1000)
    biggest = evals[evals.abs().argmax()]
    assert p.eigenvalues[0] == pytest.approx(float(biggest), rel=1e-4)


def test_trace_matches_dense(setup):
    model, batches, H, _ = setup
    r = S.hessian_trace(model, LOSS, batches, num_samples=200, seed=0, method="hutchinson")
    # 4 standard errors of a mean of 200 i.i.d. samples (CLT); the seed is fixed.
    assert abs(r.trace - float(torch.trace(H))) <= 4 * r.std_error
    # SLQ with the full Krylov space reproduces the spectrum's extremes
    D = H.shape[0]
    sd = S.spectral_density(model, LOSS, batches, num_runs=1, num_iter=D)
    evals = torch.linalg.eigvalsh(H)
    assert max(sd.nodes[0]) == pytest.approx(float(evals[-1]), rel=1e-6)
    assert min(sd.nodes[0]) == pytest.approx(float(evals[0]), rel=1e-6, abs=1e-9)


def test_hvp_over_batches_is_size_weighted_average(setup):
    model, batches, _, _ = setup
    v = [torch.ones_like(p) for p in model.parameters()]
    both = flat(S.hvp(model, LOSS, batches, v))
    parts = [flat(S.hvp(model, LOSS, [b], v)) for b in batches]
    n1, n2 = (b[0].shape[0] for b in batches)
    torch.testing.assert_close(both, (n1 * parts[0] + n2 * parts[1]) / (n1 + n2))
    # ... which equals the HVP of the concatenated batch (mean loss)
    cat = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    torch.testing.assert_close(both, flat(S.hvp(model, LOSS, cat, v)))


def test_m_sharpness_is_size_weighted_mean_of_per_batch_values(setup):
    model, batches, _, _ = setup
    rho = 0.05
    n1, n2 = (b[0].shape[0] for b in batches)
    asc = S.ascent_direction_sharpness(model, LOSS, batches, rho)
    parts = [S.ascent_direction_sharpness(model, LOSS, [b], rho).value for b in batches]
    assert asc.value == pytest.approx((n1 * parts[0] + n2 * parts[1]) / (n1 + n2), rel=1e-12)
    assert asc.batch_sizes == [n1, n2]
    assert asc.per_batch == pytest.approx(parts, rel=1e-12)
    # with batch size m = 8 (one batch) the value differs: m-sharpness depends on m
    cat = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    full = S.ascent_direction_sharpness(model, LOSS, cat, rho).value
    assert abs(full - asc.value) > 1e-6

    worst = S.worst_direction_sharpness(model, LOSS, batches, rho, steps=40)
    assert worst.value == pytest.approx((n1 * worst.per_batch[0] + n2 * worst.per_batch[1]) / 8)
    alone = [S.worst_direction_sharpness(model, LOSS, [b], rho, steps=40).value for b in batches]
    assert worst.per_batch == pytest.approx(alone, rel=1e-4)
    # worst-direction maximises over the ball, so it beats the single ascent step per batch
    for w, a in zip(worst.per_batch, asc.per_batch):
        assert w >= a - 1e-12


def test_float32_model_stays_float32():
    model = make_mlp(torch.float32)
    batches = make_batches(torch.float32)
    r = S.top_eigenvalues(model, LOSS, batches, k=1)
    assert r.eigenvectors[0][0].dtype == torch.float32
    H, _ = dense_hessian(make_mlp(torch.float64), make_batches(torch.float64))
    assert r.eigenvalues[0] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-3)


def test_against_pyhessian_if_installed():
    """PyHessian (test-only oracle): power iteration λ₁ and Hutchinson trace on one batch."""
    pyhessian = pytest.importorskip("pyhessian")
    model = make_mlp(torch.float32, seed=3)
    x, y = make_batches(torch.float32, sizes=(16,), seed=4)[0]
    ours = S.top_eigenvalues(model, LOSS, [(x, y)], k=2, tol=1e-6)
    theirs_model = copy.deepcopy(model)
    rng = torch.get_rng_state()
    torch.manual_seed(0)
    try:
        comp = pyhessian.hessian(theirs_model, LOSS, data=(x, y), cuda=False)
        eig, _ = comp.eigenvalues(top_n=1, maxIter=200, tol=1e-6)
        tr = comp.trace(maxIter=200, tol=1e-4)
    finally:
        torch.set_rng_state(rng)
    # PyHessian's power iteration finds the largest |λ|; here that is the top eigenvalue
    assert ours.eigenvalues[0] == pytest.approx(eig[0], rel=1e-3)
    our_tr = S.hessian_trace(model, LOSS, [(x, y)], num_samples=200, method="hutchinson")
    se = math.hypot(our_tr.std_error, torch.tensor(tr).std().item() / math.sqrt(len(tr)))
    assert abs(our_tr.trace - sum(tr) / len(tr)) <= 5 * se
