"""Where samkit meets torch's optimizer and compiler machinery across torch versions.

Facts about ``torch.optim`` and ``torch.compile`` that are not part of their documented
interfaces, kept here so that the rest of ``samkit.optim`` never reaches into torch's
internals:

* torch fires its *global* optimizer step hooks around every optimizer's ``step``; a
  sharpness-aware step must fire them once, not again for its base optimizer
  (:func:`without_global_step_hooks`);
* newer torch versions added group keys to their optimizers, which an older state lacks
  (:data:`OPTIONAL_BASE_KEYS`);
* a model that runs through ``torch.compile`` (:func:`is_compiled`) recompiles when the
  ``requires_grad`` of its parameters changes, and a ``torch.func`` transform through it
  makes dynamo give up on the whole forward: such a pass runs eagerly
  (:func:`compiler_disabled`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from torch import nn

__all__ = [
    "OPTIONAL_BASE_KEYS",
    "compiler_disabled",
    "is_compiled",
    "without_global_step_hooks",
]

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


def is_compiled(module: nn.Module | None) -> bool:
    """Whether ``module``, or a module inside it, runs through ``torch.compile``.

    ``torch.compile(m)`` returns an ``OptimizedModule`` (found as the model or one of its
    submodules); ``m.compile()`` compiles in place. Nothing is imported: without dynamo
    loaded nothing can be compiled.
    """
    if module is None:
        return False
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled_class = getattr(eval_frame, "OptimizedModule", None)
    return any(
        (compiled_class is not None and isinstance(m, compiled_class))
        or getattr(m, "_compiled_call_impl", None) is not None
        for m in module.modules()
    )


def compiler_disabled() -> contextlib.AbstractContextManager:
    """Inside, compiled modules run eagerly: dynamo neither compiles nor marks a frame to be
    skipped later (``torch.compiler.set_stance("force_eager")``; a null context on a torch
    without it)."""
    import torch

    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:  # pragma: no cover - torch < 2.6
        return contextlib.nullcontext()
    return set_stance("force_eager")
