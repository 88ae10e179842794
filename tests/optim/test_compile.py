"""Methods on a ``torch.compile``'d model: graphs stay stable and the model stays compiled.

A counting backend (the graph is run as traced, no code generation) sees every graph dynamo
compiles: ESAM's weight mask must not recompile the model at every step (its first pass
would otherwise switch ``requires_grad`` on a different set of tensors each step, until
dynamo gives up at its cache limit), and SSAM-F's Fisher pass through ``torch.func`` must
not make dynamo give up on the model's frame (every later pass would then run uncompiled).
Cost: about 10 s on the busy 2-core machine, mostly dynamo's first import and tracing.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import samkit
from optim_helpers import batches, loss_fn

dynamo = pytest.importorskip("torch._dynamo")
pytestmark = [
    pytest.mark.skipif(not dynamo.is_dynamo_supported(), reason="dynamo unsupported here"),
    pytest.mark.slow,  # dynamo's first import and tracing take seconds
]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7), nn.Tanh(), nn.Linear(7, 3))


def compiled(module: nn.Module) -> tuple[nn.Module, list]:
    graphs: list = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    return torch.compile(module, backend=backend, dynamic=False), graphs


def test_esam_does_not_recompile_at_every_step_and_trains_as_eagerly():
    data = batches(10, size=8, dtype=torch.float32)
    eager, net = model(), model()
    fast, graphs = compiled(net)
    kw = dict(rho=0.1, beta=0.5, gamma=0.5, seed=0, lr=0.1)
    o1 = samkit.ESAM(eager.parameters(), **kw)
    o2 = samkit.ESAM(net.parameters(), model=fast, **kw)
    for x, y in data:
        o1.step(samkit.make_closure(eager, loss_fn, x, y))
        o2.step(samkit.make_closure(fast, loss_fn, x, y))
    # the training graph, the no-grad selection pass, the pass on B⁺ (4 of 8 samples)
    assert len(graphs) <= 3
    for p, q in zip(eager.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_ssam_fisher_keeps_the_model_compiled():
    net = model()
    fast, graphs = compiled(net)
    opt = samkit.SSAM(net.parameters(), model=fast, rho=0.1, num_samples=4, lr=0.1)
    for epoch, (x, y) in enumerate(batches(3, size=8, dtype=torch.float32)):
        opt.set_epoch(epoch)  # a Fisher pass at every step, before the clean pass
        opt.step(samkit.make_closure(fast, loss_fn, x, y))
    assert graphs  # the clean and perturbed passes ran through a compiled graph
