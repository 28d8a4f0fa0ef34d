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
