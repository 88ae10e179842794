"""SAF: sharpness-aware training for free (Du et al., NeurIPS 2022).

SAF replaces SAM's second pass by a trajectory loss (:mod:`samkit.optim._trajectory`): a KL
divergence between each sample's current logits and its logits recorded ``horizon`` epochs
earlier, kept in a bank by dataset index (:class:`_LogitBank`). MESA, the same loss with the
logits of an average of the weights instead of a bank, is :mod:`samkit.optim.mesa`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from samkit.optim._distributed import replicas_of
from samkit.optim._trajectory import TrajectoryLoss, trajectory_kl
from samkit.optim._validation import is_count
from samkit.optim.base import invalid_value
from samkit.optim.mesa import MESA  # noqa: F401  (importable from here, as before MESA's module)

__all__ = ["SAF", "trajectory_kl"]

#: What a loop that forgets ``set_epoch`` does to SAF (the warning's words).
_STUCK_EPOCH = (
    "SAF is the base optimizer before start_epoch, and compares with stale records after it"
)

#: Bank rows are added in steps of at least this many samples, and by at least 1/4 of the
#: rows already held (amortised growth with at most 25% unused rows).
_GROWTH_ROWS = 1024


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


class SAF(TrajectoryLoss):
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
    (``samkit train`` does); a step before the first call raises, and a sample seen twice in
    one epoch (a forgotten call) warns (:class:`~samkit.RepeatedSampleWarning`). The closure
    must be a :class:`~samkit.BatchClosure` with the batch's dataset ``indices``; the model
    must return logits ``[batch, classes]`` (checked from the first step).

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

    step_globals = ("lmbda", "tau", "start_epoch", "horizon")
    implementation_switches = ("bank_dtype", "bank_device", "bank_rows")  # where records live

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

    def validate_group(self, group: dict[str, Any]) -> None:
        super().validate_group(group)
        if not is_count(group.get("horizon")):
            raise invalid_value("horizon", group.get("horizon"), "an integer >= 1")

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
        epoch = self.current_epoch()
        start, horizon = int(self.step_global("start_epoch")), int(self.step_global("horizon"))
        # Checked from the first step on: the indices, the epoch signal (a sample seen twice
        # in an epoch warns) and, in the pass, logits [batch, classes].
        idx_cpu = self._check_indices(indices, epoch, _STUCK_EPOCH)
        if epoch < start - horizon:  # no record made now is ever read: plain step
            loss = self.run_pass(closure, "clean", sync=True, extra_loss=self._term(None))
            self.base_step()
            return loss
        hi = int(idx_cpu.max())
        bank, read_epoch = self._bank, epoch - horizon
        recorded: list[tuple[Tensor, Tensor]] = []

        def reference(z: Tensor, idx: Tensor | None, rows: int):  # z̃_i: logits of epoch e - Ẽ
            assert idx is not None
            recorded.append((idx, z.detach()))
            if epoch < start:
                return None, None
            return bank.read(idx, read_epoch, z)

        def record() -> None:  # this pass's z_i become the records of epoch e
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

        # L = L_B(w) + λτ²·mean_i KL(softmax(z̃_i/τ) ‖ softmax(z_i/τ)), one pass
        loss = self.run_pass(closure, "clean", sync=True, extra_loss=self._term(reference))
        self.on_accept(record)
        self.base_step()  # w ← base_step(w, ∇L)
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
