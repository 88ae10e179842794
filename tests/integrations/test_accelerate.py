"""samkit optimizers prepared by Hugging Face Accelerate (``samkit[integrations]``).

``accelerator.prepare(optimizer)`` wraps the optimizer; ``step(closure)`` passes the closure
through (every pass runs) but returns ``None``. Two loops, one with ``accelerator.backward``
in a standard closure and one with ``samkit.make_closure`` on the prepared model, equal a
plain samkit loop bit for bit (float64, BatchNorm, momentum). Accelerate's own gradient
accumulation skips the step, closure and all, on the steps in between: the docs say to use
``make_closure(..., accumulation_steps=k)`` instead, and the last test pins why.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import samkit
from optim_helpers import batches, tiny_net

accelerate = pytest.importorskip(
    "accelerate", reason="Hugging Face Accelerate not installed: pip install 'samkit[integrations]'"
)

SETTINGS = dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, rho=0.05)


def _loader() -> DataLoader:
    data = batches(4, size=8)
    x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


def _prepared(**accelerator_kw):
    accelerator = accelerate.Accelerator(cpu=True, **accelerator_kw)
    model = tiny_net(bn=True)
    opt = samkit.create_optimizer("sam", model.parameters(), model=model, **SETTINGS)
    model, opt, loader = accelerator.prepare(model, opt, _loader())
    return accelerator, model, opt, loader


def _plain() -> tuple[nn.Module, list[torch.Tensor]]:
    model = tiny_net(bn=True)
    opt = samkit.create_optimizer("sam", model.parameters(), model=model, **SETTINGS)
    losses = []
    for x, y in _loader():
        losses.append(opt.step(samkit.make_closure(model, _loss, x, y)))
    return model, losses


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_closure_with_accelerator_backward_equals_the_plain_loop():
    accelerator, model, opt, loader = _prepared()
    clean_losses = []
    for x, y in loader:
        passes = []

        def closure(x=x, y=y, passes=passes):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            accelerator.backward(loss)
            passes.append(loss.detach())
            return loss

        assert opt.step(closure) is None  # Accelerate's wrapper drops the returned loss ...
        clean_losses.append(passes[0])  # ... the first pass's loss is the clean one
        assert len(passes) == 2
    reference, losses = _plain()
    assert _same(accelerator.unwrap_model(model), reference)
    # (the BatchClosure's mean is sum / n: equal up to the last bit)
    torch.testing.assert_close(torch.stack(clean_losses), torch.stack(losses), rtol=1e-15, atol=0)


def test_make_closure_on_the_prepared_model_equals_the_plain_loop():
    accelerator, model, opt, loader = _prepared()
    for x, y in loader:
        closure = samkit.make_closure(model, _loss, x, y)
        opt.step(closure)
        assert closure.grad_evals == 2.0
    assert _same(accelerator.unwrap_model(model), _plain()[0])


def test_accelerates_gradient_accumulation_skips_the_step_closure_and_all():
    accelerator, model, opt, loader = _prepared(gradient_accumulation_steps=2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    calls = 0
    for k, (x, y) in enumerate(loader):
        with accelerator.accumulate(model):

            def closure(x=x, y=y):
                nonlocal calls
                calls += 1
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                return loss

            opt.step(closure)
        if k == 0:  # the first batch: no pass ran, nothing moved
            assert calls == 0
            assert all(torch.equal(start[n], v) for n, v in model.state_dict().items())
    assert calls == 2 * len(loader) // 2  # half the batches never reached the optimizer
