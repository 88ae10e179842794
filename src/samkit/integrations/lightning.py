"""samkit optimizers in PyTorch Lightning's automatic optimization.

Lightning already drives a samkit optimizer correctly: in automatic optimization it calls
``optimizer.step(closure)``, and its closure runs ``training_step``, zeroes the gradients and
calls ``backward()``, once per call; a samkit optimizer calls it once per pass. Three things
need care, and :class:`SharpnessAwareMixin` takes care of them::

    import lightning as L          # or: import pytorch_lightning as L
    import samkit
    from samkit.integrations.lightning import SharpnessAwareMixin

    class Classifier(SharpnessAwareMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = ...         # BatchNorm is fine: see model= below

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            if self.is_clean_pass:  # training_step runs once per pass
                self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return samkit.create_optimizer("sam", self.parameters(), model=self,
                                           base="sgd", lr=0.05, momentum=0.9, rho=0.05)

    L.Trainer(max_epochs=10, gradient_clip_val=1.0).fit(Classifier(), loader)

* **Gradient clipping.** Lightning clips after every closure call, that is after every pass:
  the ascent gradient would be clipped too (F-SAM's and Bilateral SAM's updates change; by
  value, SAM's direction too). With the mixin, ``gradient_clip_val`` becomes the optimizer's
  ``max_grad_norm``: the update gradient alone is clipped, by its global norm, right before
  the base step. ``gradient_clip_algorithm="value"`` is refused. Plain torch optimizers are
  clipped by Lightning as usual.
* **BatchNorm.** Lightning's closure is a plain closure, so the optimizer needs ``model=``
  to keep the running statistics to the clean pass; the mixin sets ``model=self`` when the
  optimizer was built without one.
* **Methods that need the batch itself** (``samkit.make_closure``;
  ``OptimizerInfo.needs_batch_closure``) cannot run on Lightning's plain closure and are
  refused before the first step, with the reason (:mod:`samkit.integrations._support`; the
  table in ``docs/scaling.md``).
* **Epochs.** Every step tells the optimizer Lightning's ``current_epoch`` (``set_epoch``).
* **Settings that cannot drive a multi-pass step** are refused with a clear error before the
  first step: ``precision="16-mixed"`` (Lightning then runs the closure once outside
  ``optimizer.step`` and steps through a gradient scaler without it; use ``"bf16-mixed"``)
  and ``accumulate_grad_batches > 1`` (the earlier batches' gradients would be discarded by
  the first pass; use larger batches or ``samkit.make_closure(..., accumulation_steps=k)``
  in manual optimization).

Under Lightning's DDP strategy the closure runs DDP's synchronised backward, so the ascent
gradient is the average over the processes (as ``sync_ascent=True``). The mixin overrides
``configure_gradient_clipping`` and ``optimizer_step``; a module that overrides them too should
call ``super()``. It imports nothing from Lightning: it works with ``lightning`` and
``pytorch_lightning`` alike.
"""

from __future__ import annotations

from typing import Any

from samkit.integrations._clipping import is_samkit, set_max_grad_norm
from samkit.integrations._support import check_supported

__all__ = ["SharpnessAwareMixin"]


class SharpnessAwareMixin:
    """Mix into a ``LightningModule`` (before it in the bases) whose optimizer is samkit's.

    Attributes:
        is_clean_pass: ``True`` while ``training_step`` runs the first pass of a step (the
            clean weights) or runs outside a samkit step; ``False`` in the later passes.
        last_clean_loss: what the last samkit step returned: the loss at the clean weights
            (Lightning itself keeps the last pass's ``training_step`` output).
    """

    is_clean_pass: bool = True
    last_clean_loss: Any = None

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        raw = getattr(optimizer, "optimizer", optimizer)  # Lightning wraps it
        if not is_samkit(raw):
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # type: ignore[misc]
            return
        self._check_trainer_for_samkit(raw)
        if raw.model is None:
            raw.model = self  # BatchNorm statistics from the clean pass only
        raw.set_epoch(self.trainer.current_epoch)  # type: ignore[attr-defined]
        passes = 0

        def counted() -> Any:
            nonlocal passes
            self.is_clean_pass = passes == 0
            passes += 1
            return optimizer_closure()

        try:
            self.last_clean_loss = optimizer.step(closure=counted)
        finally:
            self.is_clean_pass = True

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        raw = getattr(optimizer, "optimizer", optimizer)
        if not is_samkit(raw):
            super().configure_gradient_clipping(  # type: ignore[misc]
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
            return
        algorithm = str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm))
        if gradient_clip_val and gradient_clip_algorithm is not None and algorithm != "norm":
            raise ValueError(
                f"gradient_clip_algorithm={algorithm!r}: a samkit optimizer clips "
                "its update gradient by global norm only (max_grad_norm); use "
                "gradient_clip_algorithm='norm'"
            )
        if gradient_clip_val:  # no clipping here: the optimizer clips the update gradient
            set_max_grad_norm(raw, float(gradient_clip_val))

    def _check_trainer_for_samkit(self, optimizer: Any) -> None:
        """Refuse the methods and the settings a multi-pass step cannot run under; map the
        clipping early."""
        check_supported(optimizer, "Lightning")
        trainer = self.trainer  # type: ignore[attr-defined]
        if getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None:
            raise ValueError(
                f"precision={trainer.precision!r} does not drive a samkit optimizer: Lightning "
                "then runs the closure once outside optimizer.step() and steps through a "
                "gradient scaler without it; use precision='bf16-mixed' or '32-true'"
            )
        accumulate = getattr(trainer, "accumulate_grad_batches", 1)
        if accumulate > 1:
            raise ValueError(
                f"accumulate_grad_batches={accumulate} does not work with a samkit optimizer: "
                "the first pass of each step would discard the gradients of the earlier "
                "batches; use larger batches, or manual optimization with "
                "samkit.make_closure(..., accumulation_steps=k)"
            )
        clip = getattr(trainer, "gradient_clip_val", None)
        self.configure_gradient_clipping(optimizer, clip, trainer.gradient_clip_algorithm)
