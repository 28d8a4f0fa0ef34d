"""A folder of images as a Dataset, for :func:`~convify.distill` and the command line's
``--data DIR`` / ``--calibration DIR``: class subfolders give labels, a flat folder gives images only."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from convify.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageFiles(Dataset):
    """A flat folder of images, unlabelled: item ``i`` is one image tensor.

    >>> data = ImageFiles("calibration/", transform=image_transform((1, 3, 224, 224)))
    """

    def __init__(self, root: str | os.PathLike, transform: Any = None) -> None:
        self.root = Path(root)
        self.files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        from PIL import Image  # noqa: PLC0415  (torchvision's dependency)

        with Image.open(self.files[index]) as image:
            image = image.convert("RGB")
            return self.transform(image) if self.transform is not None else image


def image_transform(input_shape: tuple[int, ...], mean: tuple[float, ...] | None = None,
                    std: tuple[float, ...] | None = None) -> Any:
    """Resize to the model's ``(N, C, H, W)`` input, to tensor, normalize
    (ImageNet statistics for 3 channels, 0.5/0.5 otherwise, unless given)."""
    from torchvision import transforms as T  # noqa: PLC0415

    channels, size = input_shape[1], tuple(input_shape[2:])
    if mean is None:
        mean = (0.485, 0.456, 0.406) if channels == 3 else (0.5,) * channels
    if std is None:
        std = (0.229, 0.224, 0.225) if channels == 3 else (0.5,) * channels
    steps = [T.Resize(size), T.CenterCrop(size)]
    if channels == 1:
        steps.append(T.Grayscale(1))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


def image_folder(root: str | os.PathLike, input_shape: tuple[int, ...], **normalize: Any) -> Dataset:
    """``root`` as a Dataset: a torchvision ``ImageFolder`` (``(image, label)``,
    labels from the subfolders) when it has subfolders, else :class:`ImageFiles`
    (images only). Images are resized to ``input_shape``'s height and width.

    >>> data = image_folder("train/", (1, 3, 224, 224))
    """
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"{path} is not a directory of images")
    transform = image_transform(input_shape, **normalize)
    if any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
        from torchvision.datasets import ImageFolder  # noqa: PLC0415

        try:
            return ImageFolder(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError) as e:
            raise DataError(f"{path}: {e}") from e
    files = ImageFiles(path, transform)
    if not len(files):
        raise DataError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no class subfolders")
    return files
