"""The examples under ``examples/`` run, on short settings, and do what they claim.

Costs on an idle 2-core machine: the character-level LM about 4 s (60 SAM steps of a
32-wide, 2-block transformer); the quickstart about 3 s for 2 epochs (plus about 5 s to
generate MNIST-1D if no earlier test in the process did).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

import samkit

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_torch_globals():
    threads = torch.get_num_threads()
    with torch.random.fork_rng():
        yield
    torch.set_num_threads(threads)


def test_char_lm_learns_more_than_character_frequencies(restore_torch_globals):
    char_lm = load_example("char_lm")
    res = char_lm.main(["--steps", "60", "--dim", "32", "--batch", "16", "--quiet"])
    # Below the unigram entropy, a model must use the context (the grammar).
    assert res["final_loss"] < res["unigram_entropy"] - 0.1, res
    assert res["final_loss"] < res["initial_loss"], res


def test_char_lm_objective_is_torch_mean_over_real_tokens(restore_torch_globals):
    char_lm = load_example("char_lm")
    torch.manual_seed(0)
    text = char_lm.corpus(8, seed=3)
    vocab = char_lm.Vocab(text)
    x, y = char_lm.make_batch(text, vocab)
    pad = y == char_lm.PAD
    assert pad.any() and not pad.all(1).any()  # a padded batch: sentences of unequal length
    model = char_lm.CharLM(len(vocab), 16, 2, 1, x.shape[1], tie=True).double()
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none", ignore_index=char_lm.PAD)
    closure = samkit.make_closure(model, loss_fn, x, y, accumulation_steps=3)
    loss = closure()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = F.cross_entropy(model(x), y, ignore_index=char_lm.PAD)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-13, atol=0)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-11, atol=1e-14)
    with torch.no_grad():  # token accuracy counts real tokens only
        hits = ((model(x).argmax(1) == y) & ~pad).sum()
    assert int(closure.correct) == int(hits) and int(closure.counted) == int((~pad).sum())


def test_quickstart_runs(capsys, restore_torch_globals):
    source = (EXAMPLES / "quickstart.py").read_text()
    line = "epochs, batch, n = 30, 128, data.info.num_train"
    assert line in source  # the example's own setting, shortened below to 2 epochs
    code = compile(source.replace(line, line.replace("30", "2")), "quickstart.py", "exec")
    exec(code, {"__name__": "__main__", "__file__": str(EXAMPLES / "quickstart.py")})
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[1] for ln in lines] == ["1", "2"]
    acc = float(lines[-1].split("test acc")[1].strip().rstrip("%")) / 100
    assert acc > 0.15, lines  # 10 classes: chance is 0.10


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
