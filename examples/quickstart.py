"""SAM on MNIST-1D with the library API (the loop `samkit train` runs, written out)."""

import math

import torch
from torch import nn

import samkit
from samkit.train import create_model, load_dataset

torch.manual_seed(0)
torch.set_num_threads(1)  # a tiny model: threads cost more than they save
data = load_dataset("mnist1d")  # 4,000 train / 1,000 test signals [N, 1, 40], 10 classes
model = create_model("cnn1d", data.info)
opt = samkit.create_optimizer(
    "sam", model.parameters(), base="sgd", model=model, lr=0.05, momentum=0.9,
    weight_decay=5e-4, rho=0.1,
)  # fmt: skip
epochs, batch, n = 30, 128, data.info.num_train
total = epochs * math.ceil(n / batch)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
loss_fn = nn.CrossEntropyLoss(reduction="none")  # per-sample losses: some methods need them

for epoch in range(epochs):
    perm = torch.randperm(n)
    for i in range(0, n, batch):
        idx = perm[i : i + batch]
        x, y = data.x_train[idx], data.y_train[idx]  # [128, 1, 40], [128]
        closure = samkit.make_closure(model, loss_fn, x, y, indices=idx)
        loss = opt.step(closure)  # same line for SGD and every sharpness-aware method
        sched.step()
    with torch.no_grad():
        acc = (model.eval()(data.x_test).argmax(1) == data.y_test).float().mean()
    model.train()
    print(f"epoch {epoch + 1:2d}  train loss {loss.item():.3f}  test acc {acc.item():.2%}")
