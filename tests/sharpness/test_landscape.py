"""Loss landscapes: filter normalisation, 1-D/2-D grids, interpolation, plots."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import samkit.sharpness as S

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LOSS = nn.CrossEntropyLoss()


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv1d(2, 5, 3), nn.BatchNorm1d(5), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 6, 3)
    ).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].weight.uniform_(0.5, 1.5)
    return model.eval()


def data():
    g = torch.Generator().manual_seed(2)
    return [
        (
            torch.randn(n, 2, 8, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in (5, 7)
    ]


def mean_loss(model, batches):
    with torch.no_grad():
        tot = sum(float(LOSS(model(x), y)) * len(y) for x, y in batches)
    return tot / sum(len(y) for _, y in batches)


def test_filter_normalisation():
    model = make()
    dirs = S.random_directions(model, seed=3)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(dirs) == len(params)
    for d, p in zip(dirs, params):
        assert d.shape == p.shape and d.dtype == p.dtype
        if p.ndim <= 1:  # biases and BatchNorm scale/shift
            assert torch.equal(d, torch.zeros_like(d))
        else:
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            wn = p.detach().reshape(p.shape[0], -1).norm(dim=1)
            torch.testing.assert_close(dn, wn, rtol=1e-12, atol=0)
            assert not torch.allclose(d, p.detach())  # a random direction, not the weights
    same = S.random_directions(model, seed=3)
    other = S.random_directions(model, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(dirs, same))
    assert not torch.equal(dirs[0], other[0])
    raw = S.random_directions(model, seed=3, filter_normalize=False)
    assert all(float(t.abs().sum()) > 0 for t in raw)  # biases get a direction too


def test_landscape_1d_at_zero_is_the_loss_and_direction_is_used():
    model, batches = make(), data()
    r = S.landscape_1d(model, LOSS, batches, alphas=[-1.0, 0.0, 0.5])
    assert r.alphas == [-1.0, 0.0, 0.5]
    assert r.losses[1] == pytest.approx(mean_loss(model, batches), rel=1e-12)
    assert r.accuracies is not None and all(0 <= a <= 1 for a in r.accuracies)
    # explicit direction: loss at alpha equals the loss of the moved model
    d = S.random_directions(model, seed=5)
    r2 = S.landscape_1d(model, LOSS, batches, direction=d, alphas=[0.5])
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, t in zip(moved.parameters(), d):
            p.add_(0.5 * t)
    assert r2.losses[0] == pytest.approx(mean_loss(moved, batches), rel=1e-12)
    json.dumps(r.to_dict())


def test_landscape_2d_grid():
    model, batches = make(), data()
    r = S.landscape_2d(model, LOSS, batches, steps=5, span=0.5)
    assert len(r.alphas) == 5 and len(r.betas) == 5
    assert len(r.losses) == 5 and all(len(row) == 5 for row in r.losses)
    assert r.alphas[2] == 0.0 and r.betas[2] == 0.0
    assert r.losses[2][2] == pytest.approx(mean_loss(model, batches), rel=1e-12)
    r2 = S.landscape_2d(model, LOSS, batches, alphas=[0, 1], betas=[0, 1, 2], accuracy=False)
    assert len(r2.losses) == 2 and len(r2.losses[0]) == 3 and r2.accuracies is None
    json.dumps(r.to_dict())


def test_no_accuracy_for_regression_targets():
    model = nn.Linear(3, 1).double()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64))]
    r = S.landscape_1d(model, nn.MSELoss(), batches, alphas=[0.0], filter_normalize=False)
    assert r.accuracies is None


def test_interpolation_endpoints():
    a, b, batches = make(0), make(1), data()
    with torch.no_grad():
        b[1].running_var.uniform_(0.5, 2.0)
    host = make(2)
    r = S.interpolate(host, LOSS, batches, a.state_dict(), b, alphas=[0.0, 0.5, 1.0])
    assert r.kind == "interpolation"
    assert r.losses[0] == pytest.approx(mean_loss(a, batches), rel=1e-12)
    assert r.losses[2] == pytest.approx(mean_loss(b, batches), rel=1e-12)
    # midpoint: weights and BN statistics averaged
    mid = make(2)
    sa, sb = a.state_dict(), b.state_dict()
    mid.load_state_dict(
        {k: (sa[k] + sb[k]) / 2 if sa[k].is_floating_point() else sb[k] for k in sa}
    )
    assert r.losses[1] == pytest.approx(mean_loss(mid, batches), rel=1e-12)
    # buffers taken from a: endpoint 1 differs from b's loss (b's BN stats differ)
    r_a = S.interpolate(host, LOSS, batches, a, b, alphas=[1.0], buffers="a")
    assert r_a.losses[0] != pytest.approx(mean_loss(b, batches), rel=1e-6)


def test_plots_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    model, batches = make(), data()
    r1 = S.landscape_1d(model, LOSS, batches, alphas=[-0.5, 0.0, 0.5])
    r2 = S.landscape_2d(model, LOSS, batches, steps=4)
    p1 = S.plot_landscape_1d(r1, tmp_path / "one.png")
    p2 = S.plot_landscape_2d(r2, tmp_path / "two.png")
    for p in (p1, p2):
        with open(p, "rb") as fh:
            assert fh.read(8) == PNG_MAGIC
    ri = S.interpolate(model, LOSS, batches, make(1), make(3), alphas=[0, 1])
    S.plot_landscape_1d(ri, tmp_path / "interp.png", log=True)
    assert (tmp_path / "interp.png").read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------- what plots show


def _drawn(fig):
    """Render ``fig`` with the Agg canvas; returns the renderer (for text extents)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _legend_texts(fig):
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts]


def test_1d_plot_marks_the_trained_point():
    pytest.importorskip("matplotlib")
    from samkit.sharpness.landscape import _figure_1d

    r = S.Landscape1D([-1.0, -0.5, 0.0, 0.5, 1.0], [3.0, 2.0, 1.5, 2.5, 4.0], None)
    fig = _figure_1d(r, title=None, log=False, names=None)
    ax = fig.axes[0]
    marker = [ln for ln in ax.get_lines() if "trained weights" in ln.get_label()]
    assert len(marker) == 1
    assert list(marker[0].get_xdata()) == [0.0] and list(marker[0].get_ydata()) == [1.5]
    assert any(list(ln.get_xdata()) == [0, 0] for ln in ax.get_lines())  # a line at alpha = 0
    assert "alpha = 0: trained weights" in _legend_texts(fig)
    # a grid without alpha = 0 still marks it, by the line alone
    r2 = S.Landscape1D([-1.0, -0.3, 0.4, 1.0], [3.0, 2.0, 2.1, 4.0], [0.1, 0.5, 0.4, 0.2])
    fig2 = _figure_1d(r2, title="t", log=False, names=None)
    assert any(list(ln.get_xdata()) == [0, 0] for ln in fig2.axes[0].get_lines())
    assert {"loss", "accuracy", "alpha = 0: trained weights"} <= set(_legend_texts(fig2))
    with pytest.raises(ValueError, match="names are the endpoints of an interpolation"):
        _figure_1d(r, title=None, log=False, names=("x", "y"))


def test_interpolation_plot_names_both_runs():
    pytest.importorskip("matplotlib")
    from samkit.sharpness.landscape import _figure_1d

    r = S.Landscape1D([0.0, 0.5, 1.0], [1.0, 3.0, 1.2], None, kind="interpolation")
    fig = _figure_1d(r, title=None, log=False, names=("sgd_seed0", "sam_seed0"))
    ax = fig.axes[0]
    legend = _legend_texts(fig)
    assert "alpha = 0: sgd_seed0" in legend and "alpha = 1: sam_seed0" in legend
    assert "sgd_seed0" in ax.get_xlabel() and "sam_seed0" in ax.get_xlabel()
    assert ax.get_title() == "interpolation: sgd_seed0 → sam_seed0"
    ends = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
    assert ends["alpha = 0: sgd_seed0"] == ([0.0], [1.0])
    assert ends["alpha = 1: sam_seed0"] == ([1.0], [1.2])
    everything = " ".join([ax.get_xlabel(), ax.get_title(), *legend])
    assert "0 = a" not in everything and "1 = b" not in everything
    # without names: the argument names of interpolate()
    plain = _figure_1d(r, title=None, log=False, names=None)
    assert "alpha = 0: state_a" in _legend_texts(plain)
    # long names are shortened to their end and kept out of the title
    long_a, long_b = "x" * 80 + "/run_a", "y" * 80 + "/run_b"
    fig3 = _figure_1d(r, title=None, log=False, names=(long_a, long_b))
    assert fig3.axes[0].get_title() == "interpolation"
    assert any(t.startswith("alpha = 0: …") and t.endswith("/run_a") for t in _legend_texts(fig3))
    with pytest.raises(TypeError, match="names must be a pair of strings"):
        _figure_1d(r, title=None, log=False, names="ab")


def test_2d_plot_has_no_overlapping_labels():
    pytest.importorskip("matplotlib")
    from samkit.sharpness.landscape import _figure_2d

    # a bowl with a steep wall in one corner: many levels crowd together there
    grid = [x / 7 for x in range(-7, 8)]
    losses = [[a * a + b * b + 40 * max(a + b - 1, 0) ** 2 for b in grid] for a in grid]
    fig = _figure_2d(S.Landscape2D(grid, grid, losses, None), title=None, levels=30)
    renderer = _drawn(fig)
    ax = fig.axes[0]
    boxes = [t.get_window_extent(renderer) for t in ax.texts if t.get_visible() and t.get_text()]
    overlapping = [
        (i, j) for i in range(len(boxes)) for j in range(i) if boxes[i].overlaps(boxes[j])
    ]
    assert overlapping == []
    # the values are read on a colour bar; the trained point is marked
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "loss"
    origin = [ln for ln in ax.get_lines() if ln.get_label() == "trained weights"]
    assert len(origin) == 1 and list(origin[0].get_xdata()) == [0.0]
    with pytest.raises(ValueError, match="levels must be >= 2"):
        _figure_2d(S.Landscape2D(grid, grid, losses, None), title=None, levels=1)
