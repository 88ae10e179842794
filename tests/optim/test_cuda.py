"""GPU checks: CUDA equals CPU, mixed precision, parameters on several devices.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/optim/test_cuda.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import samkit
from optim_helpers import batches, loss_fn, tiny_net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _train(model, opt, data, device, **closure_kw):
    scaler = closure_kw.get("grad_scaler")
    for x, y in data:
        opt.step(samkit.make_closure(model, loss_fn, x.to(device), y.to(device), **closure_kw))
        if scaler is not None:
            scaler.update()


@pytest.mark.parametrize("name", ["sam", "asam", "fsam", "bsam"])
def test_cuda_float64_equals_cpu(name):
    if name not in samkit.list_optimizers():
        pytest.skip(f"{name} not registered")
    data = batches(4)
    cpu = tiny_net(bn=True)
    gpu = copy.deepcopy(cpu).cuda()
    kw = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    o_cpu = samkit.create_optimizer(name, cpu.parameters(), model=cpu, **kw)
    o_gpu = samkit.create_optimizer(name, gpu.parameters(), model=gpu, **kw)
    _train(cpu, o_cpu, data, "cpu")
    _train(gpu, o_gpu, data, "cuda")
    for a, b in zip(cpu.state_dict().values(), gpu.state_dict().values()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-9, atol=1e-11)


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )  # fmt: skip


def _image_batches(n=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g))
            for _ in range(n)]  # fmt: skip


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_mixed_precision_tracks_float32_training(mode):
    data = _image_batches()
    ref = _conv_net().cuda()
    amp = copy.deepcopy(ref)
    kw = dict(rho=0.05, lr=0.05, momentum=0.9)
    o_ref = samkit.SAM(ref.parameters(), **kw)
    o_amp = samkit.SAM(amp.parameters(), **kw)
    _train(ref, o_ref, data, "cuda")
    closure_kw = {"autocast_dtype": torch.bfloat16 if mode == "bf16" else torch.float16}
    if mode == "fp16":
        closure_kw["grad_scaler"] = torch.amp.GradScaler("cuda", init_scale=2.0**12)
    _train(amp, o_amp, data, "cuda", **closure_kw)
    assert o_amp.skipped_steps == 0
    a = torch.cat([p.detach().flatten() for p in ref.parameters()])
    b = torch.cat([p.detach().flatten() for p in amp.parameters()])
    assert all(p.dtype == torch.float32 for p in amp.parameters())
    assert torch.isfinite(b).all()
    # low-precision forwards follow the same trajectory: a few percent apart after 6 steps
    rel = float((a - b).norm() / a.norm())
    assert rel < 0.03, rel


def test_parameters_on_two_devices():
    data = batches(3)
    cpu = tiny_net()
    mixed = copy.deepcopy(cpu)
    mixed[2].cuda()  # second linear layer on the GPU

    class Split(nn.Module):
        def __init__(self, seq):
            super().__init__()
            self.seq = seq

        def forward(self, x):
            h = self.seq[1](self.seq[0](x))
            return self.seq[2](h.cuda()).cpu()

    split = Split(mixed)
    o1 = samkit.SAM(cpu.parameters(), rho=0.1, lr=0.1, momentum=0.9)
    o2 = samkit.SAM(split.parameters(), rho=0.1, lr=0.1, momentum=0.9)
    _train(cpu, o1, data, "cpu")
    _train(split, o2, data, "cpu")
    for a, b in zip(cpu.parameters(), split.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-9, atol=1e-11)
