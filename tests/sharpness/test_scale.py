"""Measures at scale, in one process: Hutch++ against the exact trace and a float64 numpy
re-implementation, bounded-memory (thick-restart) Lanczos against ``eigvalsh``, windowed
Lanczos quadrature against the exact moments, and block-wise measures (``params=``,
``block_table``) against the dense Hessian's diagonal blocks; with their argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import samkit.sharpness as S
from samkit.sharpness._utils import select_params
from samkit.sharpness.hessian import _lanczos

from .test_hessian import LOSS, dense_hessian, make_batches, make_mlp
from .test_quadratic import DATA, Quadratic, loss_fn


def _spectrum_matrix(lam, seed=0) -> torch.Tensor:
    d = len(lam)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.as_tensor(lam, dtype=torch.float64)) @ q.T
    return (a + a.T) / 2


def _quad(a: torch.Tensor) -> Quadratic:
    return Quadratic(a, torch.zeros(a.shape[0], dtype=torch.float64))


def _rademacher(gen, d):
    return (torch.randint(0, 2, (d,), generator=gen).to(torch.float64) * 2 - 1).numpy()


def _hutchpp_reference(a: np.ndarray, m: int, seed: int) -> float:
    """Hutch++ written out in numpy from the same seeded Rademacher stream."""
    d = a.shape[0]
    gen = torch.Generator().manual_seed(seed)
    s = m // 3
    sketch = np.stack([_rademacher(gen, d) for _ in range(s)], axis=1)
    q, _ = np.linalg.qr(a @ sketch)  # the projection, whatever basis spans it
    t1 = np.trace(q.T @ a @ q)
    rest = []
    for _ in range(m - 2 * s):
        g = _rademacher(gen, d)
        p = g - q @ (q.T @ g)
        rest.append(p @ a @ p)
    return float(t1 + np.mean(rest))


@pytest.fixture(scope="module")
def mlp():
    model, batches = make_mlp(), make_batches()
    H, g = dense_hessian(model, batches)
    return model, batches, H, g


DECAY = 1.0 / np.arange(1, 61) ** 2  # λ_i = 1/i², D = 60


def test_hutchpp_equals_a_numpy_reimplementation_step_by_step():
    a = _spectrum_matrix(DECAY)
    for m, seed in ((9, 0), (30, 3), (31, 4)):
        r = S.hessian_trace(_quad(a), loss_fn, DATA, m, method="hutch++", seed=seed)
        assert r.method == "hutch++" and r.num_samples == m
        assert len(r.samples) == m - 2 * (m // 3)
        assert r.trace == pytest.approx(_hutchpp_reference(a.numpy(), m, seed), rel=1e-10)


def test_hutchpp_is_exact_when_the_sketch_spans_the_range():
    # rank 4 PSD: a sketch of 4 columns captures the range; the remainder is zero
    lam = [5.0, 3.0, 2.0, 0.5] + [0.0] * 36
    r = S.hessian_trace(_quad(_spectrum_matrix(lam)), loss_fn, DATA, 12, method="hutch++")
    assert r.trace == pytest.approx(sum(lam), rel=1e-10)
    assert abs(r.std_error) < 1e-10
    assert r.low_rank_trace == pytest.approx(sum(lam), rel=1e-10)


def test_a_rank_deficient_sketch_gives_its_products_to_the_remainder():
    lam = [4.0, 1.0] + [0.0] * 38  # rank 2: a sketch of 5 columns has rank 2
    r = S.hessian_trace(_quad(_spectrum_matrix(lam)), loss_fn, DATA, 15, method="hutch++")
    assert len(r.samples) == 15 - 5 - 2  # 5 sketch products, 2 for Q, the rest to the remainder
    assert r.trace == pytest.approx(5.0, rel=1e-10)


def test_hutchpp_is_unbiased_and_beats_hutchinson_on_a_decaying_spectrum():
    for lam in (DECAY, DECAY * np.where(np.arange(60) % 3 == 2, -1.0, 1.0)):  # also indefinite
        a = _spectrum_matrix(lam, seed=1)
        exact = float(lam.sum())
        pp = [
            S.hessian_trace(_quad(a), loss_fn, DATA, 30, method="hutch++", seed=s).trace
            for s in range(40)
        ]
        hu = [
            S.hessian_trace(_quad(a), loss_fn, DATA, 30, method="hutchinson", seed=s).trace
            for s in range(40)
        ]
        se = np.std(pp, ddof=1) / np.sqrt(len(pp))
        assert abs(np.mean(pp) - exact) < 4 * se + 1e-12
        assert np.mean((np.array(pp) - exact) ** 2) < 0.1 * np.mean((np.array(hu) - exact) ** 2)


def test_trace_methods_are_checked():
    model = _quad(_spectrum_matrix(DECAY))
    with pytest.raises(ValueError, match="num_samples must be >= 3 for method='hutch\\+\\+'"):
        S.hessian_trace(model, loss_fn, DATA, 2, method="hutch++")
    with pytest.raises(ValueError, match="unknown method 'hutch'"):
        S.hessian_trace(model, loss_fn, DATA, 5, method="hutch")
    # the default: Hutch++ from 3 HVPs on (it needs a third each for its three parts)
    assert S.hessian.DEFAULT_TRACE_METHOD == "hutch++"
    assert S.hessian_trace(model, loss_fn, DATA, 3).method == "hutch++"
    assert S.hessian_trace(model, loss_fn, DATA, 2).method == "hutchinson"


# ----------------------------------------------------------------------------- bounded Lanczos


def test_bounded_lanczos_matches_eigvalsh_and_holds_at_most_max_vectors():
    lam = np.concatenate([[10.0, 9.0, 7.0], np.linspace(3.0, -1.0, 47)])
    a = _spectrum_matrix(lam, seed=2)
    exact = np.sort(lam)[::-1][:3]
    full = S.top_eigenvalues(_quad(a), loss_fn, DATA, k=3, max_iter=50, tol=1e-10)
    bounded = S.top_eigenvalues(
        _quad(a), loss_fn, DATA, k=3, max_iter=500, tol=1e-10, max_vectors=8
    )
    assert full.converged and bounded.converged
    np.testing.assert_allclose(bounded.eigenvalues, exact, rtol=1e-8)
    np.testing.assert_allclose(bounded.eigenvalues, full.eigenvalues, rtol=1e-8)
    assert bounded.num_hvp > 8  # it restarted
    evecs = np.linalg.eigh(a.numpy())[1][:, ::-1]
    for i in range(3):
        cos = abs(float(bounded.eigenvectors[i][0].numpy() @ evecs[:, i]))
        assert cos == pytest.approx(1.0, abs=1e-6)
    # the basis never holds more than max_vectors vectors
    space = S._distributed.Space([torch.zeros(50, dtype=torch.float64)], None)
    q0 = torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sizes = []

    def matvec(v):
        return a @ v

    theta, _, V, ok, restarts = _lanczos(
        matvec, q0, 400, space, k=3, tol=1e-10, max_vectors=8,
        on_step=lambda th: sizes.append(th.size),
    )  # fmt: skip
    assert ok and restarts > 0 and max(sizes) == 8
    assert [tuple(b.shape) for b in V.blocks] == [(8, 50)]  # one block of max_vectors rows
    np.testing.assert_allclose(np.sort(theta)[::-1][:3], exact, rtol=1e-8)


def test_bounded_lanczos_on_a_network_matches_the_dense_hessian(mlp):
    model, batches, H, _ = mlp
    exact = torch.linalg.eigvalsh(H).flip(0)[:2].numpy()
    r = S.top_eigenvalues(model, LOSS, batches, k=2, max_iter=300, tol=1e-9, max_vectors=6)
    assert r.converged and r.num_hvp > 6
    np.testing.assert_allclose(r.eigenvalues, exact, rtol=1e-8)
    with pytest.raises(ValueError, match="max_vectors must be >= 4"):
        S.top_eigenvalues(model, LOSS, batches, k=2, max_vectors=3)


def test_windowed_quadrature_keeps_the_moments():
    a = _spectrum_matrix(np.linspace(-1.0, 4.0, 50), seed=3)
    gen = torch.Generator().manual_seed(0)
    q = torch.as_tensor(_rademacher(gen, 50))
    q = q / q.norm()
    for window in (None, 2, 5):
        r = S.spectral_density(_quad(a), loss_fn, DATA, num_iter=12, max_vectors=window)
        nodes, weights = np.array(r.nodes[0]), np.array(r.weights[0])
        for p in range(7):  # Gauss quadrature with 12 nodes is exact up to degree 23
            exact = float(q @ torch.linalg.matrix_power(a, p) @ q)
            assert float(weights @ nodes**p) == pytest.approx(exact, rel=1e-8, abs=1e-10)
    with pytest.raises(ValueError, match="max_vectors must be >= 2"):
        S.spectral_density(_quad(a), loss_fn, DATA, max_vectors=1)


# ----------------------------------------------------------------------------- blocks


def _block(H, lo, hi):
    return H[lo:hi, lo:hi]


def test_params_restricts_every_hessian_measure_to_the_diagonal_block(mlp):
    model, batches, H, g = mlp
    lo, hi = 4 * 8 + 8, H.shape[0]  # the last layer: weight (3×8) and bias (3)
    Hb = _block(H, lo, hi)
    names = ["2.weight", "2.bias"]
    for spec in ("2", model[2], [model[2].weight, model[2].bias], {"params": model[2].parameters()},
                 names, [model[2]]):  # fmt: skip
        assert select_params(model, spec)[0] == names
    assert select_params(model, "2.bias")[0] == ["2.bias"]
    assert select_params(model, "")[0] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    r = S.top_eigenvalues(model, LOSS, batches, k=2, max_iter=60, tol=1e-10, params="2")
    np.testing.assert_allclose(r.eigenvalues, torch.linalg.eigvalsh(Hb).flip(0)[:2], rtol=1e-8)
    assert [tuple(t.shape) for t in r.eigenvectors[0]] == [(3, 8), (3,)]
    v = [torch.ones(3, 8, dtype=torch.float64), torch.arange(3, dtype=torch.float64)]
    hv = torch.cat([t.reshape(-1) for t in S.hvp(model, LOSS, batches, v, params="2")])
    torch.testing.assert_close(
        hv, Hb @ torch.cat([t.reshape(-1) for t in v]), rtol=1e-10, atol=1e-12
    )
    grad = torch.cat([t.reshape(-1) for t in S.gradient(model, LOSS, batches, params="2")])
    torch.testing.assert_close(grad, g[lo:hi], rtol=1e-10, atol=1e-12)
    # Hutch++ with a sketch as wide as the block is exact
    tr = S.hessian_trace(model, LOSS, batches, 81, method="hutch++", params="2")
    assert tr.trace == pytest.approx(float(torch.trace(Hb)), rel=1e-9)
    # the quadrature's moments are those of the block, from the seeded start vector
    dens = S.spectral_density(model, LOSS, batches, num_iter=8, params="2")
    q = torch.as_tensor(_rademacher(torch.Generator().manual_seed(0), hi - lo))
    q = q / q.norm()
    nodes, weights = np.array(dens.nodes[0]), np.array(dens.weights[0])
    for p in range(5):
        exact = float(q @ torch.linalg.matrix_power(Hb, p) @ q)
        assert float(weights @ nodes**p) == pytest.approx(exact, rel=1e-8, abs=1e-12)


def test_block_table_measures_each_layer_in_one_call(mlp):
    model, batches, H, _ = mlp
    table = S.block_table(
        model, LOSS, batches, measures=("lambda_max", "trace", "density"), tol=1e-10,
        trace_samples=6, trace_method="hutch++", density_iter=5, seed=3,
    )  # fmt: skip
    assert [r.name for r in table.rows] == ["0", "2"]
    assert [r.num_params for r in table.rows] == [40, 27]
    for row, (spec, lo, hi) in zip(table.rows, (("0", 0, 40), ("2", 40, 67))):
        Hb = _block(H, lo, hi)
        assert row.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(Hb)[-1]), rel=1e-8)
        alone = S.hessian_trace(model, LOSS, batches, 6, method="hutch++", params=spec, seed=3)
        assert (row.trace, row.trace_std_error) == (alone.trace, alone.std_error)
        assert len(row.density.nodes[0]) == 5
    text = table.format()
    assert text.splitlines()[0] == "| block | parameters | λ₁ | trace | HVPs |"
    assert "| 0 | 40 |" in text and table.to_dict()["rows"][1]["name"] == "2"
    named = S.block_table(model, LOSS, batches, {"last": "2"}, measures=["lambda_max"], tol=1e-10)
    assert named.rows[0].name == "last" and named.rows[0].trace is None
    assert named.rows[0].lambda_max == pytest.approx(table.rows[1].lambda_max, rel=1e-12)


def test_params_and_blocks_are_checked(mlp):
    model, batches, _, _ = mlp
    with pytest.raises(ValueError, match=r"'3' is neither a module nor a parameter.*\['0', '2'\]"):
        S.top_eigenvalues(model, LOSS, batches, params="3")
    with pytest.raises(ValueError, match="is not a parameter of the model"):
        S.hessian_trace(model, LOSS, batches, 3, params=[torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="is not a submodule"):
        S.hessian_trace(model, LOSS, batches, 3, params=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="params\\[0\\] must be a name, a module or a parameter"):
        S.gradient(model, LOSS, batches, params=[3])
    frozen = make_mlp()
    frozen[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"params\[0\] \(0.bias\) does not require grad"):
        S.gradient(frozen, LOSS, batches, params=[frozen[0].bias])
    with pytest.raises(ValueError, match="selects no parameter that requires grad"):
        S.gradient(model, LOSS, batches, params=[])
    with pytest.raises(TypeError, match="blocks must be None"):
        S.block_table(model, LOSS, batches, blocks="0")
    with pytest.raises(ValueError, match="unknown measure 'lambda'"):
        S.block_table(model, LOSS, batches, measures=["lambda"])


# ----------------------------------------------------------------------------- processes


def test_helpers_for_one_process():
    batches = list(range(7))
    parts = [S.shard_batches(batches, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert S.shard_batches(batches) == batches  # no process group: everything
    with pytest.raises(ValueError, match="2 batches cannot be shared by 3 processes"):
        S.shard_batches([0, 1], 0, 3)
    assert S.is_writer()
    previous = S.set_collective_timeout(5)
    assert S.collective_timeout() == 5
    S.set_collective_timeout(previous)
    with pytest.raises(ValueError, match="finite number > 0"):
        S.set_collective_timeout(0)
    model, data = make_mlp(), make_batches()
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        S.hessian_trace(model, LOSS, data, 3, distributed=True)
    with pytest.raises(TypeError, match="distributed must be None, a bool or a ProcessGroup"):
        S.hessian_trace(model, LOSS, data, 3, distributed="yes")
