"""samkit optimizers under PyTorch Lightning's automatic optimization (``samkit[integrations]``).

A Lightning run equals a hand-written samkit loop step for step (float64, BatchNorm, momentum,
weight decay); the mixin keeps BatchNorm statistics to the clean pass, tells
``training_step`` which pass it runs, maps ``gradient_clip_val`` onto ``max_grad_norm`` and
refuses the settings a multi-pass step cannot run under.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import samkit
from optim_helpers import tiny_net

try:
    import lightning.pytorch as pl
except ImportError:
    pl = pytest.importorskip(
        "pytorch_lightning",
        reason="PyTorch Lightning not installed: pip install 'samkit[integrations]'",
    )

from samkit.integrations.lightning import SharpnessAwareMixin  # noqa: E402

HAS_MAX_GRAD_NORM = "max_grad_norm" in inspect.signature(samkit.SAM.__init__).parameters or (
    "max_grad_norm" in inspect.signature(samkit.SharpnessAwareOptimizer.__init__).parameters
)
needs_max_grad_norm = pytest.mark.skipif(
    not HAS_MAX_GRAD_NORM, reason="samkit optimizers have no max_grad_norm option yet"
)

SETTINGS = dict(base="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)


def _data(n_batches: int = 4, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n_batches * size, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n_batches * size,), generator=g)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


class _Module(pl.LightningModule):
    """A tiny classifier with BatchNorm; records the clean loss of every step."""

    def __init__(self, method: str = "sam", pass_model: bool = True, **kw):
        super().__init__()
        self.net = tiny_net(bn=True)
        self.method, self.pass_model, self.kw = method, pass_model, kw
        self.clean_losses: list[torch.Tensor] = []
        self.passes = 0

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.passes += 1
        if getattr(self, "is_clean_pass", True):
            self.clean_losses.append(loss.detach())
        return loss

    def configure_optimizers(self):
        model = {"model": self} if self.pass_model else {}
        return samkit.create_optimizer(
            self.method, self.parameters(), **model, **{**SETTINGS, **self.kw}
        )

    def train_dataloader(self):
        x, y = (torch.cat(t) for t in zip(*_data()))
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)


class _SamkitModule(SharpnessAwareMixin, _Module):
    pass


def _fit(module: pl.LightningModule, **trainer_kw) -> pl.LightningModule:
    trainer = pl.Trainer(**{
        "max_epochs": 1, "accelerator": "cpu", "devices": 1, "logger": False,
        "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "num_sanity_val_steps": 0, **trainer_kw,
    })  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers, logging, ...
        trainer.fit(module)
    return module


def _by_hand(method: str, **kw) -> tuple[nn.Module, list[torch.Tensor]]:
    """The same training, written with samkit alone."""
    net = tiny_net(bn=True)
    opt = samkit.create_optimizer(method, net.parameters(), model=net, **{**SETTINGS, **kw})
    losses = []
    for x, y in _data():

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            return loss

        losses.append(opt.step(closure))
    return net, losses


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("method", ["sam", "fsam", "bsam"])
def test_a_lightning_run_equals_the_samkit_loop(method):
    module = _fit(_SamkitModule(method))
    net, losses = _by_hand(method)
    assert _same(module.net, net)  # weights, BatchNorm statistics, bit for bit
    assert torch.equal(torch.stack(module.clean_losses), torch.stack(losses))
    assert torch.equal(module.last_clean_loss, losses[-1])
    passes = samkit.get_optimizer_info(method).passes
    assert module.passes == passes * len(_data())  # training_step runs once per pass


def test_the_mixin_supplies_model_for_batchnorm():
    # Built without model=, the optimizer cannot see Lightning's model behind its plain
    # closure: without the mixin the perturbed pass moves the BatchNorm statistics.
    with_mixin = _fit(_SamkitModule(pass_model=False))
    without = _fit(_Module(pass_model=False))
    net, _ = _by_hand("sam")
    assert _same(with_mixin.net, net)
    assert not torch.equal(without.net[1].running_mean, net[1].running_mean)


def _fp16_on_cpu():  # Trainer(precision="16-mixed") turns into bf16 on a CPU; a GPU keeps it
    scaler = torch.amp.GradScaler("cpu")
    return {"plugins": [pl.plugins.MixedPrecision("16-mixed", "cpu", scaler=scaler)]}


@pytest.mark.parametrize(
    "trainer_kw, words",
    [
        (_fp16_on_cpu, "precision='16-mixed' does not drive a samkit optimizer"),
        ({"accumulate_grad_batches": 2}, "accumulate_grad_batches=2 does not work"),
        (
            {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"},
            "gradient_clip_algorithm='value'",
        ),
    ],
    ids=["16-mixed", "accumulate", "clip-by-value"],
)
def test_settings_a_multi_pass_step_cannot_run_under_are_refused(trainer_kw, words):
    trainer_kw = trainer_kw() if callable(trainer_kw) else trainer_kw
    module = _SamkitModule()
    start = copy.deepcopy(module.net.state_dict())
    with pytest.raises(ValueError, match=words):
        _fit(module, **trainer_kw)
    if "accumulate_grad_batches" not in trainer_kw:  # refused before the first step
        assert all(torch.equal(start[k], v) for k, v in module.net.state_dict().items())


@pytest.mark.parametrize("method", ["esam", "mesa", "ssam"])
def test_methods_that_need_the_batch_are_refused_before_the_first_step(method):
    module = _SamkitModule(method)
    start = copy.deepcopy(module.net.state_dict())
    with pytest.raises(ValueError, match=f"Lightning cannot drive {method}: {method} needs the"):
        _fit(module)
    assert all(torch.equal(start[k], v) for k, v in module.net.state_dict().items())


class _EpochSAM(samkit.SAM):
    """SAM that acts on epochs (as SAF, MESA and SSAM do) and records the epoch of each step."""

    needs_epoch = True

    def sharpness_step(self, closure):
        self.epochs_seen.append(self.current_epoch())
        return super().sharpness_step(closure)


def test_every_step_gets_lightnings_epoch():
    class Epochs(SharpnessAwareMixin, _Module):
        def configure_optimizers(self):
            self.opt = _EpochSAM(self.parameters(), "sgd", model=self, lr=0.1)
            self.opt.epochs_seen = []
            return self.opt

    module = _fit(Epochs(), max_epochs=2)
    assert module.opt.epochs_seen == [0] * len(_data()) + [1] * len(_data())


def test_plain_optimizers_keep_lightnings_clipping():
    class Plain(SharpnessAwareMixin, _Module):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    clipped = _fit(Plain(), gradient_clip_val=1e-3)
    free = _fit(Plain())
    assert not _same(clipped.net, free.net)


@needs_max_grad_norm
def test_gradient_clip_val_clips_the_update_gradient_only():
    # Oracle: SAM by hand with first_step/second_step, the update gradient clipped by its
    # global norm just before the base step.
    module = _fit(_SamkitModule("sam"), gradient_clip_val=0.05)
    net = tiny_net(bn=True)
    opt = samkit.SAM(
        net.parameters(), model=net, **{k: v for k, v in SETTINGS.items() if k != "base"}
    )
    for x, y in _data():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.first_step(zero_grad=True)
        with samkit.frozen_bn_stats(net):
            nn.functional.cross_entropy(net(x), y).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)  # .grad only
        opt.second_step(zero_grad=True)
    for a, b in zip(module.net.state_dict().values(), net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@needs_max_grad_norm
def test_lightnings_own_clipping_would_change_fsam():
    # Without the mixin Lightning clips after every pass, the ascent gradient included.
    mapped = _fit(_SamkitModule("fsam"), gradient_clip_val=0.05)
    in_closure = _fit(_Module("fsam"), gradient_clip_val=0.05)
    assert not _same(mapped.net, in_closure.net)


def test_the_example_runs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "lightning_sam.py"
    spec = importlib.util.spec_from_file_location("lightning_sam_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = example.main(["--epochs", "1", "--limit-train", "128"])
    assert 0.0 <= metrics["val_acc"] <= 1.0 and metrics["train_loss"] > 0
