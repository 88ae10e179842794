"""The per-method tables of the docs match the registry and the methods' behaviour.

* docs/optimizers.md, "What each method needs from the loop": the closure (a standard one, or
  ``samkit.make_closure``'s), ``indices=`` and ``set_epoch``. Each column is read from the
  method itself (a step without it raises), and the closure and ``set_epoch`` columns must
  agree with the registry's ``needs_batch_closure`` and the class's ``needs_epoch``.
* docs/scaling.md, "Which methods the trainers drive": what the integrations' rule
  (``samkit.integrations._support``) says for every sharpness-aware method.

A table that drifts fails with the table it should be, ready to paste.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import samkit
from samkit.integrations._support import unsupported_reason

ROOT = Path(__file__).resolve().parents[1]


def _table(page: str, marker: str) -> str:
    """The Markdown table right after the line ``<!-- MARKER ... -->`` of ``page``."""
    lines = (ROOT / page).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"<!-- {marker}"))
    rows = []
    for line in lines[start + 1 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return "\n".join(rows)


def _step_raises(name: str, *, plain: bool = False, indices: bool = True, epoch: bool = True):
    """The exception of two steps of ``name`` on a tiny model (``None`` if they run): with a
    plain closure or ``make_closure``'s, with or without indices, after ``set_epoch(10)`` or
    without it."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = samkit.create_optimizer(name, model.parameters(), lr=0.1, model=model)
    x, y, idx = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.arange(8)
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    if epoch and hasattr(opt, "set_epoch"):
        opt.set_epoch(10)  # past every method's start epoch

    def standard():
        opt.zero_grad()
        loss = loss_fn(model(x), y).mean()
        loss.backward()
        return loss

    try:
        for _ in range(2):
            batch = samkit.make_closure(model, loss_fn, x, y, indices=idx if indices else None)
            opt.step(standard if plain else batch)
    except (TypeError, ValueError, RuntimeError) as e:
        return e
    return None


def _loop_table() -> str:
    rows = ["| method | closure | `indices=` | `set_epoch` |", "|---|---|---|---|"]
    for name in samkit.list_optimizers():
        info = samkit.get_optimizer_info(name)
        needs_batch = _step_raises(name, plain=True) is not None
        assert needs_batch == info.needs_batch_closure, name  # the registry says the same
        no_indices = _step_raises(name, indices=False)
        needs_indices = no_indices is not None and "index" in str(no_indices)
        needs_epoch = _step_raises(name, epoch=False) is not None
        assert needs_epoch == bool(getattr(info.cls, "needs_epoch", False)), name
        closure = "`make_closure`" if needs_batch else "standard or `make_closure`"
        if not info.sharpness_aware:
            epoch = "no (a torch optimizer: it has none)"
        else:
            epoch = "every epoch, before its steps" if needs_epoch else "accepted, ignored"
        rows.append(f"| `{name}` | {closure} | {'yes' if needs_indices else 'no'} | {epoch} |")
    return "\n".join(rows)


def _trainers_table() -> str:
    rows = ["| method | Hugging Face `Trainer` | Lightning |", "|---|---|---|"]
    for name in samkit.list_optimizers(sharpness_aware=True):
        why = unsupported_reason(samkit.get_optimizer_info(name))
        cell = "yes" if why is None else "no: needs `make_closure`"
        rows.append(f"| `{name}` | {cell} | {cell} |")
    return "\n".join(rows)


@pytest.mark.parametrize(
    "page, marker, expected",
    [
        ("docs/optimizers.md", "method-needs", _loop_table),
        ("docs/scaling.md", "trainer-support", _trainers_table),
    ],
    ids=["optimizers.md", "scaling.md"],
)
def test_the_per_method_tables_are_the_registrys(page, marker, expected):
    table = expected()
    assert _table(page, marker) == table, f"{page} should hold:\n{table}"
