"""Where samkit meets torch's optimizer machinery across torch versions.

Two facts about ``torch.optim`` that are not part of its documented interface, kept here so
that the rest of ``samkit.optim`` never reaches into torch's internals:

* torch fires its *global* optimizer step hooks around every optimizer's ``step``; a
  sharpness-aware step must fire them once, not again for its base optimizer
  (:func:`without_global_step_hooks`);
* newer torch versions added group keys to their optimizers, which an older state lacks
  (:data:`OPTIONAL_BASE_KEYS`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["OPTIONAL_BASE_KEYS", "without_global_step_hooks"]

#: Group keys of torch optimizers that newer torch versions added (an older state may lack
#: them; torch's own ``__setstate__`` fills them in), so they do not identify a class.
OPTIONAL_BASE_KEYS = frozenset(
    {"foreach", "maximize", "capturable", "differentiable", "fused", "decoupled_weight_decay"}
)


@contextlib.contextmanager
def without_global_step_hooks() -> Iterator[None]:
    """Inside, optimizer steps do not fire torch's global step hooks.

    torch fires the hooks of ``torch.optim.optimizer.register_optimizer_step_pre_hook`` /
    ``..._post_hook`` around every optimizer's ``step``. A sharpness-aware step fires them
    once, around its own ``step``; its base optimizer's step, inside it, must not fire them a
    second time. Hooks registered on the base optimizer itself still fire. The registries
    are emptied for the duration of the base step only when they hold hooks (otherwise this
    costs nothing); like torch's registries themselves, this is not meant for optimizers
    stepping concurrently in several threads.
    """
    from torch.optim import optimizer as torch_optimizer

    registries = [
        getattr(torch_optimizer, "_global_optimizer_pre_hooks", None),
        getattr(torch_optimizer, "_global_optimizer_post_hooks", None),
    ]
    registries = [r for r in registries if r]
    if not registries:
        yield
        return
    saved = [list(r.items()) for r in registries]
    for registry in registries:
        registry.clear()
    try:
        yield
    finally:
        for registry, items in zip(registries, saved):
            added = list(registry.items())  # registered by the base step itself (rare)
            registry.clear()
            registry.update(items)
            registry.update(added)
