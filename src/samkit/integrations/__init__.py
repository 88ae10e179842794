"""samkit inside the trainers people already use (the optional extra ``samkit[integrations]``).

* :mod:`samkit.integrations.lightning` — :class:`~samkit.integrations.lightning.SharpnessAwareMixin`
  for a PyTorch Lightning ``LightningModule``: Lightning's ``gradient_clip_val`` becomes the
  samkit optimizer's ``max_grad_norm`` instead of clipping inside every pass, settings that
  cannot drive a multi-pass step are refused, and ``training_step`` can tell the clean pass.
* :mod:`samkit.integrations.transformers` —
  :class:`~samkit.integrations.transformers.SharpnessAwareTrainer`, a Hugging Face
  ``Trainer`` whose training step drives ``optimizer.step(closure)``.
* Hugging Face Accelerate needs no module: see ``docs/scaling.md``.

Nothing here is imported by ``import samkit``; each module imports its framework when it is
imported itself, and says how to install it when it is missing.
"""

__all__: list[str] = []
