"""Small models, data and naive references shared by the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn

from samkit.optim.closure import BatchClosure


def tiny_net(seed: int = 0, bn: bool = False, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A 2-layer MLP (optionally with BatchNorm) in float64 by default."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(5, 7)]
    if bn:
        layers.append(nn.BatchNorm1d(7))
    layers += [nn.Tanh(), nn.Linear(7, 3)]
    return nn.Sequential(*layers).to(dtype)


def batches(n: int = 4, size: int = 8, seed: int = 1, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 5, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g))
        for _ in range(n)
    ]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y, reduction="none")


def mean_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def plain_closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = mean_loss(model, x, y)
        loss.backward()
        return loss

    return closure


def flat_grad(model: nn.Module, x, y, params=None) -> list[torch.Tensor]:
    params = list(model.parameters()) if params is None else params
    return list(torch.autograd.grad(mean_loss(model, x, y), params))


def sgd_momentum_reference(lr: float, momentum: float, weight_decay: float):
    """A naive SGD (torch semantics: dampening 0, decoupled=False) over lists of tensors."""
    bufs: dict[int, torch.Tensor] = {}

    def step(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for i, (p, g) in enumerate(zip(params, grads)):
                d = g + weight_decay * p
                if momentum:
                    if i not in bufs:
                        bufs[i] = d.clone()
                    else:
                        bufs[i] = momentum * bufs[i] + d
                    d = bufs[i]
                p.sub_(lr * d)

    return step


class FaultyBatchClosure(BatchClosure):
    """A :class:`~samkit.BatchClosure` whose ``at``-th pass misbehaves.

    The counterpart of a hand-written faulty closure, for methods that need a BatchClosure
    (sub-batches, per-sample losses): ``calls`` counts the passes; ``fault="raise"`` raises
    ``exc("injected")`` at pass ``at``, ``"nan"`` multiplies that pass's loss by NaN (NaN
    gradients too), ``"nan_loss"`` returns a NaN loss with finite gradients, ``"inf_grad"``
    keeps the loss finite and puts an inf in one gradient entry.
    """

    def __init__(self, model, x, y, at=None, fault="raise", exc=KeyboardInterrupt):
        super().__init__(model, self._loss, x, y)
        self.at, self.fault, self.exc = at, fault, exc
        self.calls = 0
        self._poison = False

    def _loss(self, out, y):
        loss = nn.functional.cross_entropy(out, y, reduction="none")
        return loss * float("nan") if self._poison else loss

    def evaluate(self, subset=None, **kwargs):
        self.calls += 1
        hit = self.calls == self.at
        if hit and self.fault == "raise":
            raise self.exc("injected")
        self._poison = hit and self.fault == "nan"
        try:
            loss = super().evaluate(subset, **kwargs)
        finally:
            self._poison = False
        if hit and self.fault == "nan_loss":
            return loss * float("nan")
        if hit and self.fault == "inf_grad" and kwargs.get("backward", True):
            grad = next(p.grad for p in self.model.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("inf")
        return loss
