"""Hessian measurements through attention layers, and ``measure_all`` when a measure fails.

The fused attention kernels have no double backward, so every second-order measurement must
run the math one; the references here are the dense Hessian (``torch.autograd.functional.
hessian``) of attention written out by hand (no ``scaled_dot_product_attention``), in float64.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import samkit.sharpness as S
from samkit.sharpness import _utils

LOSS = nn.CrossEntropyLoss()
DIM, HEADS, SEQ, CLASSES = 4, 2, 3, 3


# ----------------------------------------------------------------------------- models


class AttentionNet(nn.Module):
    """``nn.MultiheadAttention`` over a short sequence, mean-pooled, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        h, _ = self.att(x, x, x, need_weights=False)
        return self.head(h.mean(dim=1))


class EncoderNet(nn.Module):
    """One ``nn.TransformerEncoderLayer`` (post-norm, ReLU, dropout 0.1), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(
            DIM, HEADS, dim_feedforward=8, dropout=0.1, batch_first=True
        )
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        return self.head(self.enc(x).mean(dim=1))


def naive_attention(p: dict[str, torch.Tensor], prefix: str, x: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention written out: softmax(QKᵀ/√d)V per head, no fused kernel."""
    b, t, _ = x.shape
    d = DIM // HEADS
    qkv = x @ p[f"{prefix}in_proj_weight"].T + p[f"{prefix}in_proj_bias"]
    q, k, v = (z.reshape(b, t, HEADS, d).transpose(1, 2) for z in qkv.split(DIM, dim=-1))
    att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1) @ v
    att = att.transpose(1, 2).reshape(b, t, DIM)
    return att @ p[f"{prefix}out_proj.weight"].T + p[f"{prefix}out_proj.bias"]


def naive_forward(model: nn.Module, p: dict[str, torch.Tensor], x: torch.Tensor):
    """The eval-mode forward of either model from its parameters, by hand."""
    if isinstance(model, AttentionNet):
        h = naive_attention(p, "att.", x)
    else:  # post-norm encoder layer: LN(x + SA(x)), then LN(h + FF(h))
        h = F.layer_norm(
            x + naive_attention(p, "enc.self_attn.", x), (DIM,),
            p["enc.norm1.weight"], p["enc.norm1.bias"], eps=1e-5,
        )  # fmt: skip
        ff = F.relu(h @ p["enc.linear1.weight"].T + p["enc.linear1.bias"])
        ff = ff @ p["enc.linear2.weight"].T + p["enc.linear2.bias"]
        h = F.layer_norm(
            h + ff, (DIM,), p["enc.norm2.weight"], p["enc.norm2.bias"], eps=1e-5
        )  # fmt: skip
    pooled = h.mean(dim=1)
    return pooled @ p["head.weight"].T + p["head.bias"]


def make(cls, seed=0):
    torch.manual_seed(seed)
    return cls().double().eval()


def batches(sizes=(3, 5), seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(n, SEQ, DIM, generator=g, dtype=torch.float64),
            torch.randint(0, CLASSES, (n,), generator=g),
        )
        for n in sizes
    ]


def dense(model, data):
    """Dense Hessian and gradient of the size-weighted mean loss, by the hand-written forward."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    total = sum(x.shape[0] for x, _ in data)

    def f(flat):
        p = {n: c.view(s) for n, c, s in zip(names, torch.split(flat, sizes), shapes)}
        return sum(LOSS(naive_forward(model, p, x), y) * x.shape[0] for x, y in data) / total

    flat = torch.cat([p.reshape(-1) for p in params])
    H = torch.autograd.functional.hessian(f, flat, vectorize=True)
    g = torch.autograd.functional.jacobian(f, flat)
    return H, g


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def sdpa_flags():
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled())


@pytest.fixture(scope="module", params=[AttentionNet, EncoderNet], ids=["mha", "encoder"])
def case(request):
    model, data = make(request.param), batches()
    # the hand-written forward is the module's own (eval mode: no dropout)
    p = dict(model.named_parameters())
    with torch.no_grad():
        for x, _ in data:
            torch.testing.assert_close(naive_forward(model, p, x), model(x), rtol=0, atol=1e-12)
    H, g = dense(model, data)
    return model, data, H, g


# ----------------------------------------------------------------------------- attention


def test_hvp_and_gradient_through_attention_match_the_dense_hessian(case):
    model, data, H, g = case
    torch.testing.assert_close(flat(S.gradient(model, LOSS, data)), g, rtol=1e-10, atol=1e-12)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
        torch.testing.assert_close(
            flat(S.hvp(model, LOSS, data, v)), H @ flat(v), rtol=1e-10, atol=1e-12
        )


def test_eigenvalues_and_trace_through_attention_are_exact(case):
    model, data, H, _ = case
    D = H.shape[0]
    evals = torch.linalg.eigvalsh(H)
    r = S.top_eigenvalues(model, LOSS, data, k=2, max_iter=D, tol=1e-10, reuse_graph=True)
    assert r.converged
    torch.testing.assert_close(
        torch.tensor(r.eigenvalues, dtype=torch.float64), evals.flip(0)[:2], rtol=0, atol=1e-8
    )
    # each Hutchinson sample is zᵢᵀHzᵢ for the i-th Rademacher vector of the seeded stream
    tr = S.hessian_trace(model, LOSS, data, num_samples=3, seed=5, method="hutchinson")
    gen = torch.Generator().manual_seed(5)
    for sample in tr.samples:
        z = torch.randint(0, 2, (D,), generator=gen).to(torch.float64) * 2 - 1
        assert sample == pytest.approx(float(z @ H @ z), abs=1e-8)


def test_measure_all_through_attention_reports_every_measure(case):
    model, data, H, g = case
    D = H.shape[0]
    evals, evecs = torch.linalg.eigh(H)
    out = S.measure_all(
        model, LOSS, data, 0.05, lanczos_iter=D, lanczos_tol=1e-10, trace_samples=2,
        worst_steps=2, average_samples=2, seed=5,
    )  # fmt: skip
    assert out["errors"] == {}
    assert out["lambda_max"] == pytest.approx(float(evals[-1]), abs=1e-8)
    gen = torch.Generator().manual_seed(5)
    zs = [torch.randint(0, 2, (D,), generator=gen).to(torch.float64) * 2 - 1 for _ in range(2)]
    assert out["trace"] == pytest.approx(sum(float(z @ H @ z) for z in zs) / 2, abs=1e-8)
    cos = abs(float(g @ evecs[:, -1])) / float(g.norm())
    assert out["alignment"] == pytest.approx(cos, abs=1e-6)
    for key in ("worst_direction", "ascent_direction", "average_direction"):
        assert isinstance(out[key], float) and math.isfinite(out[key]), key


def test_attention_in_train_mode_gives_a_symmetric_operator():
    """With dropout on (train_mode=True) the masks are re-drawn identically for every pass, so
    the measured operator is the Hessian of one fixed function: uᵀ(Hv) = vᵀ(Hu)."""
    model, data = make(EncoderNet), batches()
    gen = torch.Generator().manual_seed(2)
    u, v = (
        [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
        for _ in range(2)
    )
    hu = flat(S.hvp(model, LOSS, data, u, train_mode=True))
    hv = flat(S.hvp(model, LOSS, data, v, train_mode=True))
    assert float(flat(u) @ hv) == pytest.approx(float(flat(v) @ hu), rel=1e-10)
    # and dropout does act: the train-mode operator differs from the eval-mode one
    assert not torch.allclose(hv, flat(S.hvp(model, LOSS, data, v)), rtol=1e-6)
    assert model.training is False


def test_the_attention_backend_settings_are_restored():
    model, data = make(AttentionNet), batches()
    before = sdpa_flags()
    S.top_eigenvalues(model, LOSS, data, max_iter=3)

    def broken(out, y):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        S.hessian_trace(model, broken, data, num_samples=1)
    assert sdpa_flags() == before
    with _utils.math_attention():
        assert sdpa_flags() == (False, False, True)
    assert sdpa_flags() == before


def test_older_torch_without_sdpa_kernel_uses_the_legacy_switches(monkeypatch):
    """torch 2.0-2.2 have no torch.nn.attention.sdpa_kernel: the fallback must still pick the
    math kernel (through torch.backends.cuda.sdp_kernel, whose switches govern the CPU too)."""
    monkeypatch.setattr(_utils, "_sdpa_kernel_api", lambda: None)
    model, data = make(AttentionNet), batches()
    H, _ = dense(model, data)
    v = [torch.ones_like(p) for p in model.parameters()]
    before = sdpa_flags()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy switch is deprecated now
        with _utils.math_attention():
            assert sdpa_flags()[0] is False and sdpa_flags()[2] is True
        hv = S.hvp(model, LOSS, data, v)
    assert sdpa_flags() == before
    torch.testing.assert_close(flat(hv), H @ flat(v), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- measure_all


class _NoSecondDerivative(torch.autograd.Function):
    """Identity whose backward raises: put on a backward pass, it makes it non-differentiable."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("derivative for tanh_backward is not implemented (test layer)")


class _FirstOrderTanh(torch.autograd.Function):
    """tanh whose backward cannot itself be differentiated, like a fused attention kernel's."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return _NoSecondDerivative.apply(grad * (1 - y * y))


class FirstOrderOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(_FirstOrderTanh.apply(self.a(x)))


def _first_order_setup():
    torch.manual_seed(0)
    model = FirstOrderOnly().double()
    g = torch.Generator().manual_seed(3)
    data = [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in (4, 6)
    ]
    return model, data


def test_a_failing_measure_is_reported_and_the_others_are_kept():
    model, data = _first_order_setup()
    kw = dict(worst_steps=3, average_samples=3, lanczos_iter=5, trace_samples=2, seed=1)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = S.measure_all(model, LOSS, data, 0.05, **kw)
    failed = sorted(
        str(w.message).split()[1] for w in rec if issubclass(w.category, RuntimeWarning)
    )
    assert failed == ["alignment", "lambda_max", "trace"]  # one warning per failed measure
    # the second-order measures: None, with their errors
    assert set(out["errors"]) == {"lambda_max", "trace", "alignment"}
    for key in ("lambda_max", "lambda_max_converged", "trace", "trace_std_error", "alignment"):
        assert key in out and out[key] is None, key
    assert "tanh_backward is not implemented" in out["errors"]["lambda_max"]
    assert out["errors"]["lambda_max"].startswith("RuntimeError: ")
    assert "\n" not in out["errors"]["lambda_max"]
    assert "top Hessian eigenvector" in out["errors"]["alignment"]
    assert out["num_hvp"] == 0
    # the first-order measures: exactly the values of the functions run alone
    assert (
        out["worst_direction"]
        == S.worst_direction_sharpness(model, LOSS, data, 0.05, steps=3, seed=1).value
    )
    assert out["ascent_direction"] == S.ascent_direction_sharpness(model, LOSS, data, 0.05).value
    avg = S.average_direction_sharpness(model, LOSS, data, 0.05, num_samples=3, seed=1)
    assert out["average_direction"] == avg.value
    assert out["average_direction_std_error"] == avg.std_error
    with torch.no_grad():
        mean = sum(float(LOSS(model(x), y)) * len(y) for x, y in data) / 10
    assert out["loss"] == pytest.approx(mean, rel=1e-12)


def test_measure_all_reports_no_errors_when_everything_succeeds_and_validates_first():
    model, data = _first_order_setup()
    only = S.measure_all(model, LOSS, data, measures=["worst_direction"], worst_steps=1)
    assert only["errors"] == {} and only["worst_direction"] >= 0
    # only alignment requested: its own eigenvector computation fails, reported under its name
    with pytest.warns(RuntimeWarning, match="alignment failed"):
        al = S.measure_all(model, LOSS, data, measures=["alignment"], lanczos_iter=2)
    assert set(al["errors"]) == {"alignment"} and "lambda_max" not in al
    # bad settings are not "failed measures": they raise before anything runs
    with pytest.raises(ValueError, match="trace_samples must be >= 1, got 0"):
        S.measure_all(model, LOSS, data, trace_samples=0)
    with pytest.raises(ValueError, match="lanczos_iter must be >= 1, got 0"):
        S.measure_all(model, LOSS, data, lanczos_iter=0)
    with pytest.raises(ValueError, match="unknown norm 'l3'"):
        S.measure_all(model, LOSS, data, worst_norm="l3")
    with pytest.raises(TypeError, match="reuse_graph"):
        S.measure_all(model, LOSS, data, reuse_graph="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_on_cuda_in_float32_matches_the_float64_cpu_value():
    """In float32 on CUDA, attention would run a fused kernel (memory-efficient or flash)."""
    model, data = make(EncoderNet), batches()
    ref = S.top_eigenvalues(model, LOSS, data, tol=1e-8).eigenvalues[0]
    cuda = make(EncoderNet).float().cuda()
    cuda_data = [(x.float().cuda(), y.cuda()) for x, y in data]
    got = S.top_eigenvalues(cuda, LOSS, cuda_data, tol=1e-6).eigenvalues[0]
    assert got == pytest.approx(ref, rel=1e-3)
    out = S.measure_all(cuda, LOSS, cuda_data, trace_samples=2, worst_steps=2, average_samples=2)
    assert out["errors"] == {}
