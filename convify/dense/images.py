"""Images for ``dense_map``: reading a file, checking a tensor, and turning tiles of pixels into model input.

The image stays as given (uint8 stays uint8); each tile is converted when it
runs, so memory is the tile batch's, not the image's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from convify.errors import DataError, UsageError, one_line


def load_image(path: str | os.PathLike, channels: int = 3) -> torch.Tensor:
    """A PNG/JPEG/TIFF file as a uint8 (C, H, W) tensor (``channels`` 1: grayscale, 3: RGB)."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    Image.MAX_IMAGE_PIXELS = None  # large scans are the point; the file is the user's own
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            array = np.asarray(im)
    except Exception as e:
        raise DataError(f"{path}: cannot read it as an image: {one_line(e)}") from e
    t = torch.from_numpy(array.copy())
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1)


_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_DEEP_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def conversion_of(path: str | os.PathLike, channels: int = 3) -> str | None:
    """What :func:`load_image` changes when it reads ``path`` with ``channels`` channels, in words (None: nothing
    but decoding); reads only the file's header.

    >>> conversion_of("scan.png", 3)
    'scan.png is grayscale: its one channel is repeated as R, G and B'
    """
    from PIL import Image  # noqa: PLC0415

    try:
        with Image.open(path) as im:
            mode, transparent = im.mode, "transparency" in im.info
    except Exception:
        return None  # load_image says why it cannot read the file
    gray = mode in _GRAY_MODES
    changes = []
    if channels == 3 and gray:
        changes.append("is grayscale: its one channel is repeated as R, G and B")
    if channels == 1 and not gray:
        changes.append("is in colour: converted to gray (0.299 R + 0.587 G + 0.114 B)")
    if mode in _ALPHA_MODES or (mode == "P" and transparent):
        changes.append("has transparency: its alpha channel is dropped")
    if mode in _DEEP_MODES:
        changes.append(f"has {mode} pixels: values above 255 are clipped to 255 (8 bits)")
    if mode == "CMYK":
        changes.append("is CMYK: converted to RGB")
    return f"{path} " + ", and ".join(changes) if changes else None


def as_image(image: Any, channels: int) -> torch.Tensor:
    """``image`` as a (C, H, W) tensor: a path is loaded with ``channels`` channels, a (1, C, H, W) tensor unbatched."""
    if isinstance(image, (str, os.PathLike)):
        return load_image(image, channels)
    if not isinstance(image, torch.Tensor):
        raise UsageError(f"image must be a (C, H, W) tensor, a (1, C, H, W) tensor or a path, not "
                         f"{type(image).__name__}")
    if image.dim() == 4 and image.shape[0] == 1:
        image = image[0]
    if image.dim() != 3:
        raise UsageError(f"image must be (C, H, W) or (1, C, H, W), not {tuple(image.shape)}")
    return image


def first_conv_channels(model: nn.Module) -> int | None:
    """The input channels of ``model``'s first ``Conv2d`` (None without one): how many channels to load."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else conv.in_channels


def convert_pixels(tiles: torch.Tensor, dtype: torch.dtype,
                   normalize: tuple[Sequence[float], Sequence[float]] | None) -> torch.Tensor:
    """uint8 pixels become floats in [0, 1] (as torchvision's ToTensor); then ``(x - mean) / std``."""
    x = tiles.to(dtype) / 255 if tiles.dtype == torch.uint8 else tiles.to(dtype)
    if normalize is not None:
        mean, std = (torch.as_tensor(v, dtype=dtype, device=x.device).view(1, -1, 1, 1) for v in normalize)
        x = (x - mean) / std
    return x
