"""Example inputs: arguments, probing, shapes."""
from __future__ import annotations

import pytest
import torch.nn as nn

import convify
from convify.errors import ExampleInputError, UsageError
from convify.inputs import parse_input_shape, probe_input


@pytest.mark.parametrize("text, shape", [("1,3,64,64", (1, 3, 64, 64)), ("2x3x8x9", (2, 3, 8, 9)),
                                         (" 1, 3, 32 ", (1, 3, 32)), ([1, 3, 5, 5], (1, 3, 5, 5))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["1,3,a,4", "1,3", "1,3,0,4", "1,3,-2,4", ""])
def test_parse_input_shape_refuses(text):
    with pytest.raises(UsageError, match="malformed input shape"):
        parse_input_shape(text)


def test_probe_input_uses_pretrained_cfg_then_common_sizes():
    """The model runs at any size, so only the cfg can give 40x30 (the common sizes give 224)."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    assert probe_input(model).shape == (1, 2, 224, 224)
    model.pretrained_cfg = {"input_size": (2, 40, 30)}
    assert probe_input(model).shape == (1, 2, 40, 30)
    assert convify.report(convify.replace_maxpool(model)).replaced[0].in_shape == (1, 4, 38, 28)
    model.pretrained_cfg = {"input_size": (3, 40, 30)}  # not this model's channels: ignored
    assert probe_input(model).shape == (1, 2, 224, 224)
    del model.pretrained_cfg
    model.default_cfg = {"input_size": [2, 36, 20]}  # older timm
    assert probe_input(model).shape == (1, 2, 36, 20)


def test_probe_input_falls_back_when_the_pretrained_cfg_size_does_not_run():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 3))
    model.pretrained_cfg = {"input_size": (2, 40, 30)}
    assert probe_input(model).shape == (1, 2, 28, 28)

    class Wants1001(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.pretrained_cfg = {"input_size": (2, 40, 30)}

        def forward(self, x):
            if x.shape[-1] != 1001:
                raise ValueError("wants 1001")
            return self.conv(x)

    with pytest.raises(ExampleInputError, match=r"tried 2 channels at sizes 40x30, 224, 32"):
        probe_input(Wants1001())


def test_probe_input_of_a_timm_model_is_its_pretrained_size():
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=10).eval()
    assert model.pretrained_cfg["input_size"] == (3, 288, 288)  # 224, the first common size, also runs
    assert probe_input(model).shape == (1, 3, 288, 288)
