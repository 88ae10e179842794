"""SAM in PyTorch Lightning: a LightningModule that returns a samkit optimizer.

    pip install "samkit[integrations]"
    python examples/lightning_sam.py                 # 10 epochs on the scikit-learn digits
    python examples/lightning_sam.py --epochs 1 --clip 1.0

The module mixes in ``SharpnessAwareMixin``: Lightning's ``gradient_clip_val`` then clips the
update gradient once per step (the optimizer's ``max_grad_norm``), not every pass; the
optimizer gets ``model=self``, so the BatchNorm statistics come from the clean pass only;
``training_step`` runs once per pass and logs on the clean one.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import samkit
from samkit.integrations.lightning import SharpnessAwareMixin
from samkit.train import create_model, load_dataset

try:
    import lightning.pytorch as pl
except ImportError:  # the older package name
    import pytorch_lightning as pl


class DigitsClassifier(SharpnessAwareMixin, pl.LightningModule):
    def __init__(self, info, method: str = "sam", rho: float = 0.05, lr: float = 0.05):
        super().__init__()
        self.net = create_model("cnn_small", info)  # conv-BatchNorm-ReLU blocks
        self.method, self.rho, self.lr = method, rho, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.is_clean_pass:  # the loss at the clean weights, once per step
            self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        acc = (self.net(x).argmax(1) == y).float().mean()
        self.log("val_acc", acc, prog_bar=True)

    def configure_optimizers(self):
        return samkit.create_optimizer(
            self.method, self.parameters(), model=self, base="sgd", lr=self.lr, momentum=0.9,
            weight_decay=5e-4, rho=self.rho,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--method", default="sam")
    ap.add_argument("--clip", type=float, default=None, help="gradient_clip_val")
    ap.add_argument("--limit-train", type=int, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    data = load_dataset("digits", limit_train=args.limit_train)
    train = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=64, shuffle=True)
    test = DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=256)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1, gradient_clip_val=args.clip,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(DigitsClassifier(data.info, method=args.method), train, test)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print(f"validation accuracy {metrics['val_acc']:.2%}")
    return metrics


if __name__ == "__main__":
    main()
