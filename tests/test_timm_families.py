"""One model per timm family, rewritten whole with ``convify.convify``.

A sweep over representative families: those with max pooling (in stems, in
blocks, in attention pooling, a ``MaxPool2dSame`` that must be refused), and
those whose forwards once stopped torch.fx or convify (hiera's ``mask=None``,
the attention-bias caches of LeViT and EfficientFormer, swin's shape checks).
Every one must trace whole and keep the invariants:

* the output keeps its shape;
* every max pooling that runs is replaced, or skipped with a reason
  (counted on the rewritten model's own forward: none left silently);
* the head pass replaced a head, or says why not (a skip reason, a note).

The smallest model of each family, at its default input size.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import convify

timm = pytest.importorskip("timm")

FAMILIES = {
    # max pooling
    "resnet": "test_resnet",
    "densenet": "densenet121",
    "dla": "dla46x_c",
    "dpn": "dpn48b",
    "cspnext": "cspnext_tiny",
    "gcvit": "gcvit_xxtiny",
    "hgnet": "hgnetv2_b0",
    "inception_v3": "inception_v3",
    "resnest": "resnest14d",
    "senet": "legacy_seresnet18",
    "sknet": "skresnet18",
    "vovnet": "ese_vovnet19b_slim_dw",
    "xception": "legacy_xception",
    "nest": "nest_tiny",
    "mvitv2": "mvitv2_tiny",
    "vision_transformer_hybrid": "vit_tiny_r_s16_p8_224",  # MaxPool2dSame: skipped with its reason
    # forwards that stopped the tracer or the copy
    "hiera": "hiera_tiny_224",
    "levit": "levit_128s",
    "efficientformer": "efficientformer_l1",
    "efficientformer_v2": "efficientformerv2_s0",
    "swin_transformer": "swin_tiny_patch4_window7_224",
    # heads of every kind
    "convnext": "test_convnext",
    "efficientnet": "test_efficientnet",
    "mobilenetv3": "mobilenetv3_small_050",
    "regnet": "regnetx_002",
    "vision_transformer": "test_vit",
}

MAX_POOLS = frozenset({
    F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool1d, torch.max_pool2d, torch.max_pool3d,
    F.max_pool1d_with_indices, F.max_pool2d_with_indices, F.max_pool3d_with_indices,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
})


class CountMaxPools(TorchFunctionMode):
    """Counts the max-pooling calls of one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in MAX_POOLS
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_rewrites_whole_with_every_invariant(family):
    model = timm.create_model(FAMILIES[family], pretrained=False).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad(), CountMaxPools() as before:
        want = model(x)
    out = convify.convify(model, x)
    with torch.no_grad(), CountMaxPools() as after:
        got = out(x)
    pool, head = convify.report(out).passes
    assert pool.untraced == () and head.untraced == (), (pool.untraced, head.untraced)
    assert got.shape == want.shape
    assert len(pool.replaced) + len(pool.skipped) == before.calls
    assert after.calls == len(pool.skipped) and all(s.reason for s in pool.skipped)
    assert head.replaced or head.skipped or head.notes
