"""``samkit train --compile``: the model runs through ``torch.compile``, the optimizer step stays
eager, and a compiled model trains like the eager one with every registered method.

Compiling is slow, so each test compiles one small architecture once per session and every
later model of it reuses the graphs: an MLP with BatchNorm for the methods (the training
graph, and the one with BatchNorm statistics frozen for the perturbed passes), the ``mlp`` of
``samkit train`` for the command (training and evaluation graphs). Cost with an empty compile
cache: 70 s on the busy 2-core development machine (load ~10), 34 s of CPU time.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import samkit
from samkit.cli import main
from samkit.train import TrainConfig, read_checkpoint, train
from samkit.train.build import compile_model, compile_unavailable

WHY_NOT = compile_unavailable(torch.device("cpu"))
pytestmark = [
    pytest.mark.skipif(WHY_NOT is not None, reason=f"torch.compile unavailable: {WHY_NOT}"),
    pytest.mark.slow,  # the first test of each architecture compiles (tens of seconds)
]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model() -> nn.Module:
    torch.manual_seed(0)
    # No bias before BatchNorm: its gradient is rounding noise, which Adam would amplify.
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10)
    )


def _batches() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(2):
        x = torch.rand(16, 1, 8, 8, generator=g)
        out.append((x, torch.randint(0, 10, (16,), generator=g), torch.arange(16 * i, 16 * i + 16)))
    return out


def _train_two_steps(name: str, model: torch.nn.Module, net: torch.nn.Module) -> None:
    """Two steps of ``name`` on ``model``, the passes running through ``net``."""
    kw = {} if name == "adamw" else {"momentum": 0.9}
    opt = samkit.create_optimizer(name, model.parameters(), model=model, lr=0.05, **kw)
    if hasattr(opt, "set_epoch"):
        opt.set_epoch(0)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    for x, y, idx in _batches():
        opt.step(samkit.make_closure(net, loss_fn, x, y, indices=idx))


@pytest.mark.parametrize("name", samkit.list_optimizers())
def test_a_compiled_model_trains_like_the_eager_one(name):
    eager, compiled = _model(), _model()
    start = {k: v.clone() for k, v in eager.state_dict().items()}
    _train_two_steps(name, eager, eager)
    _train_two_steps(name, compiled, compile_model(compiled))
    after, expected = compiled.state_dict(), eager.state_dict()
    for key in expected:  # weights and BatchNorm statistics (clean pass only, compiled too)
        torch.testing.assert_close(after[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(after["1.weight"], start["1.weight"])


def _bn_keys(state: dict) -> list[str]:
    return [k for k in state if k.endswith(("running_mean", "running_var"))]


def test_the_comparison_sees_batchnorm_statistics_of_a_perturbed_pass():
    # The guard of the test above: a compiled model whose perturbed pass updated the running
    # statistics would differ from the eager one in them.
    eager, compiled = _model(), _model()
    _train_two_steps("sam", eager, eager)
    net = compile_model(compiled)
    opt = samkit.create_optimizer("sam", compiled.parameters(), lr=0.05, momentum=0.9)  # no model
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    for x, y, _ in _batches():
        opt.step(lambda x=x, y=y: _backward(net, loss_fn, x, y, opt))  # a plain closure
    keys = _bn_keys(eager.state_dict())
    assert keys and any(
        not torch.allclose(compiled.state_dict()[k], eager.state_dict()[k], atol=1e-5) for k in keys
    )


def _backward(net, loss_fn, x, y, opt):
    opt.zero_grad()
    loss = loss_fn(net(x), y).mean()
    loss.backward()
    return loss


def test_samkit_train_compile_saves_the_plain_model_and_matches_eager(tmp_path, capsys):
    args = ["train", "--dataset", "digits", "--model", "mlp", "--model-arg", "width=8"]
    args += ["--model-arg", "depth=1", "--limit-train", "64", "--limit-test", "16"]
    args += ["--batch-size", "16", "--epochs", "1", "--rho", "0.1", "--lr", "0.05", "--quiet"]
    assert main([*args, "--compile", "--out", str(tmp_path / "c")]) == 0
    assert "test accuracy" in capsys.readouterr().out
    record = json.loads((tmp_path / "c" / "config.json").read_text())
    assert record["config"]["compile"] is True
    eager = tmp_path / "e"
    train(
        TrainConfig(dataset="digits", model="mlp", model_args={"width": 8, "depth": 1},
                    limit_train=64, limit_test=16, batch_size=16, epochs=1, rho=0.1,
                    out=str(eager)),
        log=None,
    )  # fmt: skip
    c, e = read_checkpoint(tmp_path / "c")["model"], read_checkpoint(eager)["model"]
    assert c.keys() == e.keys()  # the plain module's names, not torch.compile's "_orig_mod."
    for key in e:
        torch.testing.assert_close(c[key], e[key], rtol=1e-4, atol=1e-5, msg=key)
    # --compile may change on --resume (like --device): how the run computes, not what.
    assert main(["train", "--out", str(tmp_path / "c"), "--resume", "--epochs", "2"]) == 0
