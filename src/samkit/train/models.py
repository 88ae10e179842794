"""Models for ``samkit train``, written here (no torchvision), and a small registry.

``create_model(name, dataset_info, **model_args)`` builds a model for the input shape and
number of classes of a dataset; ``list_models()`` gives the names. Every model takes a batch
``[B, *input_shape]`` and returns logits ``[B, num_classes]``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from samkit.train.data import DatasetInfo

__all__ = [
    "MODELS",
    "ModelInfo",
    "CNN1D",
    "MLP",
    "SmallCNN",
    "Transformer",
    "ResNet",
    "WideResNet",
    "create_model",
    "list_models",
]


class CNN1D(nn.Module):
    """The MNIST-1D convolutional baseline: three 1-D convolutions with ReLU and a linear layer.

    Shaped after the mnist1d authors' ``ConvBase`` (three convolutions, then a linear layer
    on the flattened features) with "same" padding (``k // 2``) and less downsampling: by
    default kernels 5 and strides (1, 1, 2), so length 40 stays 40, 40, then 20, and the
    classifier sees ``channels·20`` features (640 with 32 channels; 16,906 parameters).
    ``ConvBase`` itself (strides 2, 2, 2, down to length 5) reaches only ~86% test accuracy
    with the 30-epoch SGD recipe; this one ~94%.
    ``kernels=(5, 3, 3), strides=(2, 2, 2)`` gives a ConvBase-like network.
    """

    def __init__(
        self,
        in_channels: int,
        length: int,
        num_classes: int,
        channels: int = 32,
        kernels: tuple[int, ...] = (5, 5, 5),
        strides: tuple[int, ...] = (1, 1, 2),
    ):
        super().__init__()
        if len(kernels) != len(strides):
            raise ValueError(f"kernels {kernels} and strides {strides} differ in length")
        layers: list[nn.Module] = []
        cin, out_len = in_channels, length
        for k, s in zip(kernels, strides):
            layers += [nn.Conv1d(cin, channels, k, stride=s, padding=k // 2), nn.ReLU()]
            cin, out_len = channels, (out_len + 2 * (k // 2) - k) // s + 1
        self.features = nn.Sequential(*layers)  # [B, 1, 40] -> [B, C, 20] by default
        self.linear = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # [B, L] -> [B, 1, L]
            x = x.unsqueeze(1)
        return self.linear(self.features(x).flatten(1))


class MLP(nn.Module):
    """Fully connected ReLU network on the flattened input: ``depth`` hidden layers."""

    def __init__(self, in_features: int, num_classes: int, width: int = 256, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """Small 2-D CNN with BatchNorm for tiny images (8×8 digits): three conv-BN-ReLU layers,
    a 2×2 max-pool after the second, global average pooling and a linear classifier."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_channels, width),
            *_conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv_bn(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    """ResNet basic block (post-activation): conv-BN-ReLU-conv-BN + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:  # 1x1 projection when the shape changes
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn1(self.conv1(x)).relu()
        h = self.bn2(self.conv2(h))
        return (h + self.shortcut(x)).relu()


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016): a 3×3 stride-1 stem without max-pooling, four
    stages of basic blocks with ``width·(1, 2, 4, 8)`` channels, the last three starting
    with stride 2, global average pooling, linear classifier. ``blocks=(2, 2, 2, 2)`` is
    ResNet-18."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        width: int = 64,
    ):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_channels, width))
        stages: list[nn.Module] = []
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                stages.append(_BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.stages(self.stem(x))))


class _WideBlock(nn.Module):
    """Pre-activation wide-ResNet block: BN-ReLU-conv-(dropout)-BN-ReLU-conv + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a = self.bn1(x).relu()
        h = self.conv1(a)
        h = self.conv2(self.dropout(self.bn2(h).relu()))
        # The projection shortcut takes the pre-activated input, as in Zagoruyko & Komodakis.
        return h + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """Wide ResNet WRN-``depth``-``widen`` (Zagoruyko & Komodakis 2016) for small images.

    ``(depth - 4) / 6`` pre-activation blocks per stage, three stages of ``16·widen``,
    ``32·widen``, ``64·widen`` channels (strides 1, 2, 2), BN-ReLU, global average pooling.
    ``depth=28, widen=10`` is WRN-28-10, the usual SAM benchmark model.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int = 28,
        widen: int = 10,
        dropout: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"Invalid WRN depth {depth}: must be 6n + 4 with n >= 1")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for stage, cout in enumerate(widths[1:]):
            for j in range(n):
                stride = 2 if (stage > 0 and j == 0) else 1
                blocks.append(_WideBlock(cin, cout, stride, dropout))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))))


class _Block(nn.Module):
    """One transformer block without LayerNorm: ``h + attention(h)``, then ``h + mlp(h)``."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_width), nn.ReLU(), nn.Linear(mlp_width, width)
        )

    def forward(self, h: Tensor, last_only: bool = False) -> Tensor:
        """``h``: [B, T, W] -> [B, T, W], or [B, 1, W] for the last position alone with
        ``last_only`` (its query attends to every position; the other queries, and the MLP
        on the other positions, are not computed: the same last row, a third of the work)."""
        b, t, w = h.shape
        split = (self.heads, w // self.heads)
        k, v = nn.functional.linear(h, self.qkv.weight[w:]).view(b, t, 2, *split).unbind(2)
        rows = h[:, -1:] if last_only else h
        q = nn.functional.linear(rows, self.qkv.weight[:w]).view(b, -1, *split)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, heads, T or 1, W/heads]
        # Written out (not scaled_dot_product_attention): second derivatives for the Hessian
        # measurements, torch.func for per-sample gradients, on every backend.
        att = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)
        rows = rows + self.proj((att @ v).transpose(1, 2).reshape(b, -1, w))
        return rows + self.mlp(rows)


class Transformer(nn.Module):
    """A small transformer on token sequences, classifying from the last position.

    Token and learned position embeddings, ``layers`` blocks (multi-head self-attention
    over the whole sequence and a ReLU MLP, each added to the residual stream; no
    LayerNorm, as in the one-layer model Nanda et al. 2023 train on modular addition), and a
    linear read-out of the last token (``=`` in ``modular-add``); the last block computes
    that position alone. Embeddings are drawn from N(0, 1/width) so the residual stream
    starts at unit scale per token.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        num_classes: int,
        width: int = 128,
        heads: int = 4,
        layers: int = 1,
        mlp_width: int = 512,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.pos = nn.Parameter(torch.empty(seq_len, width))
        for weight in (self.embed.weight, self.pos):
            nn.init.normal_(weight, std=1 / math.sqrt(width))
        self.blocks = nn.Sequential(*(_Block(width, heads, mlp_width) for _ in range(layers)))
        self.unembed = nn.Linear(width, num_classes, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos  # [B, T] token ids -> [B, T, W]
        *inner, last = self.blocks
        for block in inner:
            h = block(h)
        return self.unembed(last(h, last_only=True)[:, -1])  # [B, num_classes]


# ----------------------------------------------------------------------------- registry


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A registered model: ``build(dataset_info, **model_args) -> nn.Module``; ``tokens``:
    it reads token ids (a dataset with a ``vocab_size``), not real-valued inputs."""

    name: str
    build: Callable[..., nn.Module]
    description: str
    tokens: bool = False


def _channels(info: DatasetInfo, name: str, dims: int) -> int:
    if len(info.input_shape) != dims:
        shape = "[C, L]" if dims == 2 else "[C, H, W]"
        raise ValueError(
            f"model {name!r} needs inputs of shape {shape}; dataset {info.name!r} has "
            f"{list(info.input_shape)}"
        )
    return info.input_shape[0]


MODELS: dict[str, ModelInfo] = {}


def _register(
    name: str, description: str, tokens: bool = False
) -> Callable[[Callable[..., nn.Module]], Any]:
    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = ModelInfo(name, fn, description, tokens)
        return fn

    return deco


@_register("cnn1d", "3 conv layers (32 channels, kernel 5) + linear, the MNIST-1D baseline")
def _cnn1d(
    info: DatasetInfo,
    channels: int = 32,
    kernels: tuple[int, ...] = (5, 5, 5),
    strides: tuple[int, ...] = (1, 1, 2),
) -> nn.Module:
    c = _channels(info, "cnn1d", 2)
    return CNN1D(c, info.input_shape[1], info.num_classes, channels, kernels, strides)


@_register("mlp", "fully connected ReLU network on the flattened input (width 256, depth 2)")
def _mlp(info: DatasetInfo, width: int = 256, depth: int = 2) -> nn.Module:
    return MLP(math.prod(info.input_shape), info.num_classes, width=width, depth=depth)


@_register("cnn_small", "3 conv-BN-ReLU layers + pooling + linear, for 8x8 digits")
def _cnn_small(info: DatasetInfo, width: int = 32) -> nn.Module:
    return SmallCNN(_channels(info, "cnn_small", 3), info.num_classes, width=width)


@_register("resnet18", "CIFAR ResNet-18 (3x3 stem, BatchNorm)")
def _resnet18(info: DatasetInfo, width: int = 64) -> nn.Module:
    return ResNet(_channels(info, "resnet18", 3), info.num_classes, (2, 2, 2, 2), width=width)


@_register("wrn", "Wide ResNet, model args depth (28) and widen (10), dropout (0)")
def _wrn(info: DatasetInfo, depth: int = 28, widen: int = 10, dropout: float = 0.0) -> nn.Module:
    return WideResNet(_channels(info, "wrn", 3), info.num_classes, depth, widen, dropout)


@_register("wrn28_10", "Wide ResNet 28-10 (the SAM paper's CIFAR model)")
def _wrn28_10(info: DatasetInfo, dropout: float = 0.0) -> nn.Module:
    return WideResNet(_channels(info, "wrn28_10", 3), info.num_classes, 28, 10, dropout)


@_register(
    "transformer",
    "transformer on token ids (width 128, 4 heads, 1 layer, MLP 512), for modular-add",
    tokens=True,
)
def _transformer(
    info: DatasetInfo, width: int = 128, heads: int = 4, layers: int = 1, mlp_width: int = 512
) -> nn.Module:
    if len(info.input_shape) != 1:
        raise ValueError(
            f"model 'transformer' needs token sequences of shape [T]; dataset {info.name!r} "
            f"has {list(info.input_shape)}"
        )
    seq_len = info.input_shape[0]
    return Transformer(info.vocab_size, seq_len, info.num_classes, width, heads, layers, mlp_width)


def list_models() -> list[str]:
    """Registered model names."""
    return list(MODELS)


def create_model(name: str, dataset_info: DatasetInfo, **model_args: Any) -> nn.Module:
    """Build model ``name`` for ``dataset_info``'s input shape and classes.

    ``model_args`` go to the model (e.g. ``create_model("wrn", info, depth=16, widen=4)``);
    an unknown name or argument raises ``ValueError``/``TypeError``.
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; available: {', '.join(MODELS)}")
    if MODELS[name].tokens != bool(dataset_info.vocab_size):
        holds = "token ids" if dataset_info.vocab_size else "real-valued inputs"
        reads = "token ids" if MODELS[name].tokens else "real-valued inputs"
        raise ValueError(
            f"model {name!r} reads {reads}; dataset {dataset_info.name!r} holds {holds}"
        )
    build = MODELS[name].build
    accepted = list(inspect.signature(build).parameters)[1:]  # after the dataset info
    unknown = [k for k in model_args if k not in accepted]
    if unknown:
        raise TypeError(
            f"model {name!r} takes no argument {unknown[0]!r}; its arguments: "
            f"{', '.join(accepted) or 'none'}"
        )
    try:
        return build(dataset_info, **model_args)
    except (ValueError, TypeError) as e:
        if str(e).startswith(f"model {name!r}"):
            raise
        wrapped = ValueError if isinstance(e, ValueError) else TypeError
        raise wrapped(f"model {name!r}: {e}") from e
