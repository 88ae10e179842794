"""``SharpnessAwareTrainer``: samkit in the Hugging Face ``Trainer`` (``samkit[integrations]``).

A tiny Llama language model built from a config (no download; ``HF_HUB_OFFLINE=1``), trained by
the ``Trainer`` and by a hand-written samkit loop on the same data in float64: same weights
after every run, with gradient accumulation, weight-decay groups, bf16 autocast, and the
``Trainer``'s ``max_grad_norm`` mapped onto samkit's; fp16 and plain optimizers are refused.
"""

from __future__ import annotations

import inspect
import os
import warnings

import pytest
import torch

import samkit

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip(
    "transformers",
    reason="Hugging Face transformers not installed: pip install 'samkit[integrations]'",
)
pytest.importorskip(
    "accelerate", reason="the Trainer needs accelerate: pip install 'samkit[integrations]'"
)

from samkit.integrations.transformers import SharpnessAwareTrainer  # noqa: E402

HAS_MAX_GRAD_NORM = (
    "max_grad_norm" in inspect.signature(samkit.SharpnessAwareOptimizer.__init__).parameters
)
needs_max_grad_norm = pytest.mark.skipif(
    not HAS_MAX_GRAD_NORM, reason="samkit optimizers have no max_grad_norm option yet"
)
N, SEQ = 16, 6


def _model(dtype=torch.float64):
    """A one-layer Llama language model (the Trainer's usual case: a causal LM, whose loss
    the Trainer scales over the tokens of a whole accumulated step)."""
    config = transformers.LlamaConfig(
        vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=SEQ,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(dtype)


class _Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 30, (N, SEQ), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class _InOrder(SharpnessAwareTrainer):
    """The data in order, so that the hand-written loop sees the same batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def _args(tmp_path, **kw):
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=1,
        learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant", use_cpu=True,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
        max_grad_norm=0.0,
    )  # fmt: skip
    settings.update(kw)
    return transformers.TrainingArguments(**settings)


def _fit(tmp_path, method="sam", model=None, **kw):
    model = _model() if model is None else model
    method_kwargs = kw.pop("method_kwargs", {"rho": 0.05})
    trainer = _InOrder(
        model=model, args=_args(tmp_path, **kw), train_dataset=_Data(), method=method,
        method_kwargs=method_kwargs,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return model, trainer


def _by_hand(method="sam", batch=4, clip=None, dtype=torch.float64, bf16=False, **opt_kw):
    """The same training with samkit alone: AdamW base, no decay on biases and norms."""
    model = _model(dtype)
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if "bias" in n or "norm" in n]
    decay = [p for n, p in named if not ("bias" in n or "norm" in n)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"max_grad_norm": clip} if clip else {}
    opt = samkit.create_optimizer(
        method, groups, base="adamw", model=model, lr=1e-2, rho=0.05, **extra, **opt_kw
    )
    data = _Data()
    for lo in range(0, N, batch):
        ids = labels = data.ids[lo : lo + batch]

        def closure(ids=ids, labels=labels):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            return loss

        opt.step(closure)
    return model


def _close(a, b, rtol=1e-10, atol=1e-12):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("method", ["sam", "fsam"])
def test_the_trainer_equals_the_samkit_loop(tmp_path, method):
    model, trainer = _fit(tmp_path, method)
    _close(model, _by_hand(method))
    assert trainer.state.global_step == N // 4


def test_gradient_accumulation_runs_every_pass_over_the_whole_step(tmp_path):
    # 2 micro-batches of 4 per step == one batch of 8 by hand (4 steps of 4 would differ).
    model, trainer = _fit(tmp_path, gradient_accumulation_steps=2)
    assert trainer.state.global_step == N // 8
    _close(model, _by_hand(batch=8))
    with pytest.raises(AssertionError):
        _close(model, _by_hand(batch=4))


def test_bf16_autocast_is_honoured(tmp_path):
    model, _ = _fit(tmp_path, model=_model(torch.float32), bf16=True)
    _close(model, _by_hand(dtype=torch.float32, bf16=True), rtol=1e-5, atol=1e-6)
    fp32 = _by_hand(dtype=torch.float32)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), fp32.parameters()))


def test_fp16_and_plain_optimizers_are_refused(tmp_path):
    args = _args(tmp_path)
    args.fp16 = True  # (TrainingArguments refuses fp16 on a CPU itself; a GPU would not)
    with pytest.raises(ValueError, match="does not support fp16=True"):
        SharpnessAwareTrainer(model=_model(torch.float32), args=args, train_dataset=_Data())
    model = _model()
    plain = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="needs a samkit sharpness-aware optimizer"):
        SharpnessAwareTrainer(model=model, args=_args(tmp_path), optimizers=(plain, None))
    with pytest.raises(ValueError, match="plain optimizer"):
        SharpnessAwareTrainer(model=model, args=_args(tmp_path), method="sgd")
    with pytest.raises(ValueError, match="optim='adafactor' has no samkit base optimizer"):
        _fit(tmp_path, optim="adafactor")


@needs_max_grad_norm
def test_max_grad_norm_is_samkits(tmp_path):
    model, trainer = _fit(tmp_path, max_grad_norm=0.05)
    assert trainer._sharpness_optimizer.max_grad_norm == 0.05
    _close(model, _by_hand(clip=0.05))
    with pytest.raises(AssertionError):
        _close(model, _by_hand())  # the clipping matters at this threshold


def test_an_optimizer_passed_in_is_driven_too(tmp_path):
    model = _model()
    opt = samkit.create_optimizer("sam", model.parameters(), base="sgd", lr=0.1, rho=0.05)
    trainer = _InOrder(
        model=model, args=_args(tmp_path), train_dataset=_Data(), optimizers=(opt, None)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert opt.model is model  # BatchNorm-safe by default
    hand = _model()
    ref = samkit.create_optimizer("sam", hand.parameters(), base="sgd", lr=0.1, rho=0.05)
    data = _Data()
    for lo in range(0, N, 4):
        ids = labels = data.ids[lo : lo + 4]
        ref.step(lambda ids=ids, labels=labels: _backward(ref, hand, ids, labels))
    _close(model, hand)


def _backward(opt, model, ids, labels):
    opt.zero_grad()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss


def test_the_example_runs(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_sam.py"
    spec = importlib.util.spec_from_file_location("hf_trainer_sam_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    clip = "1.0" if HAS_MAX_GRAD_NORM else "0"
    argv = ["--steps", "4", "--accumulation", "2", "--max-grad-norm", clip, "--out", str(tmp_path)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = example.main(argv)
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


class _EpochSAM(samkit.SAM):
    """SAM that acts on epochs (as SAF, MESA and SSAM do) and records the epoch of each step."""

    needs_epoch = True

    def sharpness_step(self, closure):
        self.epochs_seen.append(self.current_epoch())
        return super().sharpness_step(closure)


def test_every_step_gets_the_trainers_epoch(tmp_path):
    model = _model()
    opt = _EpochSAM(model.parameters(), "sgd", lr=0.1)
    opt.epochs_seen = []
    trainer = _InOrder(
        model=model, args=_args(tmp_path, num_train_epochs=2, gradient_accumulation_steps=2),
        train_dataset=_Data(), optimizers=(opt, None),
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert opt.epochs_seen == [0, 0, 1, 1]  # 16 samples, batches of 4, 2 per step


@pytest.mark.parametrize("method", ["esam", "saf", "ssam"])
def test_methods_that_need_the_batch_are_refused_when_the_trainer_is_built(tmp_path, method):
    words = f"SharpnessAwareTrainer cannot drive {method}: {method} needs the batch itself"
    with pytest.raises(ValueError, match=words):
        SharpnessAwareTrainer(model=_model(), args=_args(tmp_path), method=method)
    model = _model()
    opt = samkit.create_optimizer(method, model.parameters(), base="sgd", lr=0.1)
    with pytest.raises(ValueError, match=words):
        SharpnessAwareTrainer(model=model, args=_args(tmp_path), optimizers=(opt, None))
