"""What the demo, the benchmarks and the examples share: Model C, the MAC counter, the Fashion-MNIST reader.

One definition of each, so that "Model C" or "multiply-accumulates" printed by one
script means what it means in the others. Not part of convify's public face
(``convify/__init__.py``): the scripts import it as ``convify.zoo``.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from convify.errors import DataError, UsageError
from convify.wording import counted

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` puts the gzipped IDX files."""

_FASHION_MNIST_PREFIX = {"train": "train", "test": "t10k"}


# --------------------------------------------------------------------------- Model C


def model_c(width: int = 32, *, in_channels: int = 3, num_classes: int = 10, batch_norm: bool = False,
            bias: bool | None = None, hidden_1x1: bool = True) -> nn.Sequential:
    """Springenberg et al.'s Model C (the max-pool network of "Striving for Simplicity") in miniature.

    ``features``: conv3x3 ``width``, conv3x3 ``width``, max pooling 3x3/2; conv3x3
    ``2*width`` twice, max pooling 3x3/2; conv3x3 ``2*width``, then (``hidden_1x1``,
    as in the paper) a conv1x1 ``2*width``. Each convolution is followed by
    BatchNorm when ``batch_norm`` (not in the paper) and a ReLU. ``classifier``:
    conv1x1 to ``num_classes`` (with bias); then ``pool`` (global average) and
    ``flatten``, so the output is ``(N, num_classes)``.

    ``bias`` is the feature convolutions' bias; by default only without BatchNorm,
    which makes it redundant. Modules are created in forward order, so under one
    seed a given configuration always starts from the same weights.

    The three configurations in use::

        model_c()                                           # convify demo: 3x32x32 inputs
        model_c(32, in_channels=1, batch_norm=True, hidden_1x1=False)           # examples/all_cnn_fashion_mnist.py
        model_c(16, in_channels=1, batch_norm=True, hidden_1x1=False)            # benchmarks/recovery.py
    """
    bias = not batch_norm if bias is None else bias

    def conv(cin: int, cout: int, kernel_size: int = 3) -> list[nn.Module]:
        layers = [nn.Conv2d(cin, cout, kernel_size, padding=kernel_size // 2, bias=bias)]
        return layers + ([nn.BatchNorm2d(cout)] if batch_norm else []) + [nn.ReLU()]

    w1, w2 = width, 2 * width
    features = [*conv(in_channels, w1), *conv(w1, w1), nn.MaxPool2d(3, 2, padding=1),
                *conv(w1, w2), *conv(w2, w2), nn.MaxPool2d(3, 2, padding=1),
                *conv(w2, w2), *(conv(w2, w2, 1) if hidden_1x1 else [])]
    return nn.Sequential(OrderedDict([
        ("features", nn.Sequential(*features)),
        ("classifier", nn.Conv2d(w2, num_classes, 1)),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
    ]))


class BasicBlock(nn.Module):
    """ResNet's basic block: conv3x3-BN-ReLU, conv3x3-BN, plus the shortcut (a 1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential() if stride == 1 and cin == cout else
                         nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + self.shortcut(x))


def resnet_mini(width: int = 16, *, in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    """A small ResNet with torchvision's stem pooling, for 28x28 images (``benchmarks/recovery.py``).

    ``stem``: conv3x3 ``width``, BatchNorm, ReLU, max pooling 3x3/2 padding 1
    (ResNet's k=3, s=2, p=1); then basic blocks at ``width`` (stride 1),
    ``2*width`` and ``4*width`` (stride 2 each); global average pooling and one
    Linear to the classes: 28x28 -> 14x14 -> 7x7 -> 4x4.
    """
    w = width
    return nn.Sequential(OrderedDict([
        ("stem", nn.Sequential(nn.Conv2d(in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                               nn.MaxPool2d(3, 2, padding=1))),
        ("layer1", BasicBlock(w, w)),
        ("layer2", BasicBlock(w, 2 * w, 2)),
        ("layer3", BasicBlock(2 * w, 4 * w, 2)),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(4 * w, num_classes)),
    ]))


# --------------------------------------------------------------------------- multiply-accumulates


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of ``model(x)``, for the whole batch ``x`` (pass one image for a per-image count).

    Counted at every call of these modules (subclasses included; a module called
    twice counts twice), from the weight's shape ``(out, in / groups, *kernel)``:

    * ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``: output elements x
      ``in_channels / groups`` x kernel taps (so grouped and depthwise
      convolutions count ``groups`` times less than dense ones);
    * ``nn.ConvTranspose1d/2d/3d``: input elements x ``out_channels / groups`` x
      kernel taps (each input element is scattered to that many outputs);
    * ``nn.Linear``: output elements x ``in_features``.

    Not counted: bias additions, pooling, normalization, activations, elementwise
    operations (residual additions, the mean of global pooling), and convolutions
    or products computed by a function call (``F.conv2d``, ``torch.matmul``)
    rather than by one of those modules.

    The pass runs without gradients in eval mode, so BatchNorm statistics are
    left alone; every module's train/eval mode is restored afterwards.

    >>> count_macs(nn.Conv2d(4, 6, 3, groups=2), torch.zeros(1, 4, 5, 5))  # 6*3*3 outputs x (4/2)*3*3
    972
    """
    total = 0

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        per_element = math.prod(module.weight.shape[1:])
        transposed = getattr(module, "transposed", False)
        total += (inputs[0] if transposed else output).numel() * per_element

    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_hook(count) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return total


# --------------------------------------------------------------------------- Fashion-MNIST


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """An IDX file of unsigned bytes (gzipped when its name ends in ``.gz``) as a uint8 tensor of its shape.

    The format of MNIST and Fashion-MNIST: two zero bytes, the data type
    (0x08: unsigned byte), the number of dimensions, each dimension as a
    big-endian uint32, then the data.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file (it should start with two zero bytes)")
    dtype, ndim = raw[2], raw[3]
    if dtype != 0x08:
        raise DataError(f"{path}: IDX data type {dtype:#04x}, expected unsigned bytes (0x08)")
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise DataError(f"{path}: truncated IDX header ({counted(ndim, 'dimension')} declared)")
    shape = struct.unpack(f">{ndim}I", raw[4:start])
    if len(raw) - start != math.prod(shape):
        raise DataError(f"{path}: {counted(len(raw) - start, 'byte')} of data, but the header declares shape {shape}")
    if not math.prod(shape):
        return torch.empty(shape, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw[start:]), dtype=torch.uint8).reshape(shape)


def fashion_mnist(split: str, root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST's ``"train"`` (60,000) or ``"test"`` (10,000) split: images ``(N, 1, 28, 28)`` float32
    in [0, 1] and labels ``(N,)`` int64.

    Read from ``root``, else ``$FASHION_MNIST_DIR``, else :data:`FASHION_MNIST_DIR`;
    each file gzipped (``train-images-idx3-ubyte.gz``) or plain. Raises
    ``DataError`` (saying how to install them) when the files are missing.
    """
    if split not in _FASHION_MNIST_PREFIX:
        raise UsageError(f"Fashion-MNIST split {split!r}: expected 'train' or 'test'")
    folder = Path(root if root is not None else os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    prefix = _FASHION_MNIST_PREFIX[split]
    images, labels = (_find(folder, f"{prefix}-{kind}") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))
    return read_idx(images).unsqueeze(1).float().div_(255.0), read_idx(labels).long()


def _find(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"Fashion-MNIST: no {stem}(.gz) under {folder} (set FASHION_MNIST_DIR, or "
                            "`sudo apt-get install dataset-fashion-mnist`)")
