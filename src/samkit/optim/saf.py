"""SAF and MESA: sharpness-aware training for free (Du et al., NeurIPS 2022).

Both replace SAM's second pass by a *trajectory loss*: a KL divergence between the model's
current outputs and reference outputs along the training trajectory, added to the loss of
the one ordinary forward/backward pass of a step.

* :class:`SAF` takes the reference from a bank of each sample's logits recorded
  ``horizon`` epochs earlier (looked up by dataset index);
* :class:`MESA` takes it from an exponential moving average of the weights (one extra
  forward pass of the averaged model per step, no bank).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._pytree import tree_leaves

from samkit.optim import _tensors as T
from samkit.optim._distributed import mesh_groups, replicas_of, through_flat
from samkit.optim._validation import is_count
from samkit.optim.base import SharpnessAwareOptimizer, invalid_value, is_finite_nonnegative
from samkit.optim.closure import BatchClosure

__all__ = ["SAF", "MESA", "trajectory_kl"]

#: Bank rows are added in steps of at least this many samples, and by at least 1/4 of the
#: rows already held (amortised growth with at most 25% unused rows).
_GROWTH_ROWS = 1024


def trajectory_kl(logits: Tensor, reference: Tensor, tau: float, valid: Tensor | None = None):
    r"""Per-sample :math:`\mathrm{KL}(\mathrm{softmax}(r/\tau)\,\|\,\mathrm{softmax}(z/\tau))`.

    ``logits`` ``z`` and ``reference`` ``r`` are ``[B, C]``; the reference is treated as a
    constant (no gradient). Computed in float32 at least (float64 stays float64). Rows where
    ``valid`` is False give 0. Returns ``[B]``.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(logits.to(dtype) / tau, dim=-1)
    log_q = F.log_softmax(reference.detach().to(logits.device, dtype) / tau, dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)
    if valid is not None:
        kl = torch.where(valid.to(kl.device), kl, kl.new_zeros(()))
    return kl


def _as_logits(outputs: Any, method: str) -> Tensor:
    if not isinstance(outputs, Tensor) or outputs.dim() != 2:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise TypeError(
            f"{method}'s trajectory loss needs the model to return logits of shape "
            f"[batch, classes]; got {shape}"
        )
    return outputs


class _TrajectoryLoss(SharpnessAwareOptimizer):
    """Shared by SAF and MESA: one pass per step, loss + lmbda·tau²·KL(reference ‖ current)."""

    needs_epoch = True
    #: The hyperparameters of the one loss term.
    step_globals = ("lmbda", "tau", "start_epoch")
    own_passes = "one pass per step with a loss term"

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        lmbda = group.get("lmbda")
        if not is_finite_nonnegative(lmbda):
            raise invalid_value("lmbda", lmbda, "a finite number >= 0")
        tau = group.get("tau")
        if not (is_finite_nonnegative(tau) and tau > 0):
            raise invalid_value("tau", tau, "a temperature > 0")
        for key in ("start_epoch", "horizon"):
            if key in group and not is_count(group[key]):
                raise invalid_value(key, group[key], "an integer >= 1")

    def _check_closure(self, closure: Any) -> BatchClosure:
        if not isinstance(closure, BatchClosure):
            raise TypeError(
                f"{type(self).__name__} adds a trajectory loss to the batch's loss and needs "
                "the batch: build the closure with samkit.make_closure(model, loss_fn, inputs, "
                "targets, indices=idx)"
            )
        return closure

    def _term(
        self, reference: Callable[[Tensor, Tensor | None, int], tuple[Tensor | None, Any]]
    ) -> Callable[[Any, Tensor | None, Tensor], Tensor]:
        """The ``extra_loss`` of the pass: ``lmbda·tau²·mean_i KL_i`` on each micro-batch.

        ``reference(z, idx, rows)`` gives the reference logits of the micro-batch (or
        ``None``: no term) and a ``valid`` row mask (or ``None``: every row).
        """
        lmbda = float(self.step_global("lmbda"))
        tau = float(self.step_global("tau"))
        name = type(self).__name__

        def extra_loss(outputs: Any, indices: Tensor | None, targets: Tensor) -> Tensor:
            z = _as_logits(outputs, name)
            ref, valid = reference(z, indices, z.shape[0])
            if ref is None or lmbda == 0.0:
                return z.new_zeros((), dtype=torch.promote_types(z.dtype, torch.float32))
            kl = trajectory_kl(z, ref, tau, valid)
            return (lmbda * tau * tau) * kl.sum() / z.shape[0]

        return extra_loss


# ------------------------------------------------------------------------------------- SAF
class _LogitBank:
    """Each sample's logits of the last ``slots`` epochs, keyed by dataset index.

    ``values[i, e % slots]`` holds the logits sample ``i`` had in epoch ``e`` and
    ``epochs[i, e % slots] == e`` says that the record is there (``-1``: never written).
    Rows exist up to the largest index written (plus growth slack), not for a fixed dataset
    size. ``dtype`` ``None`` keeps the logits' dtype; ``device`` ``None`` the logits' device.
    """

    def __init__(
        self,
        slots: int,
        dtype: torch.dtype | None,
        device: torch.device | None,
        rows: int | None = None,
    ):
        self.slots = slots
        self.dtype = dtype
        self.device = device
        self.rows = rows  # rows to allocate at the first write (e.g. the dataset's size)
        self.values: Tensor | None = None  # [capacity, slots, C]
        self.epochs: Tensor | None = None  # [capacity, slots] int32
        self.size = 0  # 1 + the largest index written

    @property
    def nbytes(self) -> int:
        """Bytes allocated (values and epoch tags, growth slack included)."""
        if self.values is None or self.epochs is None:
            return 0
        return self.values.nbytes + self.epochs.nbytes

    def _place(self, like: Tensor) -> None:
        """Fix the bank's device and dtype from the first logits it sees."""
        if self.device is None:
            self.device = like.device
        if self.dtype is None:
            self.dtype = like.dtype
        if self.values is not None and self.values.device != self.device:
            self.values = self.values.to(self.device)
            self.epochs = self.epochs.to(self.device)  # type: ignore[union-attr]

    def read(self, idx: Tensor, epoch: int, like: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """Logits of samples ``idx`` recorded in ``epoch`` and which of them exist."""
        if self.values is None or self.size == 0:
            return None, None
        self._place(like)
        i = idx.to(self.device)
        in_range = i < self.size
        safe = i.clamp(max=self.size - 1)
        slot = epoch % self.slots
        assert self.epochs is not None
        valid = in_range & (self.epochs[safe, slot] == epoch)
        return self.values[safe, slot].to(like.device), valid.to(like.device)

    def write(self, idx: Tensor, logits: Tensor, epoch: int, largest: int) -> None:
        """Record ``logits`` (``[n, C]``) of samples ``idx`` (distinct) for ``epoch``."""
        self._place(logits)
        classes = logits.shape[1]
        if self.values is not None and self.values.shape[2] != classes:
            raise ValueError(
                f"SAF: the model returns {classes} logits per sample but the bank holds "
                f"{self.values.shape[2]}"
            )
        needed = largest + 1
        capacity = 0 if self.values is None else self.values.shape[0]
        if needed > capacity:
            if capacity == 0 and self.rows is not None and self.rows >= needed:
                new = self.rows  # the announced size: one allocation, no growth copies
            else:
                new = max(needed, capacity + max(capacity // 4, _GROWTH_ROWS))
            values = torch.zeros(new, self.slots, classes, dtype=self.dtype, device=self.device)
            epochs = torch.full((new, self.slots), -1, dtype=torch.int32, device=self.device)
            if self.values is not None and self.epochs is not None:
                values[:capacity] = self.values
                epochs[:capacity] = self.epochs
            self.values, self.epochs = values, epochs
        assert self.values is not None and self.epochs is not None
        i = idx.to(self.device)
        slot = epoch % self.slots
        self.values[i, slot] = logits.detach().to(self.device, self.dtype)
        self.epochs[i, slot] = epoch
        self.size = max(self.size, needed)

    def state_dict(self) -> dict[str, Any]:
        if self.values is None or self.epochs is None:
            return {"slots": self.slots, "size": 0}
        # The recorded rows only; a view, so saving it costs no copy (torch.save writes the
        # storage, i.e. at most the growth slack more).
        return {
            "slots": self.slots,
            "size": self.size,
            "values": self.values[: self.size],
            "epochs": self.epochs[: self.size],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state.get("slots", self.slots)) != self.slots:
            raise ValueError(
                f"SAF.load_state_dict: the saved bank keeps {state['slots']} epochs per sample "
                f"but this optimizer keeps {self.slots} (horizon + 1): use the same horizon"
            )
        self.size = int(state.get("size", 0))
        if self.size == 0 or "values" not in state:
            self.values = self.epochs = None
            self.size = 0
            return
        values, epochs = state["values"], state["epochs"]
        if self.dtype is not None:
            values = values.to(self.dtype)
        if self.device is not None:
            values, epochs = values.to(self.device), epochs.to(self.device)
        self.values, self.epochs = values.clone(), epochs.to(torch.int32).clone()


class SAF(_TrajectoryLoss):
    r"""Sharpness-Aware training for Free: a trajectory loss instead of SAM's second pass.

    SAM needs a second forward/backward pass at perturbed weights. SAF instead penalises how
    fast the outputs on each training sample move along the trajectory of the weights: a
    sharp minimum is one where the loss drops suddenly, so the outputs the model gave a
    sample a few epochs ago are far from its current outputs. One step at epoch :math:`e`,
    with :math:`z_i` the logits of sample :math:`i` (dataset index) in this step's one pass
    and :math:`\tilde z_i` its logits recorded :math:`\tilde E` epochs earlier (``horizon``):

    .. math::

        L = L_B(w) + \lambda\,\tau^2\,\frac{1}{|B|}\sum_{i \in B}
            \mathrm{KL}\!\left(\mathrm{softmax}(\tilde z_i/\tau)\,\middle\|\,
            \mathrm{softmax}(z_i/\tau)\right)
        \qquad (e \ge \text{start\_epoch}),

    :math:`\tilde z_i` a constant; the base optimizer then steps with :math:`\nabla L`.
    A sample without a record from epoch :math:`e - \tilde E` (not seen then) adds nothing;
    before ``start_epoch`` the term is 0. After the step is accepted, the logits :math:`z_i`
    of this pass are recorded for epoch :math:`e`.

    **Cost.** One forward and one backward pass per step (``passes`` 1.0) plus the KL on the
    logits and the bank's gather/scatter. The bank holds :math:`N \times (\tilde E + 1)
    \times C` values (:math:`N` = 1 + the largest index seen) in the logits' dtype (float32
    unless training under autocast; ``bank_dtype=torch.bfloat16`` or ``torch.float16``
    halves it) plus :math:`N \times (\tilde E + 1)` int32 epoch tags. With
    :math:`\tilde E = 3`: CIFAR-100 (50,000 × 4 × 100) 80 MB in float32, 40 MB in 16 bits;
    ImageNet-1k (1,281,167 × 4 × 1000) 20.5 GB in float32, 10.3 GB in 16 bits (put it in host
    memory with ``bank_device="cpu"``). Rows are allocated as indices appear (at most 25%
    slack), and only from epoch ``start_epoch - horizon`` on, when records start to matter.

    **Epochs.** Call ``optimizer.set_epoch(e)`` (``e`` from 0) at the start of every epoch
    (``samkit train`` does); a step before the first call raises. The closure must be a
    :class:`~samkit.BatchClosure` with the batch's dataset ``indices``.

    **DDP.** The one pass is synchronised (gradients averaged as in plain DDP training). The
    bank is the same on every replica: each accepted step all-gathers the replicas'
    (indices, logits), so a sample's record is found whichever replica sees it in a later
    epoch. Cost: one all-gather of ``B × C`` logits per step.

    Args:
        params: parameters, named parameters or param groups (``lmbda``, ``tau``,
            ``start_epoch`` and ``horizon`` must be the same in every group).
        base_optimizer: a ``torch.optim.Optimizer`` class or a name (``"sgd"``, ...); its
            arguments (``lr``, ``momentum``, ``weight_decay``, ...) pass through ``**kwargs``.
        lmbda: weight :math:`\lambda` of the trajectory loss (default 0.3, the official
            README's and ResNet-50 ImageNet script's value for SAF).
        tau: temperature :math:`\tau` of the softmax (default 5).
        start_epoch: first epoch (from 0) with the term (default 6: the official code adds
            it while ``epoch > 5``).
        horizon: :math:`\tilde E`, how many epochs back the reference logits are (default 3).
        bank_dtype: dtype of the bank (default ``None``: the logits' dtype).
        bank_device: where the bank lives (default ``None``: the logits' device).
        bank_rows: rows to allocate at the bank's first write, e.g. ``len(dataset)``
            (default ``None``: grow with the largest index seen). Growing copies the bank
            into a larger one, so while it grows both exist; announcing the size avoids that
            transient (the bank still grows if a larger index appears).
        **kwargs: samkit's options of :class:`~samkit.SharpnessAwareOptimizer` and the base
            optimizer's arguments.

    Example::

        opt = samkit.SAF(model.parameters(), "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
        for epoch in range(epochs):
            opt.set_epoch(epoch)
            for x, y, idx in loader:  # idx: dataset indices of the batch
                loss = opt.step(samkit.make_closure(model, loss_fn, x, y, indices=idx))

    Differences from the paper / official code:
        * The official bank is a dense array of 15,000,000 × 4 × 1000 float32 values on the
          host, read as zeros for a sample never recorded (a KL towards the uniform
          distribution); samkit's grows with the indices seen, lives on the logits' device
          by default, and a sample without a record from epoch :math:`e - \tilde E` adds no
          term.
        * The official bank is per process: under DDP, where each replica sees other samples
          every epoch, most lookups miss. samkit's bank is shared (all-gathered each step).
        * Logits are recorded once the step is accepted (a skipped step records nothing),
          and only from epoch ``start_epoch - horizon`` on (the official code records from
          epoch 0).
        * The official script's argparse defaults are ``reinforce`` (:math:`\lambda`) 0.16
          and ``minus_epoch`` (:math:`\tilde E`) 3; its README recommends 0.3 for SAF (0.8
          for MESA) and :math:`\tilde E` 2 or 3, and its ResNet-50 command uses 0.3 and 2.
          samkit's defaults are 0.3 and 3.
        * The returned loss includes the trajectory term (the official code logs it too).

    References:
        J. Du, D. Zhou, J. Feng, V. Y. F. Tan, J. T. Zhou. Sharpness-Aware Training for
        Free. NeurIPS 2022. https://arxiv.org/abs/2205.14083 ; official code:
        https://github.com/AngusDujw/SAF
    """

    method_name = "saf"
    step_globals = ("lmbda", "tau", "start_epoch", "horizon")

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        lmbda: float = 0.3,
        tau: float = 5.0,
        start_epoch: int = 6,
        horizon: int = 3,
        bank_dtype: torch.dtype | None = None,
        bank_device: str | torch.device | None = None,
        bank_rows: int | None = None,
        **kwargs: Any,
    ) -> None:
        if bank_dtype is not None and not (
            isinstance(bank_dtype, torch.dtype) and bank_dtype.is_floating_point
        ):
            raise TypeError(f"Invalid bank_dtype value: {bank_dtype!r} (a floating torch.dtype)")
        if bank_rows is not None and not is_count(bank_rows):
            raise invalid_value("bank_rows", bank_rows, "an integer >= 1 or None")
        defaults = dict(lmbda=lmbda, tau=tau, start_epoch=start_epoch, horizon=horizon)
        super().__init__(params, base_optimizer, defaults, **kwargs)
        device = None if bank_device is None else torch.device(bank_device)
        self._bank = _LogitBank(int(self.step_global("horizon")) + 1, bank_dtype, device, bank_rows)

    @property
    def bank(self) -> _LogitBank:
        """The logit bank (``values`` ``[N, horizon + 1, C]``, ``epochs``, ``nbytes``)."""
        return self._bank

    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        batch = self._check_closure(closure)
        indices = batch.indices
        if indices is None:
            raise TypeError(
                "SAF looks up each sample's past logits by its dataset index: build the "
                "closure with samkit.make_closure(model, loss_fn, inputs, targets, indices=idx)"
            )
        if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise TypeError(
                f"SAF needs indices as a 1-D integer tensor, got {indices.dtype} of shape "
                f"{tuple(indices.shape)}"
            )
        epoch = self.current_epoch()
        start, horizon = int(self.step_global("start_epoch")), int(self.step_global("horizon"))
        if epoch < start - horizon:  # no record made now is ever read: plain step
            loss = self.run_pass(closure, "clean", sync=True)
            self.base_step()
            return loss
        lo, hi = torch.stack(list(torch.aminmax(indices.detach()))).tolist()  # a GPU: 1 sync
        if lo < 0:
            raise ValueError(f"SAF: dataset indices must be >= 0, got {lo}")
        bank, read_epoch = self._bank, epoch - horizon
        recorded: list[tuple[Tensor, Tensor]] = []

        def reference(z: Tensor, idx: Tensor | None, rows: int):
            assert idx is not None
            recorded.append((idx, z.detach()))
            if epoch < start:
                return None, None
            return bank.read(idx, read_epoch, z)

        def record() -> None:
            idx = torch.cat([i for i, _ in recorded]).to(torch.long)
            logits = torch.cat([z for _, z in recorded])
            largest = hi
            replicas = replicas_of(closure.model)
            if replicas is not None:  # every replica records every replica's samples
                idx = replicas.all_gather_rows(idx.to(logits.device))
                logits = replicas.all_gather_rows(logits)
                largest = int(idx.max())
            idx, logits = _first_occurrences(idx, logits)
            bank.write(idx, logits, epoch, largest)

        loss = self.run_pass(closure, "clean", sync=True, extra_loss=self._term(reference))
        self.on_accept(record)
        self.base_step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["saf_bank"] = self._bank.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        bank = sd.pop("saf_bank", None)
        super().load_state_dict(sd)
        if bank is not None:
            self._bank.load_state_dict(bank)


def _first_occurrences(idx: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """``idx`` without repeats (the first occurrence of each index wins), and its rows."""
    uniq, inverse = torch.unique(idx, return_inverse=True)
    if uniq.numel() == idx.numel():
        return idx, rows
    position = torch.arange(idx.numel(), device=idx.device)
    first = torch.full((uniq.numel(),), idx.numel(), device=idx.device, dtype=torch.long)
    first.scatter_reduce_(0, inverse, position, reduce="amin")
    return idx[first], rows[first]


# ------------------------------------------------------------------------------------ MESA
class MESA(_TrajectoryLoss):
    r"""Memory-Efficient Sharpness-Aware training: SAF with an averaged model as reference.

    The reference outputs of the trajectory loss come from an exponential moving average
    (EMA) of the weights instead of a bank of past logits, so memory does not grow with the
    dataset. One step at epoch :math:`e`, with :math:`\bar w` the EMA of the weights:

    .. math::

        \bar z &= f(x; \bar w) \quad\text{(eval mode, no gradient)},\\
        L &= L_B(w) + \lambda\,\tau^2\,\frac{1}{|B|}\sum_{i \in B}
            \mathrm{KL}\!\left(\mathrm{softmax}(\bar z_i/\tau)\,\middle\|\,
            \mathrm{softmax}(z_i/\tau)\right) \qquad (e \ge \text{start\_epoch}),\\
        w &\leftarrow \mathrm{base\_step}(w, \nabla L), \qquad
        \bar w \leftarrow \beta\,\bar w + (1 - \beta)\,w .

    The averaged model is a copy of the model made at the first step (in eval mode, no
    gradients); every entry of its ``state_dict`` is averaged (parameters and BatchNorm
    statistics; integer buffers are copied), after each accepted step, with the updated
    weights. It is part of :meth:`state_dict`.

    **Cost.** One forward/backward pass plus one forward pass of the averaged model under
    ``no_grad`` per step from ``start_epoch`` on (``passes`` 4/3 with forward = 1/3 of a
    pass; the forward is counted in the closure's ``forward_evals``); before ``start_epoch``
    the step is one pass plus the average's update. Memory: one copy of the model.

    **Needs** the model (``model=`` or the :class:`~samkit.BatchClosure`'s) and the epoch
    (``set_epoch``); the closure must be a ``BatchClosure`` (indices are not needed).

    **DDP.** The one pass is synchronised. The replicas' weights are identical, hence so are
    their averages; BatchNorm statistics (updated by each replica's own batch) are averaged
    over the replicas before entering the EMA (one small all-reduce per step), so the
    averaged models stay identical too.

    **FSDP2.** On sharded (``DTensor``) parameters the average is not a copy of the model
    (FSDP2 modules cannot be deep-copied): it is kept as tensors laid out as the model's
    ``state_dict`` (parameters sharded like the model's, so each process holds its shards of
    the average, never the whole tensors), and the averaged forward exchanges them with the
    model's weights and buffers shard by shard, runs the model in eval mode and exchanges
    them back (bit-exact; one extra tensor at a time). The result equals the DDP run's.
    BatchNorm statistics, which FSDP2 does not synchronise, are averaged over the
    processes of the parameters' mesh before entering the EMA. :attr:`ema_model` is then
    ``None``; the average is ``state_dict()["mesa_ema"]`` (sharded, as the model's).

    Args:
        params: parameters, named parameters or param groups (``lmbda``, ``tau``,
            ``start_epoch`` and ``decay`` must be the same in every group).
        base_optimizer: a ``torch.optim.Optimizer`` class or a name.
        lmbda: weight :math:`\lambda` of the trajectory loss (default 0.8, the official
            README's and ImageNet command's value for MESA).
        tau: temperature :math:`\tau` (default 5).
        start_epoch: first epoch (from 0) with the term (default 6: ``epoch > 5`` in the
            official code).
        decay: :math:`\beta`, decay of the weight average (default 0.9998, timm's
            ``ModelEmaV2`` value used by the official code; for short runs use less, e.g.
            0.99 for a few thousand steps).
        **kwargs: samkit's options and the base optimizer's arguments.

    Example::

        opt = samkit.MESA(model.parameters(), "sgd", model=model, lr=0.1, momentum=0.9)
        for epoch in range(epochs):
            opt.set_epoch(epoch)
            for x, y in loader:
                loss = opt.step(samkit.make_closure(model, loss_fn, x, y))

    Differences from the paper / official code:
        * The official code runs the averaged model on every step, also before the term
          starts; samkit runs it only while the term is on.
        * The average is updated only after accepted steps (a skipped step leaves it as it
          was); the official update follows every ``optimizer.step()``.
        * Under DDP, BatchNorm statistics are averaged over replicas before entering the EMA
          (timm's EMA takes each process's own statistics).
        * The averaged model's forward runs on the whole batch at once (no micro-batches)
          under the closure's autocast dtype.
        * The returned loss includes the trajectory term (the official code logs it too).

    References:
        J. Du, D. Zhou, J. Feng, V. Y. F. Tan, J. T. Zhou. Sharpness-Aware Training for
        Free. NeurIPS 2022. https://arxiv.org/abs/2205.14083 ; official code:
        https://github.com/AngusDujw/SAF (``MESA_train.py``)
    """

    method_name = "mesa"
    step_globals = ("lmbda", "tau", "start_epoch", "decay")

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Any = "sgd",
        lmbda: float = 0.8,
        tau: float = 5.0,
        start_epoch: int = 6,
        decay: float = 0.9998,
        **kwargs: Any,
    ) -> None:
        defaults = dict(lmbda=lmbda, tau=tau, start_epoch=start_epoch, decay=decay)
        super().__init__(params, base_optimizer, defaults, **kwargs)
        #: The averaged model: a copy of the model, or (sharded parameters) a
        #: :class:`_ShardedAverage` whose tensors are swapped into the model for its forward.
        self._ema: nn.Module | _ShardedAverage | None = None
        self._ema_source: nn.Module | None = None
        self._ema_pending: dict[str, Tensor] | None = None
        #: (EMA parameters, parameters, EMA buffers, buffers): views, paired once per model.
        self._ema_pairs: tuple[list[Tensor], ...] | None = None

    def validate_group(self, group: dict[str, Any]) -> None:
        decay = group.get("decay")
        if not (is_finite_nonnegative(decay) and decay < 1.0):
            raise ValueError(f"Invalid decay value: {decay!r} (in [0, 1))")
        super().validate_group(group)

    @property
    def ema_model(self) -> nn.Module | None:
        """The averaged model (``None`` before the first step and on sharded parameters).

        On sharded (FSDP2) parameters there is no separate model: the averaged weights are
        in ``state_dict()["mesa_ema"]`` (laid out as the model's own ``state_dict``).
        """
        return self._ema if isinstance(self._ema, nn.Module) else None

    def _module(self, closure: BatchClosure) -> nn.Module:
        model = self.model if self.model is not None else closure.model
        return getattr(model, "module", model) if hasattr(model, "no_sync") else model

    def _averaged_model(self, module: nn.Module) -> nn.Module | _ShardedAverage:
        """The EMA model of ``module`` (a fresh copy if there is none yet)."""
        if self._ema is not None:
            if self._ema_source is not module:  # another model object: re-pair the tensors
                self._ema_source, self._ema_pairs = module, None
            return self._ema
        if T.is_sharded([p for g in self.param_groups for p in g["params"]]):
            # FSDP2 refuses deepcopy (and a copy would hold whole tensors): keep the
            # average as tensors laid out as the model's, swapped in for the forward.
            return _ShardedAverage(module, self._ema_pending)
        ema = copy.deepcopy(module)
        ema.eval()
        ema.requires_grad_(False)
        if self._ema_pending is not None:
            ema.load_state_dict(self._ema_pending)
        return ema

    def sharpness_step(self, closure: Callable[[], Any]) -> Any:
        batch = self._check_closure(closure)
        epoch = self.current_epoch()
        module = self._module(batch)
        ema = self._averaged_model(module)
        decay = float(self.step_global("decay"))

        extra = None
        if epoch >= int(self.step_global("start_epoch")):
            with torch.no_grad(), _autocast_like(batch):
                if isinstance(ema, _ShardedAverage):
                    reference = _as_logits(ema.forward(module, batch.inputs), "MESA")
                else:
                    reference = _as_logits(ema(batch.inputs), "MESA")
            batch.forward_evals += 1.0  # the averaged model's forward: 1/3 of a pass
            batch.passes += 1
            offset = [0]

            def rows_of(z: Tensor, idx: Tensor | None, rows: int):
                lo = offset[0]
                offset[0] = lo + rows
                return reference[lo : lo + rows], None

            extra = self._term(rows_of)

        loss = self.run_pass(closure, "clean", sync=True, extra_loss=extra)

        def update() -> None:
            if self._ema is None:
                self._ema, self._ema_source, self._ema_pending = ema, module, None
            self._update_average(module, decay, closure)

        self.on_accept(update)
        self.base_step()
        return loss

    @torch.no_grad()
    def _update_average(self, module: nn.Module, decay: float, closure: Any) -> None:
        assert self._ema is not None
        sharded = isinstance(self._ema, _ShardedAverage)
        if self._ema_pairs is None or sharded:
            # Sharded: paired anew each time (FSDP2 may re-create its parameters' shards).
            src, dst = module.state_dict(), self._ema.state_dict()
            if list(src) != list(dst):
                raise RuntimeError("MESA: the model's state_dict keys changed during training")
            floats = [k for k, v in dst.items() if v.is_floating_point()]
            others = [k for k, v in dst.items() if not v.is_floating_point()]
            buffers = {n for n, _ in module.named_buffers()}
            self._ema_pairs = (
                [dst[k] for k in floats if k not in buffers],
                [src[k] for k in floats if k not in buffers],
                [dst[k] for k in floats if k in buffers] + [dst[k] for k in others],
                [src[k] for k in floats if k in buffers] + [src[k] for k in others],
            )
        ema_params, params, ema_buffers, buffers_now = self._ema_pairs
        weight = 1.0 - decay
        _lerp_(T.local(ema_params), T.local(params), weight, self.foreach)  # shards
        if not ema_buffers:
            return
        buffers = list(buffers_now)
        # Each replica's BatchNorm statistics come from its own batch, and FSDP2 does not
        # synchronise buffers: average them over the replicas and the mesh.
        params = [p for g in self.param_groups for p in g["params"]]
        groups = [replicas_of(closure.model), *(mesh_groups(params) if sharded else [])]
        groups = [g for g in groups if g is not None]
        float_idx = [i for i, b in enumerate(buffers) if b.is_floating_point()]
        if groups and float_idx:

            def average(flat: Tensor) -> None:
                for group in groups:
                    group.all_reduce_(flat).div_(group.world)

            floats = [buffers[i] for i in float_idx]
            for i, v in zip(float_idx, through_flat(floats, average, torch.float64)):
                buffers[i] = v.to(buffers[i].dtype)
        _lerp_(
            [ema_buffers[i] for i in float_idx],
            [buffers[i] for i in float_idx],
            weight,
            self.foreach,
        )
        for e, b in zip(ema_buffers, buffers):
            if not e.is_floating_point():
                e.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self._ema is not None:
            sd["mesa_ema"] = self._ema.state_dict()
        elif self._ema_pending is not None:
            sd["mesa_ema"] = self._ema_pending
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        ema = sd.pop("mesa_ema", None)
        super().load_state_dict(sd)
        if ema is None:
            return
        if self._ema is not None:
            self._ema.load_state_dict(ema)
        else:
            self._ema_pending = dict(ema)


class _ShardedAverage:
    """MESA's averaged weights for a model with sharded (``DTensor``, FSDP2) parameters.

    FSDP2 modules cannot be deep-copied, and a copy of the whole model is what sharding
    avoids. The average is kept instead as one tensor per entry of the model's
    ``state_dict`` and with its layout (parameters: DTensors sharded like the model's,
    ``clone`` of each; buffers: plain tensors). Its forward exchanges these tensors with the
    model's own, shard by shard, runs the model in eval mode and exchanges them back, so the
    model's weights and buffers end bit for bit as they were; the exchange holds one extra
    tensor at a time.
    """

    def __init__(self, module: nn.Module, saved: dict[str, Tensor] | None = None) -> None:
        live = module.state_dict()
        if saved is not None and list(saved) != list(live):
            raise ValueError(
                "MESA.load_state_dict: the saved average has the entries "
                f"{sorted(saved)}, the model has {sorted(live)}"
            )
        source = saved if saved is not None else live
        with torch.no_grad():
            self.tensors = {k: source[k].detach().clone() for k in live}

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.tensors)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if list(state) != list(self.tensors):
            raise ValueError(
                f"MESA.load_state_dict: the saved average has the entries {sorted(state)}, "
                f"the model has {sorted(self.tensors)}"
            )
        for key, value in state.items():
            self.tensors[key].copy_(value)

    def _exchange(self, live: dict[str, Tensor]) -> None:
        mine = T.local([self.tensors[k] for k in live])
        theirs = T.local(list(live.values()))
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
        _reshard(module)
        self._exchange(live)
        try:
            module.eval()
            return module(inputs)
        finally:
            for m, training in zip(module.modules(), modes):
                m.training = training
            _reshard(module)
            self._exchange(live)


def _reshard(module: nn.Module) -> None:
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


def _lerp_(targets: list[Tensor], sources: list[Tensor], weight: float, foreach: bool) -> None:
    """In place ``t += weight · (s - t)``, grouped by device and dtype."""
    if not targets:
        return
    if not foreach:
        for t, s in zip(targets, sources):
            t.lerp_(s.to(t.dtype), weight)
        return
    for t_bucket, s_bucket in T.group_by_device_dtype(targets, sources):
        torch._foreach_lerp_(t_bucket, [s.to(t.dtype) for s, t in zip(s_bucket, t_bucket)], weight)


def _autocast_like(closure: BatchClosure):
    """The closure's autocast context (its ``autocast_dtype`` on the inputs' device)."""
    dtype = getattr(closure, "autocast_dtype", None)
    if dtype is None:
        return contextlib.nullcontext()
    leaves = [t for t in tree_leaves(closure.inputs) if isinstance(t, Tensor)]
    device_type = leaves[0].device.type if leaves else "cpu"
    return torch.autocast(device_type=device_type, dtype=dtype)
