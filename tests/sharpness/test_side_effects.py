"""No public function of samkit.sharpness may change the model: weights, BatchNorm running
statistics, num_batches_tracked, training flags, requires_grad flags, .grad, nor the global
RNG state — in eval mode (default) and with train_mode=True."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import samkit.sharpness as S


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(4 * 6, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.weight.requires_grad_(False)  # excluded everywhere; its bias is trainable

    def forward(self, x):
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.frozen(self.fc(h.flatten(1)))


def make():
    torch.manual_seed(0)
    model = Net().double()
    model.train()
    model.drop.eval()  # a mixed-mode model: per-module flags must come back as they were
    with torch.no_grad():  # non-trivial BN statistics
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.num_batches_tracked.fill_(7)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 0.5)
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 2, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in (4, 6)
    ]


LOSS = nn.CrossEntropyLoss()


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), k
    assert before["modes"] == after["modes"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["grad_ids"] == after["grad_ids"]
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)


def _vectors(model):
    return [torch.ones_like(p) for p in model.parameters() if p.requires_grad]


CALLS = {
    "gradient": lambda m, d, t: S.gradient(m, LOSS, d, train_mode=t),
    "hvp": lambda m, d, t: S.hvp(m, LOSS, d, _vectors(m), train_mode=t),
    "lanczos": lambda m, d, t: S.top_eigenvalues(m, LOSS, d, k=2, max_iter=8, train_mode=t),
    "power": lambda m, d, t: S.top_eigenvalues(
        m, LOSS, d, k=2, method="power", max_iter=4, train_mode=t
    ),
    "trace": lambda m, d, t: S.hessian_trace(m, LOSS, d, num_samples=2, train_mode=t),
    "trace_hutchpp": lambda m, d, t: S.hessian_trace(m, LOSS, d, num_samples=4, train_mode=t),
    "lanczos_bounded": lambda m, d, t: S.top_eigenvalues(
        m, LOSS, d, max_iter=8, max_vectors=3, train_mode=t
    ),
    "block": lambda m, d, t: S.top_eigenvalues(m, LOSS, d, max_iter=4, params="fc", train_mode=t),
    "block_table": lambda m, d, t: S.block_table(
        m, LOSS, d, measures=["lambda_max"], lanczos_iter=2, train_mode=t
    ),
    "default_blocks": lambda m, d, t: S.default_blocks(m),
    "slq": lambda m, d, t: S.spectral_density(m, LOSS, d, num_iter=4, train_mode=t),
    "worst_l2": lambda m, d, t: S.worst_direction_sharpness(m, LOSS, d, 0.1, steps=3, train_mode=t),
    "worst_linf": lambda m, d, t: S.worst_direction_sharpness(
        m, LOSS, d, 0.01, steps=3, norm="linf", train_mode=t
    ),
    "worst_adaptive": lambda m, d, t: S.worst_direction_sharpness(
        m, LOSS, d, 0.1, steps=3, adaptive=True, train_mode=t
    ),
    "ascent": lambda m, d, t: S.ascent_direction_sharpness(m, LOSS, d, 0.1, train_mode=t),
    "average": lambda m, d, t: S.average_direction_sharpness(
        m, LOSS, d, 0.1, num_samples=3, train_mode=t
    ),
    "average_gauss": lambda m, d, t: S.average_direction_sharpness(
        m, LOSS, d, 0.01, num_samples=3, distribution="gaussian", train_mode=t
    ),
    "min": lambda m, d, t: S.min_sharpness(m, LOSS, d, 0.1, steps=3, train_mode=t),
    "alignment": lambda m, d, t: S.gradient_eigenvector_alignment(
        m, LOSS, d, max_iter=5, train_mode=t
    ),
    "measure_all": lambda m, d, t: S.measure_all(
        m,
        LOSS,
        d,
        0.05,
        lanczos_iter=4,
        trace_samples=2,
        worst_steps=2,
        average_samples=2,
        train_mode=t,
    ),  # fmt: skip
    "random_directions": lambda m, d, t: S.random_directions(m, 0),
    "landscape_1d": lambda m, d, t: S.landscape_1d(m, LOSS, d, alphas=[-0.5, 0, 0.5], train_mode=t),
    "landscape_2d": lambda m, d, t: S.landscape_2d(m, LOSS, d, steps=2, train_mode=t),
    "interpolate": lambda m, d, t: S.interpolate(
        m, LOSS, d, _other(m), m.state_dict(), alphas=[0.0, 0.3, 1.0], train_mode=t
    ),
}


def _other(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
        other.bn.running_mean.add_(0.2)
    return other.state_dict()


def test_every_public_function_is_covered():
    covered = {
        "gradient", "hvp", "top_eigenvalues", "hessian_trace", "spectral_density",
        "worst_direction_sharpness", "ascent_direction_sharpness", "average_direction_sharpness",
        "min_sharpness", "gradient_eigenvector_alignment", "measure_all", "random_directions",
        "landscape_1d", "landscape_2d", "interpolate", "block_table", "default_blocks",
    }  # fmt: skip
    # the rest of __all__ are result classes, density_on_grid, the plots (no model) and the
    # helpers for processes (no model)
    helpers = {"is_writer", "shard_batches", "collective_timeout", "set_collective_timeout"}
    functions = {n for n in S.__all__ if n[0].islower() and not n.startswith(("plot_", "density_"))}
    functions -= helpers
    assert functions == covered


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_no_side_effects(name, train_mode):
    model = make()
    data = batches()
    before = snapshot(model)
    rng = torch.get_rng_state()
    CALLS[name](model, data, train_mode)
    assert_unchanged(model, before)
    assert torch.equal(rng, torch.get_rng_state())


def test_state_restored_when_the_loss_raises():
    model = make()
    before = snapshot(model)
    calls = {"n": 0}

    def bad_loss(out, y):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("boom")
        return LOSS(out, y)

    with pytest.raises(RuntimeError, match="boom"):
        S.worst_direction_sharpness(model, bad_loss, batches(), 0.1, train_mode=True)
    assert_unchanged(model, before)


def test_frozen_parameters_are_excluded():
    model = make()
    n_trainable = sum(p.requires_grad for p in model.parameters())
    g = S.gradient(model, LOSS, batches())
    assert len(g) == n_trainable
    r = S.top_eigenvalues(model, LOSS, batches(), k=1, max_iter=5)
    assert len(r.eigenvectors[0]) == n_trainable
    assert len(S.random_directions(model, 0)) == n_trainable


def test_dropout_in_train_mode_is_a_fixed_function():
    # masks are re-seeded per batch, so the HVP operator is deterministic and symmetric
    model = make()
    model.drop.train()
    data = batches()
    gen = torch.Generator().manual_seed(3)
    u = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in _vectors(model)]
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in _vectors(model)]
    hu = S.hvp(model, LOSS, data, u, train_mode=True)
    hv = S.hvp(model, LOSS, data, v, train_mode=True)
    uhv = sum(float((a * b).sum()) for a, b in zip(u, hv))
    vhu = sum(float((a * b).sum()) for a, b in zip(v, hu))
    assert uhv == pytest.approx(vhu, rel=1e-9)
    a = S.worst_direction_sharpness(model, LOSS, data, 0.1, steps=3, train_mode=True)
    b = S.worst_direction_sharpness(model, LOSS, data, 0.1, steps=3, train_mode=True)
    assert a.value == b.value
