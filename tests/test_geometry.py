"""Receptive-field geometry against a brute-force measurement: perturb one
input pixel, see which output positions change."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convify
from convify.dense.geometry import Axis, Geometry, NotTilableError, receptive_field

from conftest import reinit
from zoo import build


def padded_net() -> nn.Module:
    """Padding, a ceil_mode pool, dilation, BatchNorm, a padded average pool."""
    return reinit(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(3, 2, 1),
        nn.Conv2d(8, 5, 3))).eval()


def unpadded_net() -> nn.Module:
    return reinit(nn.Sequential(nn.Conv2d(3, 8, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, stride=2),
                                nn.ReLU(), nn.Conv2d(8, 4, 3))).eval()


class Residual(nn.Module):
    """Two branches of different windows added, then a functional pad and pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 5, stride=2, padding=2)
        self.b = nn.Conv2d(3, 6, 1, stride=2)
        self.head = nn.Conv2d(12, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x)) + self.b(x)
        y = torch.cat([y, y * 2], dim=1)
        return self.head(F.avg_pool2d(F.pad(y, (1, 2, 3, 0)), 2))


def measured_axis(model: nn.Module, size: tuple[int, int], dim: int, pixels: list[int]) -> dict[int, set[int]]:
    """For each pixel index along spatial ``dim`` (2: rows, 3: columns), the output indices along that
    dim that change when the pixel (on the middle line of the other dim) is pushed far up or down.
    A push of 1e6 dominates every sum and wins every max pooling it reaches, so an output changes
    exactly when the pixel lies in its window (padding taps read nothing)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *size, generator=g)
    with torch.no_grad():
        base = model(x)
        found = {}
        for p in pixels:
            changed: set[int] = set()
            for push in (1e6, -1e6):
                y = x.clone()
                if dim == 3:
                    y[0, :, size[0] // 2, p] += push
                else:
                    y[0, :, p, size[1] // 2] += push
                diff = (model(y) != base)
                other = 2 if dim == 3 else 3
                changed |= set(diff.any(dim=other).any(dim=1)[0].nonzero().flatten().tolist())
            found[p] = changed
    return found


def predicted_axis(axis: Axis, outputs: int, pixels: list[int], length: int) -> dict[int, set[int]]:
    return {p: {j for j in range(outputs) if axis.first(j) <= p <= axis.last(j)} for p in pixels}


def check_against_brute_force(model: nn.Module, size: tuple[int, int], dims: tuple[int, ...] = (2, 3)) -> Geometry:
    geometry = receptive_field(model)
    with torch.no_grad():
        out_shape = model(torch.zeros(1, 3, *size)).shape
    for dim in dims:
        axis, length = geometry.axes[dim - 2], size[dim - 2]
        pixels = sorted({0, 1, length // 3, length // 2, length - 2, length - 1} if dims == (2, 3) else
                        {0, length // 2, length - 1})
        measured = measured_axis(model, size, dim, pixels)
        assert measured == predicted_axis(axis, out_shape[dim], pixels, length), (dim, geometry)
    return geometry


@pytest.mark.parametrize("make, size, expected", [
    (padded_net, (40, 47), Geometry((Axis(4, 24, -7), Axis(4, 24, -7)))),
    (unpadded_net, (41, 52), Geometry((Axis(4, 18, 0), Axis(4, 18, 0)))),
    (Residual, (33, 38), None),
])
def test_small_models_match_brute_force(make, size, expected) -> None:
    geometry = check_against_brute_force(make(), size)
    if expected is not None:
        assert geometry == expected


# Thin images (the models' square geometry is measured along the width; the
# small models above check both axes): the fewest rows each model runs on.
ZOO = {"resnet18": (32, 416), "vgg11": (224, 352), "alexnet": (224, 416), "googlenet": (32, 448),
       "mobilenet_v2": (32, 480)}


def dense_zoo(name: str) -> nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = build(name, **kwargs)
    return convify.replace_linear_head(model, torch.randn(1, 3, 224, 224), dense=True)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_dense_heads_match_brute_force(name: str) -> None:
    height, width = ZOO[name]
    geometry = check_against_brute_force(dense_zoo(name), (height, width), dims=(3,))
    assert geometry.stride == (32, 32)


def test_known_values_and_text() -> None:
    geometry = receptive_field(dense_zoo("vgg11"))
    assert geometry == Geometry((Axis(32, 342, -59), Axis(32, 342, -59)))
    assert "stride 32x32, size 342x342, offset -59,-59" in str(geometry)
    assert geometry.to_dict() == {"stride": [32, 32], "size": [342, 342], "offset": [-59, -59]}
    assert geometry.window((1, 0)) == ((-27, 314), (-59, 282))
    assert convify.receptive_field is receptive_field


def test_global_pooling_is_not_tilable() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(NotTilableError, match=r"node '_1' .*AdaptiveAvgPool2d.*not dense"):
        receptive_field(model)
    # made dense, the same model has a geometry: its 1x1 head adds nothing to the 3x3 window
    dense = convify.replace_linear_head(model, torch.randn(1, 3, 16, 16), dense=True)
    assert receptive_field(dense) == Geometry((Axis(1, 3, 0), Axis(1, 3, 0)))


class Upsampled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=2.0)


class MixedStrides(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 2, 3, stride=2), nn.Conv2d(3, 2, 3, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)[:, :, ::2, ::2]


class Flattened(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2)


@pytest.mark.parametrize("model, match", [
    (Upsampled(), "node 'interpolate'.*resamples"),
    (MixedStrides(), "getitem|strides"),
    (Flattened(), "node 'flatten'"),
])
def test_what_is_not_tilable_names_the_node(model: nn.Module, match: str) -> None:
    with pytest.raises(NotTilableError, match=match):
        receptive_field(model)
