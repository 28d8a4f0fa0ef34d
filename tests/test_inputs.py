"""Example inputs: arguments, probing, shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import convify
from convify.errors import ExampleInputError, UsageError
from convify.fx.inputs import check_dtype_and_device, parse_input_shape, probe_input


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


# --------------------------------------------------------------------------- dtype and device


def bias_free_conv_bn_pool() -> nn.Module:
    """Shape propagation on meta tensors lets a float32 input through this
    float64 model (a bias-free convolution does not check dtypes there)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))


def test_an_input_in_another_dtype_than_the_model_is_refused():
    with pytest.raises(ExampleInputError, match=r"example_input is torch\.float32 but ResNet's parameters are "
                                                r"torch\.float64.*pass example_input\.to\(torch\.float64\)"):
        convify.replace_maxpool(torchvision.models.resnet18().double(), torch.randn(1, 3, 64, 64))
    with pytest.raises(ExampleInputError, match=r"torch\.float32 but Sequential's parameters are torch\.float64"):
        convify.replace_maxpool(bias_free_conv_bn_pool().double(), torch.randn(1, 3, 16, 16))
    with pytest.raises(ExampleInputError, match=r"torch\.float64 but Sequential's parameters are torch\.float32.*"
                                                r"or convert the model first \(model\.to\(torch\.float64\)\)"):
        check_dtype_and_device(bias_free_conv_bn_pool(), (torch.randn(1, 3, 16, 16, dtype=torch.float64),))


def test_a_model_of_mixed_dtypes_that_cannot_run_the_input_is_refused():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.Conv2d(8, 8, 3, bias=False).double(), nn.MaxPool2d(2))
    with pytest.raises(ExampleInputError, match=r"parameters are torch\.float32 and torch\.float64 on cpu"):
        convify.replace_maxpool(model, torch.randn(1, 3, 16, 16))


def test_new_modules_take_the_models_dtype():
    model = bias_free_conv_bn_pool().double().eval()
    out = convify.replace_maxpool(model, torch.randn(1, 3, 16, 16, dtype=torch.float64))
    assert {p.dtype for p in out.parameters()} == {torch.float64}

    class CastsItsInput(nn.Module):  # runs a float32 input: accepted, and the new conv is float64
        def __init__(self) -> None:
            super().__init__()
            self.body = bias_free_conv_bn_pool()

        def forward(self, x):
            return self.body(x.to(torch.float64))

    model = CastsItsInput().double().eval()
    out = convify.replace_maxpool(model, torch.randn(1, 3, 16, 16))
    assert out.get_submodule("body.3").weight.dtype == torch.float64
    with torch.no_grad():
        assert out(torch.randn(2, 3, 16, 16)).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_input_on_another_device_is_refused_and_new_modules_follow_the_model():
    model = bias_free_conv_bn_pool().cuda().eval()
    with pytest.raises(ExampleInputError, match=r"example_input is on cpu but Sequential's parameters are on "
                                                r"cuda:0.*pass example_input\.to\('cuda:0'\)"):
        convify.replace_maxpool(model, torch.randn(1, 3, 16, 16))
    out = convify.replace_maxpool(model, torch.randn(1, 3, 16, 16, device="cuda"))
    assert {p.device for p in out.parameters()} == {torch.device("cuda", 0)}
