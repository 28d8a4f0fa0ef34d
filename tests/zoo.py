"""The torchvision models the tests run over, with their native input sizes."""
from __future__ import annotations

import torch.nn as nn
import torchvision

from conftest import reinit

# name -> (input size, builder kwargs). Sizes are the smallest the tests use
# where the shapes allow: every pool keeps its ceil_mode and odd sizes.
MAXPOOL_ZOO = {
    "resnet18": (64, {}),
    "vgg11": (64, {}),
    "alexnet": (96, {}),
    "googlenet": (96, {"aux_logits": False, "init_weights": False}),
    "inception_v3": (107, {"aux_logits": False, "init_weights": False}),
    "squeezenet1_0": (65, {}),
    "squeezenet1_1": (67, {}),
    "densenet121": (64, {}),
    "shufflenet_v2_x0_5": (64, {}),
}


def build(name: str, seed: int = 0, **kwargs) -> nn.Module:
    """A torchvision model with non-degenerate random weights, in eval mode."""
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    return reinit(model, seed).eval()
