"""The transformer task: modular-add's data (every pair once, the right labels, a fixed
split), the transformer's last-position shortcut, and a short run that learns."""

from __future__ import annotations

import pytest
import torch

from samkit.train import TrainConfig, create_model, load_dataset, train
from samkit.train.data import MODULUS


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_pair_once_with_its_sum_mod_p_and_a_fixed_split():
    p = MODULUS
    d = load_dataset("modular-add")
    x = torch.cat([d.x_train, d.x_test])
    y = torch.cat([d.y_train, d.y_test])
    assert x.dtype == torch.long and x.shape == (p * p, 3)
    assert (d.info.num_train, d.info.num_test) == (p * p // 2, p * p - p * p // 2)
    assert d.info.vocab_size == p + 1 and d.info.num_classes == p
    pairs = (x[:, 0] * p + x[:, 1]).tolist()
    assert sorted(pairs) == list(range(p * p))  # every (a, b) once, train and test disjoint
    assert torch.equal(y, (x[:, 0] + x[:, 1]) % p)
    assert (x[:, 2] == p).all()  # the "=" token
    again = load_dataset("modular-add")
    assert torch.equal(again.x_train, d.x_train)  # the split does not depend on anything


def test_the_last_block_computes_the_last_position_as_the_full_model_does():
    info = load_dataset("modular-add", limit_train=8, limit_test=8).info
    torch.manual_seed(0)
    model = create_model("transformer", info, width=16, heads=2, layers=2, mlp_width=32).double()
    x = torch.randint(0, info.vocab_size, (5, 3))
    h = model.embed(x) + model.pos
    for block in model.blocks:  # every position through every block
        h = block(h)
    assert torch.equal(model(x), model.unembed(h[:, -1]))
    assert model(x).shape == (5, MODULUS)


def test_a_short_run_learns_beyond_chance_on_validation():
    # 20 epochs of the recipe's optimizer on the whole training half: validation accuracy
    # (pairs never trained on) leaves chance, 1/97, well behind.
    s = train(
        TrainConfig(
            dataset="modular-add",
            optimizer="adamw",
            lr=0.01,
            weight_decay=1.0,
            schedule="constant",
            epochs=20,
            batch_size=512,
            limit_test=100,
            model_args={"width": 64, "mlp_width": 256},
        ),
        log=None,
    )
    assert s["best_val_acc"] > 5 / MODULUS, s
