"""MESA's average of the weights: a copy of the model, or its shards under FSDP2.

MESA (Du et al., NeurIPS 2022) takes its reference logits from an exponential moving average
of the weights, :math:`\bar w \\leftarrow \beta\\,\bar w + (1 - \beta)\\,w`, over every
entry of the model's ``state_dict`` (parameters and BatchNorm statistics; integer buffers
are copied). This module keeps that average whatever the model's layout:

* :func:`new_average`: a deep copy of the model (eval mode, no gradients), or for a model
  with sharded (``DTensor``, FSDP2) parameters, which cannot be deep-copied, a
  :class:`ShardedAverage` holding tensors laid out as the model's;
* :func:`average_forward`: the averaged model's outputs on a batch, either way;
* :func:`paired_tensors` and :func:`update_average`: the update, with the BatchNorm
  statistics averaged over the processes first (each replica's come from its own batch,
  and FSDP2 does not synchronise buffers). A tensor the model holds under several names (a
  layer used twice, an embedding tied to the output layer) is averaged once per step;
* :func:`saved_average` and :func:`keyed_like`: the average's entries under the eager
  model's names (``torch.compile``'s ``_orig_mod.`` left out), so that a checkpoint of a
  compiled model resumes on the eager one and the reverse.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from samkit.optim._distributed import Group, through_flat
from samkit.optim._tensors import lerp_, local

__all__ = [
    "ShardedAverage",
    "average_forward",
    "distinct_keys",
    "keyed_like",
    "new_average",
    "paired_tensors",
    "reshard",
    "saved_average",
    "update_average",
]

#: The submodule name ``torch.compile`` gives the module it wraps (``OptimizedModule``).
_COMPILED = "_orig_mod"

#: The tensors an update pairs: (average's parameters, model's parameters, average's
#: buffers, model's buffers), floating buffers first.
Pairs = tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]


def new_average(
    module: nn.Module, sharded: bool, saved: dict[str, Tensor] | None
) -> nn.Module | ShardedAverage:
    """A fresh average of ``module`` (its current weights, or ``saved``, a loaded state)."""
    if sharded:
        # FSDP2 refuses deepcopy (and a copy would hold whole tensors): keep the
        # average as tensors laid out as the model's, swapped in for the forward.
        return ShardedAverage(module, saved)
    ema = copy.deepcopy(module)
    ema.eval()
    ema.requires_grad_(False)
    if saved is not None:
        ema.load_state_dict(keyed_like(saved, ema.state_dict()))
    return ema


def distinct_keys(module: nn.Module) -> list[str]:
    """The ``state_dict`` keys of ``module``, each tensor once (its first name).

    A tensor held under several names (``self.block2 = self.block``, an output layer whose
    weight is the embedding's) appears once, so that an update touches it once.
    """
    seen: set[int] = set()
    keys = []
    for key, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            keys.append(key)
    return keys


def _eager_name(key: str) -> str:
    """``key`` without ``torch.compile``'s ``_orig_mod`` segments (the eager model's name)."""
    return ".".join(part for part in key.split(".") if part != _COMPILED)


def saved_average(average: nn.Module | ShardedAverage | dict[str, Tensor]) -> dict[str, Tensor]:
    """The average's ``state_dict`` (or a saved one) under the eager model's names (no
    ``_orig_mod.``): what a checkpoint holds, whether the model was compiled or not."""
    state = average if isinstance(average, dict) else average.state_dict()
    return {_eager_name(k): v for k, v in state.items()}


def keyed_like(saved: dict[str, Tensor], live: dict[str, Any]) -> dict[str, Tensor]:
    """``saved`` under the names of ``live`` (a ``state_dict``), compiled or not.

    The names are compared without ``torch.compile``'s ``_orig_mod`` segments; a saved
    average of another model is refused with the entries that differ.
    """
    by_name = {_eager_name(k): v for k, v in saved.items()}
    wanted = {_eager_name(k): k for k in live}
    if by_name.keys() != wanted.keys():
        missing = sorted(wanted.keys() - by_name.keys())
        extra = sorted(by_name.keys() - wanted.keys())
        raise ValueError(
            "MESA.load_state_dict: the saved average does not match the model: "
            f"missing {missing}, unexpected {extra}"
        )
    return {wanted[name]: value for name, value in by_name.items()}


@torch.no_grad()
def average_forward(average: nn.Module | ShardedAverage, module: nn.Module, inputs: Any) -> Any:
    """The outputs of the averaged model on ``inputs`` (no gradient)."""
    if isinstance(average, ShardedAverage):
        return average.forward(module, inputs)
    return average(inputs)


def paired_tensors(module: nn.Module, average: nn.Module | ShardedAverage) -> Pairs:
    """The average's tensors paired with the model's, entry by entry (views, no copies),
    each tensor of the model once (:func:`distinct_keys`)."""
    src, dst = module.state_dict(), average.state_dict()
    if list(src) != list(dst):
        raise RuntimeError("MESA: the model's state_dict keys changed during training")
    keys = distinct_keys(module)
    floats = [k for k in keys if dst[k].is_floating_point()]
    others = [k for k in keys if not dst[k].is_floating_point()]
    buffers = {n for n, _ in module.named_buffers()}
    return (
        [dst[k] for k in floats if k not in buffers],
        [src[k] for k in floats if k not in buffers],
        [dst[k] for k in floats if k in buffers] + [dst[k] for k in others],
        [src[k] for k in floats if k in buffers] + [src[k] for k in others],
    )


@torch.no_grad()
def update_average(pairs: Pairs, weight: float, groups: list[Group], foreach: bool) -> None:
    """``w̄ += weight·(w − w̄)`` for every floating entry (integer buffers are copied).

    The model's floating buffers are first averaged over ``groups`` (the DDP replicas, the
    FSDP2 mesh), so that every process's average stays the same.
    """
    ema_params, params, ema_buffers, buffers_now = pairs
    lerp_(local(ema_params), local(params), weight, foreach)  # shard by shard
    if not ema_buffers:
        return
    buffers = list(buffers_now)
    float_idx = [i for i, b in enumerate(buffers) if b.is_floating_point()]
    if groups and float_idx:

        def average(flat: Tensor) -> None:
            for group in groups:
                group.all_reduce_(flat).div_(group.world)

        floats = [buffers[i] for i in float_idx]
        for i, v in zip(float_idx, through_flat(floats, average, torch.float64)):
            buffers[i] = v.to(buffers[i].dtype)
    lerp_([ema_buffers[i] for i in float_idx], [buffers[i] for i in float_idx], weight, foreach)
    for e, b in zip(ema_buffers, buffers):
        if not e.is_floating_point():
            e.copy_(b)


class ShardedAverage:
    """MESA's averaged weights for a model with sharded (``DTensor``, FSDP2) parameters.

    FSDP2 modules cannot be deep-copied, and a copy of the whole model is what sharding
    avoids. The average is kept instead as one tensor per entry of the model's
    ``state_dict`` and with its layout (parameters: DTensors sharded like the model's,
    ``clone`` of each; buffers: plain tensors; a tensor the model holds under several names
    is one tensor here too). Its forward exchanges these tensors with the model's own, shard
    by shard, runs the model in eval mode and exchanges them back, so the model's weights and
    buffers end bit for bit as they were; the exchange holds one extra tensor at a time.
    """

    def __init__(self, module: nn.Module, saved: dict[str, Tensor] | None = None) -> None:
        live = module.state_dict(keep_vars=True)
        source = live if saved is None else keyed_like(saved, live)
        self.keys = distinct_keys(module)  # what the exchange swaps: each tensor once
        clones: dict[int, Tensor] = {}
        with torch.no_grad():
            for k in self.keys:
                clones[id(live[k])] = source[k].detach().clone()
        self.tensors = {k: clones[id(v)] for k, v in live.items()}

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.tensors)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key, value in keyed_like(state, self.tensors).items():
            self.tensors[key].copy_(value)

    def _exchange(self, live: dict[str, Tensor]) -> None:
        mine = local([self.tensors[k] for k in self.keys])
        theirs = local([live[k] for k in self.keys])
        for a, b in zip(mine, theirs):
            kept = b.clone()
            b.copy_(a)
            a.copy_(kept)

    @torch.no_grad()
    def forward(self, module: nn.Module, inputs: Any) -> Any:
        """``module(inputs)`` in eval mode with the averaged weights and buffers."""
        live = module.state_dict(keep_vars=True)  # the parameter and buffer objects
        if list(live) != list(self.tensors):
            raise RuntimeError("MESA: the model's state_dict keys changed during training")
        modes = [m.training for m in module.modules()]
        reshard(module)
        self._exchange(live)
        try:
            module.eval()
            return module(inputs)
        finally:
            for m, training in zip(module.modules(), modes):
                m.training = training
            reshard(module)
            self._exchange(live)


def reshard(module: nn.Module) -> None:
    """Free the whole (gathered) parameters FSDP2 may keep after a forward.

    FSDP2 keeps the root module's parameters gathered after a forward (for the backward
    that usually follows); a forward under ``no_grad`` has none, and a later forward would
    reuse those gathered values instead of gathering the shards again. Resharding makes the
    next forward read the shards as they are now.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
