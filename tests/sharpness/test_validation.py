"""Bad inputs raise ValueError/TypeError naming the bad value."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import samkit.sharpness as S

LOSS = nn.MSELoss()


def model():
    torch.manual_seed(0)
    return nn.Linear(3, 1)


DATA = [(torch.randn(4, 3), torch.randn(4, 1))]


@pytest.mark.parametrize(
    "fn",
    [
        S.worst_direction_sharpness,
        S.ascent_direction_sharpness,
        S.average_direction_sharpness,
        S.min_sharpness,
        S.measure_all,
    ],
)
def test_negative_rho(fn):
    with pytest.raises(ValueError, match=r"rho must be >= 0, got -0\.1"):
        fn(model(), LOSS, DATA, -0.1)


def test_k_and_iterations():
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        S.top_eigenvalues(model(), LOSS, DATA, k=0)
    with pytest.raises(ValueError, match="k=5 exceeds the number of parameters"):
        S.top_eigenvalues(model(), LOSS, DATA, k=5)
    with pytest.raises(TypeError, match="k must be an int"):
        S.top_eigenvalues(model(), LOSS, DATA, k=1.5)
    with pytest.raises(ValueError, match="max_iter must be >= 1, got 0"):
        S.top_eigenvalues(model(), LOSS, DATA, max_iter=0)
    with pytest.raises(ValueError, match="tol must be > 0"):
        S.top_eigenvalues(model(), LOSS, DATA, tol=0.0)
    with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
        S.hessian_trace(model(), LOSS, DATA, num_samples=0)
    with pytest.raises(ValueError, match="num_iter must be >= 1, got 0"):
        S.spectral_density(model(), LOSS, DATA, num_iter=0)
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        S.worst_direction_sharpness(model(), LOSS, DATA, 0.1, steps=-1)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown method 'arnoldi'"):
        S.top_eigenvalues(model(), LOSS, DATA, method="arnoldi")
    with pytest.raises(ValueError, match="unknown norm 'l1'"):
        S.worst_direction_sharpness(model(), LOSS, DATA, 0.1, norm="l1")
    with pytest.raises(ValueError, match="unknown distribution 'cube'"):
        S.average_direction_sharpness(model(), LOSS, DATA, 0.1, distribution="cube")
    with pytest.raises(ValueError, match="unknown measure 'lambda_min'"):
        S.measure_all(model(), LOSS, DATA, measures=["lambda_min"])
    with pytest.raises(ValueError, match="unknown buffers 'mean'"):
        S.interpolate(model(), LOSS, DATA, model(), model(), buffers="mean")


def test_bad_data():
    with pytest.raises(ValueError, match="data is empty"):
        S.gradient(model(), LOSS, [])
    with pytest.raises(ValueError, match="data is empty"):
        S.gradient(model(), LOSS, iter([]))
    with pytest.raises(TypeError, match=r"wrap it as \[\(inputs, targets\)\]"):
        S.gradient(model(), LOSS, DATA[0])
    with pytest.raises(TypeError, match="each batch must be an \\(inputs, targets\\) pair"):
        S.gradient(model(), LOSS, [torch.randn(4, 3)])
    with pytest.raises(TypeError, match="got Tensor"):
        S.gradient(model(), LOSS, torch.randn(4, 3))


def test_bad_model_loss_and_vectors():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        S.gradient(lambda x: x, LOSS, DATA)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        S.gradient(model(), "mse", DATA)
    with pytest.raises(ValueError, match=r"loss_fn\(outputs, targets\) must return"):
        S.gradient(model(), lambda out, y: (out - y).pow(2).sum(0), DATA)  # [1] for 4 samples
    frozen = model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        S.gradient(frozen, LOSS, DATA)
    m = model()
    with pytest.raises(ValueError, match="vectors has 1 tensors but the model has 2"):
        S.hvp(m, LOSS, DATA, [torch.ones(1, 3)])
    with pytest.raises(ValueError, match=r"vectors\[1\] has shape \(3,\), expected \(1,\)"):
        S.hvp(m, LOSS, DATA, [torch.ones(1, 3), torch.ones(3)])
    with pytest.raises(TypeError, match="vectors must be a list of tensors"):
        S.hvp(m, LOSS, DATA, torch.ones(4))
    with pytest.raises(TypeError, match="seed must be an int"):
        S.hessian_trace(m, LOSS, DATA, seed="0")


def test_landscape_inputs():
    with pytest.raises(ValueError, match="alphas must not be empty"):
        S.landscape_1d(model(), LOSS, DATA, alphas=[])
    with pytest.raises(ValueError, match="span must be >= 0"):
        S.landscape_2d(model(), LOSS, DATA, span=-1.0)
    with pytest.raises(TypeError, match="result must be a Landscape1D"):
        S.plot_landscape_1d({"alphas": []}, "x.png")
    with pytest.raises(TypeError, match="state_a must be a state_dict"):
        S.interpolate(model(), LOSS, DATA, [1, 2], model())
    other = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="shape mismatch for 'weight'"):
        S.interpolate(model(), LOSS, DATA, other, model())


def test_imports_nothing_from_train_bench_cli():
    import subprocess
    import sys

    code = (
        "import sys, samkit.sharpness\n"
        "bad = [m for m in sys.modules if m.split('.')[:2] in "
        "(['samkit', 'train'], ['samkit', 'bench'], ['samkit', 'cli'])]\n"
        "assert not bad, bad\n"
        "assert 'matplotlib' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
