"""replace_linear_head and convify(): exact convolutional heads, GAP heads,
dense score maps, heads that are not heads, and the torchvision zoo."""
from __future__ import annotations

import copy
from collections import namedtuple

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import convify
from convify.core import weights as W
from convify.errors import OptionError

from conftest import assert_input_dependent, reinit, rel_err
from zoo import build

TOL = 1e-5


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def linears(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def assert_exact(model: nn.Module, x: torch.Tensor, **kwargs) -> nn.Module:
    """Rewrite ``model`` at ``x`` and check outputs, shapes and the report."""
    new = convify.replace_linear_head(model, x, **kwargs)
    want, got = run(model, x), run(new, x)
    assert got.shape == want.shape
    assert_input_dependent(want)
    assert rel_err(got, want) <= TOL
    rep = convify.report(new)
    assert rep.replaced and rep.exact
    return new


# --------------------------------------------------------------------------- tiny models


class LeNet(nn.Module):
    """LeNet-5 with its flatten written in one of the usual ways."""

    def __init__(self, flatten: str = "view-1") -> None:
        super().__init__()
        self.flatten = flatten
        self.conv1, self.conv2 = nn.Conv2d(1, 6, 5), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * 5 * 5, 120), nn.Linear(120, 84), nn.Linear(84, 10)
        self.flat = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        if self.flatten == "view-1":
            x = x.view(-1, 16 * 5 * 5)
        elif self.flatten == "view-size":
            x = x.view(x.size(0), -1)
        elif self.flatten == "reshape-shape":
            x = x.reshape(x.shape[0], -1)
        elif self.flatten == "torch.flatten":
            x = torch.flatten(x, 1)
        else:
            x = self.flat(x)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class GapNet(nn.Module):
    """A ResNet-style net: conv trunk, global average pooling in one of the usual spellings, Linear."""

    def __init__(self, pool: str = "module", mlp: bool = False) -> None:
        super().__init__()
        self.pool = pool
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                                  nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Sequential(nn.Linear(16, 32), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(32, 10)) if mlp \
            else nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x)
        if self.pool == "module":
            x = torch.flatten(self.avgpool(x), 1)
        elif self.pool == "functional":
            x = F.adaptive_avg_pool2d(x, 1).view(x.size(0), -1)
        elif self.pool == "mean":
            x = x.mean([2, 3])
        elif self.pool == "mean-keepdim":
            x = x.mean(dim=(2, 3), keepdim=True).flatten(1)
        return self.fc(self.drop(x))


class UnpaddedNet(nn.Module):
    """No padding anywhere: each position of the dense map sees exactly one crop."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 12, 3), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(12 * 5 * 5, 20), nn.ReLU(), nn.Dropout(),
                                        nn.Linear(20, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TinyVGG(nn.Module):
    """VGG's head in miniature: an AdaptiveAvgPool2d(4) in front of a flattened MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(nn.Linear(8 * 16, 32), nn.ReLU(True), nn.Dropout(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


Outputs = namedtuple("Outputs", ["logits", "aux"])


class TwoHeads(nn.Module):
    """A GAP head and a flattened MLP head on the same trunk, returned in a namedtuple."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc_a = nn.Linear(8, 6)
        self.fc_b1, self.fc_b2 = nn.Linear(8 * 4 * 4, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> Outputs:
        x = self.body(x)
        a = self.fc_a(x.mean((2, 3)))
        b = self.fc_b2(F.relu(self.fc_b1(x.flatten(1))))
        return Outputs(a, b)


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(c, c // 2), nn.Linear(c // 2, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        y = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
        return x * y.view(n, c, 1, 1)


class SENet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.se = SqueezeExcite(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.se(self.conv(x)), 1), 1))


class DataDependent(nn.Module):
    """A forward torch.fx cannot trace (it branches on a value) around a traceable head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 6 * 6, 10), nn.ReLU(), nn.Linear(10, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if x.sum() > 0:
            x = x * 2
        return self.head(x)


class FunctionalHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.weight = nn.Parameter(torch.randn(5, 4 * 6 * 6) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.flatten(self.conv(x), 1), self.weight)


class ChannelsLastHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).permute(0, 2, 3, 1).reshape(x.shape[0], -1))


class TinyNormHead(nn.Module):
    """ConvNeXt's head in miniature: pool, channel LayerNorm, flatten, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(torchvision.models.convnext.LayerNorm2d(8), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.conv(x)))


def tiny(model: nn.Module, seed: int = 0) -> nn.Module:
    return reinit(model, seed).eval()


# --------------------------------------------------------------------------- mode="conv": exact


@pytest.mark.parametrize("flatten", ["view-1", "view-size", "reshape-shape", "torch.flatten", "nn.Flatten"])
def test_lenet_flatten_spellings_become_exact_convolutions(flatten: str) -> None:
    model = tiny(LeNet(flatten))
    x = torch.randn(3, 1, 32, 32)
    new = assert_exact(model, x)
    assert linears(new) == []
    conv = new.get_submodule("fc1")
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (5, 5) and conv.in_channels == 16
    assert new.get_submodule("fc3").kernel_size == (1, 1)
    rows = convify.report(new).replaced
    assert [r.name for r in rows] == ["fc1"] and rows[0].in_shape == (3, 16, 5, 5) and rows[0].out_shape == (3, 10)


def test_lenet_head_works_at_other_batch_sizes() -> None:
    model = tiny(LeNet("view-1"))
    new = convify.replace_linear_head(model, torch.randn(1, 1, 32, 32))
    x = torch.randn(5, 1, 32, 32)
    assert rel_err(run(new, x), run(model, x)) <= TOL


@pytest.mark.parametrize("pool", ["module", "functional", "mean", "mean-keepdim"])
@pytest.mark.parametrize("mlp", [False, True])
def test_gap_spellings_and_mlp_heads_are_exact(pool: str, mlp: bool) -> None:
    model = tiny(GapNet(pool, mlp))
    x = torch.randn(2, 3, 12, 12)
    new = assert_exact(model, x)
    assert linears(new) == []
    assert isinstance(new.get_submodule("fc.0" if mlp else "fc"), nn.Conv2d)


def test_two_heads_in_a_namedtuple() -> None:
    model = tiny(TwoHeads())
    x = torch.randn(2, 3, 8, 8)
    new = convify.replace_linear_head(model, x)
    want, got = run(model, x), run(new, x)
    assert type(got).__name__ == "Outputs"
    for a, b in zip(got, want):
        assert a.shape == b.shape and rel_err(a, b) <= TOL
    assert sorted(r.name for r in convify.report(new).replaced) == ["fc_a", "fc_b1"]
    assert linears(new) == []


def test_skip_pattern_leaves_a_head_with_its_reason() -> None:
    model = tiny(TwoHeads())
    new = convify.replace_linear_head(model, torch.randn(1, 3, 8, 8), skip="fc_b*")
    rep = convify.report(new)
    assert [r.name for r in rep.replaced] == ["fc_a"]
    assert [(s.name, s.reason) for s in rep.skipped] == [("fc_b1", "matched skip pattern 'fc_b*'")]
    assert linears(new) == ["fc_b1", "fc_b2"]


def test_input_not_mutated_and_mode_dtype_kept() -> None:
    model = tiny(LeNet("torch.flatten")).double().train()
    before = copy.deepcopy(model.state_dict())
    new = convify.replace_linear_head(model, torch.randn(2, 1, 32, 32, dtype=torch.float64))
    assert isinstance(model.fc1, nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert new.training and new.get_submodule("fc1").training
    assert new.get_submodule("fc1").weight.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_kept() -> None:
    model = tiny(GapNet("mean", mlp=True)).cuda()
    x = torch.randn(2, 3, 12, 12, device="cuda")
    new = convify.replace_linear_head(model, x)
    assert new.get_submodule("fc.0").weight.device.type == "cuda"
    assert rel_err(run(new, x), run(model, x)) <= TOL


def test_idempotent() -> None:
    model = tiny(TwoHeads())
    x = torch.randn(1, 3, 8, 8)
    once = convify.replace_linear_head(model, x)
    twice = convify.replace_linear_head(once, x)
    last = convify.report(twice).last
    assert last.replaced == () and last.skipped == ()
    assert any("no Linear head" in n for n in last.notes)
    assert len(convify.report(twice).passes) == 2


def test_inplace_rewrites_the_model_itself() -> None:
    model = tiny(LeNet("nn.Flatten"))
    new = convify.replace_linear_head(model, torch.randn(1, 1, 32, 32), inplace=True)
    assert isinstance(new, fx.GraphModule) and new.get_submodule("conv1") is model.conv1  # no copy
    assert linears(new) == []


# --------------------------------------------------------------------------- not heads, or not convertible


def test_squeeze_excitation_linears_are_not_heads() -> None:
    model = tiny(SENet())
    x = torch.randn(2, 3, 8, 8)
    new = assert_exact(model, x)
    rep = convify.report(new)
    assert [r.name for r in rep.replaced] == ["fc"] and rep.skipped == ()
    assert linears(new) == ["se.fc1", "se.fc2"]


def test_vision_transformer_is_untouched() -> None:
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10)
    vit = tiny(vit)
    x = torch.randn(2, 3, 32, 32)
    new = convify.replace_linear_head(vit, x)
    rep = convify.report(new)
    assert rep.replaced == () and rep.skipped == ()
    assert any("no Linear head" in n and "nn.Linear layers" in n for n in rep.notes)
    assert linears(new) == linears(vit)
    assert rel_err(run(new, x), run(vit, x)) == 0


def test_functional_linear_is_a_skipped_head() -> None:
    new = convify.replace_linear_head(tiny(FunctionalHead()), torch.randn(1, 3, 8, 8))
    (row,) = convify.report(new).skipped
    assert row.name == "linear" and "F.linear" in row.reason and "nn.Linear" in row.reason


def test_permuted_map_is_a_skipped_head() -> None:
    new = convify.replace_linear_head(tiny(ChannelsLastHead()), torch.randn(1, 3, 8, 8))
    (row,) = convify.report(new).skipped
    assert row.name == "fc"
    assert "rearranges its dimensions" in row.reason and "channel-major" in row.reason


def test_linear_subclass_with_own_forward_is_skipped() -> None:
    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    model = tiny(LeNet("torch.flatten"))
    model.fc1 = Scaled(400, 120)
    new = convify.replace_linear_head(model, torch.randn(1, 1, 32, 32))
    (row,) = convify.report(new).skipped
    assert row.name == "fc1" and "Scaled subclasses nn.Linear" in row.reason


def test_bad_mode_is_refused() -> None:
    with pytest.raises(OptionError, match="head: mode must be one of 'conv', 'gap', 'gap_mlp', not 'fc'"):
        convify.replace_linear_head(tiny(LeNet()), torch.randn(1, 1, 32, 32), mode="fc")


def test_untraceable_forward_still_rewrites_the_head_submodule() -> None:
    model = tiny(DataDependent())
    x = torch.randn(2, 3, 8, 8)
    new = convify.replace_linear_head(model, x)
    rep = convify.report(new)
    assert [u.name for u in rep.untraced] == [""]
    assert [r.name for r in rep.replaced] == ["head.1"] and rep.exact
    assert isinstance(new.head, fx.GraphModule) and linears(new) == []
    assert rel_err(run(new, x), run(model, x)) <= TOL


# --------------------------------------------------------------------------- dense=True


def test_dense_gap_head_map_mean_is_the_original_output() -> None:
    model = tiny(GapNet("module"))
    new = convify.replace_linear_head(model, torch.randn(1, 3, 12, 12), dense=True)
    x = torch.randn(2, 3, 20, 20)
    got = run(new, x)
    assert got.shape == (2, 10, 10, 10)
    assert rel_err(got.mean((2, 3)), run(model, x)) <= TOL
    row = convify.report(new).replaced[0]
    assert not row.exact and any("mean over the positions equals the original output" in n for n in row.notes)


def test_dense_mlp_after_the_pool_is_a_per_position_classifier() -> None:
    model = tiny(GapNet("mean", mlp=True))
    new = convify.replace_linear_head(model, torch.randn(1, 3, 12, 12), dense=True)
    x = torch.randn(2, 3, 20, 20)
    got = run(new, x)
    assert got.shape == (2, 10, 10, 10)
    assert rel_err(got.mean((2, 3)), run(model, x)) > 1e-3
    assert any("per-position classifier" in n for n in convify.report(new).replaced[0].notes)


def test_dense_layer_norm_head_keeps_its_norm_per_position() -> None:
    model = tiny(TinyNormHead())
    new = convify.replace_linear_head(model, torch.randn(1, 3, 8, 8), dense=True)
    x = torch.randn(2, 3, 9, 9)
    got = run(new, x)
    assert got.shape == (2, 5, 9, 9)
    feat = model.conv(x)
    per_position = model.classifier[2](model.classifier[0](feat).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert rel_err(got, per_position) <= TOL
    assert any("per-position classifier" in n for n in convify.report(new).replaced[0].notes)


def test_dense_map_positions_are_the_crops_of_an_unpadded_net() -> None:
    model = tiny(UnpaddedNet())
    new = convify.replace_linear_head(model, torch.randn(1, 3, 16, 16), dense=True)
    assert convify.report(new).exact
    x = torch.randn(1, 3, 16 + 2 * 3, 16 + 2 * 2)
    got = run(new, x)
    assert got.shape == (1, 7, 4, 3)
    crops = torch.cat([x[:, :, 2 * i:2 * i + 16, 2 * j:2 * j + 16] for i in range(4) for j in range(3)])
    want = run(model, crops).view(4, 3, 7).permute(2, 0, 1)
    assert_input_dependent(run(model, crops))
    assert rel_err(got[0], want) <= TOL
    at_native = torch.randn(2, 3, 16, 16)
    assert rel_err(run(new, at_native).flatten(1), run(model, at_native)) <= TOL


def test_dense_removes_an_adaptive_pool_that_is_an_identity() -> None:
    model = tiny(TinyVGG())
    new = convify.replace_linear_head(model, torch.randn(1, 3, 16, 16), dense=True)
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in new.modules())
    assert convify.report(new).exact
    x = torch.randn(2, 3, 16, 16)
    assert rel_err(run(new, x).flatten(1), run(model, x)) <= TOL
    assert run(new, torch.randn(1, 3, 32, 32)).shape == (1, 5, 5, 5)


def test_dense_cannot_remove_an_adaptive_pool_that_resamples() -> None:
    model = tiny(TinyVGG())
    x = torch.randn(2, 3, 8, 8)  # a 2x2 map resampled to 4x4
    new = convify.replace_linear_head(model, x, dense=True)
    assert rel_err(run(new, x).flatten(1), run(model, x)) <= TOL
    notes = convify.report(new).replaced[0].notes
    assert any("resamples 2x2 to 4x4" in n and "exact only at this size" in n for n in notes)
    assert run(new, torch.randn(1, 3, 32, 32)).shape == (1, 5, 1, 1)


# --------------------------------------------------------------------------- mode="gap"


@pytest.mark.parametrize("pool", ["module", "mean"])
def test_gap_mode_is_exact_for_gap_heads_at_any_size(pool: str) -> None:
    model = tiny(GapNet(pool, mlp=True))
    new = assert_exact(model, torch.randn(2, 3, 12, 12), mode="gap")
    conv = new.get_submodule("fc.0")
    assert conv.kernel_size == (1, 1)
    x = torch.randn(2, 3, 30, 30)
    assert rel_err(run(new, x), run(model, x)) <= TOL


def test_gap_mode_on_flattened_mlp_is_the_papers_head() -> None:
    """One 1x1 convolution to the classes, global average, flatten: the hidden layers are gone."""
    from convify.core.rewrites.head import Exactness, HeadRecord

    model = tiny(LeNet("torch.flatten"))
    x = torch.randn(4, 1, 32, 32)
    new = convify.replace_linear_head(model, x, mode="gap")
    row = convify.report(new).replaced[0]
    assert not row.exact and any("not exact: the paper's GAP head replaces the MLP" in n for n in row.notes)
    assert any("dropped the hidden layers fc2, fc3" in n for n in row.notes)
    record: HeadRecord = row.detail
    assert (record.linears, record.dropped, record.collapsed) == (("fc1",), ("fc2", "fc3"), True)
    assert record.exactness is Exactness.APPROXIMATE and record.logits_from == "fc3"
    assert record.parameters == (400 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10, 16 * 10 + 10)
    conv = new.get_submodule("fc1")
    assert type(conv) is nn.Conv2d and (conv.in_channels, conv.out_channels, conv.kernel_size) == (16, 10, (1, 1))
    assert not hasattr(new, "fc2") and not hasattr(new, "fc3") and linears(new) == []
    assert row.new == "Conv2d(16, 10, k=1x1) -> GAP -> flatten"
    assert run(new, x).shape == (4, 10) and rel_err(run(new, x), run(model, x)) > 1e-3
    assert run(new, torch.randn(2, 1, 48, 40)).shape == (2, 10)  # no size pinned any more


class IdentityMLP(nn.Module):
    """A flattened head whose layers have only affine ops between them (dropout, an eval BatchNorm1d, a scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc1, self.bn, self.fc2, self.fc3 = nn.Linear(6 * 4 * 4, 12), nn.BatchNorm1d(12), nn.Linear(12, 9), \
            nn.Linear(9, 4)
        self.drop = nn.Dropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.conv(x), 1)
        return self.fc3(self.fc2(self.drop(self.bn(self.fc1(x)))) * 0.5)


def test_gap_data_free_init_is_exact_on_constant_maps_with_identity_activations() -> None:
    model = tiny(IdentityMLP())
    new = convify.replace_linear_head(model, torch.randn(1, 3, 6, 6), mode="gap")
    assert convify.report(new).replaced[0].detail.dropped == ("fc2", "fc3")
    constant = torch.randn(5, 6, 1, 1).expand(5, 6, 4, 4)  # the map the head reads, the same at every position
    head = lambda m, fmap: m.fc3(m.fc2(m.drop(m.bn(m.fc1(fmap.flatten(1))))) * 0.5)
    with torch.no_grad():
        want = head(model, constant)
        got = new.get_submodule("fc1")(constant).mean((2, 3))
    assert_input_dependent(want)
    assert rel_err(got, want) <= TOL
    varying = torch.randn(5, 6, 4, 4)
    with torch.no_grad():
        assert rel_err(new.get_submodule("fc1")(varying).mean((2, 3)), head(model, varying)) > 1e-3


def test_gap_mlp_keeps_the_mlp_as_1x1_convolutions() -> None:
    """Today's variant under its own name: the first Linear's weight summed over the positions, the MLP kept."""
    model = tiny(LeNet("torch.flatten"))
    x = torch.randn(4, 1, 32, 32)
    new = convify.replace_linear_head(model, x, mode="gap_mlp")
    row = convify.report(new).replaced[0]
    assert not row.exact and any("gap_mlp: " in n and "cannot be exact" in n for n in row.notes)
    assert (row.detail.linears, row.detail.dropped, row.detail.collapsed) == (("fc1", "fc2", "fc3"), (), False)
    assert [new.get_submodule(n).kernel_size for n in ("fc1", "fc2", "fc3")] == [(1, 1)] * 3
    assert rel_err(run(new, x), run(model, x)) > 1e-3
    flat = torch.randn(2, 16, 1, 1).expand(2, 16, 5, 5)  # exact on spatially constant maps, ReLUs and all
    tail = lambda m: m.fc3(F.relu(m.fc2(F.relu(m.fc1(flat.flatten(1))))))
    head_only = convify.replace_linear_head(nn.Sequential(nn.Flatten(), model.fc1, nn.ReLU(), model.fc2,
                                                          nn.ReLU(), model.fc3), flat, mode="gap_mlp")
    assert rel_err(run(head_only, flat), tail(model).detach()) <= TOL


@pytest.mark.parametrize("mode", ["gap", "gap_mlp"])
def test_gap_modes_keep_gap_heads_exact(mode: str) -> None:
    """Behind a global average (ResNet style) the MLP as 1x1 convolutions is exact: gap keeps it."""
    model = tiny(GapNet("module", mlp=True))
    new = assert_exact(model, torch.randn(2, 3, 12, 12), mode=mode)
    record = convify.report(new).replaced[0].detail
    assert (record.linears, record.dropped, record.collapsed) == (("fc.0", "fc.3"), (), False)


def test_gap_on_a_branching_head_keeps_the_mlp_with_a_note() -> None:
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc1 = nn.Conv2d(3, 4, 3), nn.Linear(4 * 4 * 4, 8)
            self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = F.relu(self.fc1(torch.flatten(self.conv(x), 1)))
            return self.a(h), self.b(h)

    model = tiny(Branching())
    x = torch.randn(2, 3, 6, 6)
    new = convify.replace_linear_head(model, x, mode="gap")
    row = convify.report(new).replaced[0]
    assert any("gap: the head branches at" in n and "mode='gap_mlp' does" in n for n in row.notes)
    assert (row.detail.collapsed, row.detail.linears) == (False, ("fc1", "a", "b"))
    assert [t.shape for t in run(new, x)] == [(2, 3), (2, 2)]


def test_gap_dense_on_a_flattened_head_is_a_class_map() -> None:
    model = tiny(TinyVGG())
    x = torch.randn(2, 3, 16, 16)  # a 4x4 map: the AdaptiveAvgPool2d(4) is an identity, and goes
    gap, dense = (convify.replace_linear_head(model, x, mode="gap", dense=d) for d in (False, True))
    assert convify.report(dense).replaced[0].out_shape == (2, 5, 4, 4)
    y = torch.randn(2, 3, 40, 24)
    assert rel_err(run(dense, y).mean((2, 3)), run(gap, y)) <= TOL


def test_gap_weight_sums_over_positions() -> None:
    weight = torch.randn(3, 2 * 2 * 2)
    got = W.linear_to_gap_weight(weight, 2, (2, 2))
    assert got.shape == (3, 2, 1, 1)
    assert torch.allclose(got[:, :, 0, 0], weight.view(3, 2, 4).sum(-1))


# --------------------------------------------------------------------------- convify()


def test_convify_applies_both_rewrites() -> None:
    model = tiny(LeNet("view-size"))
    x = torch.randn(2, 1, 32, 32)
    new = convify.convify(model, x)
    rep = convify.report(new)
    assert [p.rewrite for p in rep.passes] == ["maxpool", "head"]
    assert linears(new) == [] and isinstance(model.fc1, nn.Linear)
    assert run(new, x).shape == (2, 10)
    head_only = convify.convify(model, x, pool=None)
    assert [p.rewrite for p in convify.report(head_only).passes] == ["head"]
    assert rel_err(run(head_only, x), run(model, x)) <= TOL
    pool_only = convify.convify(model, x, head=None)
    assert [p.rewrite for p in convify.report(pool_only).passes] == ["maxpool"] and linears(pool_only)


# --------------------------------------------------------------------------- torchvision zoo

def assert_map_not_mirror_symmetric(model: nn.Module, x: torch.Tensor, pool: str = "avgpool") -> None:
    """The map a flatten head reads must change along each spatial axis: on a
    map that is constant (a 1x1 map replicated by the adaptive pool) or mirror
    symmetric, a head whose kernel taps are mirrored computes the same outputs."""
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(pool).register_forward_hook(lambda _m, _args, out: seen.append(out))
    try:
        run(model, x)
    finally:
        handle.remove()
    for dim in (-2, -1):
        assert rel_err(seen[0].flip(dim), seen[0]) > 1e-3, f"the {pool} map is symmetric along dim {dim}"


# name -> input size (H, W): small, but at least one map position under every head. AlexNet's
# flatten head at a non-square size whose 4x5 map the adaptive pool resamples (not replicates) to 6x6.
ZOO = {
    "alexnet": (159, 191),
    "resnet18": 32,
    "densenet121": 32,
    "mobilenet_v3_small": 32,
    "efficientnet_b0": 32,
    "convnext_tiny": 32,
    "regnet_x_400mf": 32,
    "shufflenet_v2_x0_5": 32,
    "mnasnet0_5": 32,
}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_heads_are_exact(name: str) -> None:
    model = build(name)
    size = ZOO[name]
    x = torch.randn(2, 3, *((size, size) if isinstance(size, int) else size))
    if name == "alexnet":
        assert_map_not_mirror_symmetric(model, x)
    new = assert_exact(model, x)
    rows = convify.report(new).replaced
    assert all(isinstance(new.get_submodule(r.module), nn.Conv2d) for r in rows)
    # whatever Linear is left sits inside the blocks (ConvNeXt's channel MLPs), not in a head
    assert all(name.startswith("features.") for name in linears(new))


@pytest.fixture(scope="module")
def vgg11() -> nn.Module:
    return build("vgg11")


def test_zoo_vgg11_is_exact_and_says_why_it_is_not_dense_at_64x96(vgg11: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 96)  # a 2x3 map, resampled (not replicated) to 7x7
    assert_map_not_mirror_symmetric(vgg11, x)
    new = assert_exact(vgg11, x)
    assert new.get_submodule("classifier.0").kernel_size == (7, 7)
    dense = convify.replace_linear_head(vgg11, x, dense=True)
    assert any("AdaptiveAvgPool2d((7, 7)) resamples 2x3 to 7x7" in n for n in convify.report(dense).replaced[0].notes)


def test_zoo_vgg11_gap_is_the_papers_head(vgg11: nn.Module) -> None:
    x = torch.randn(2, 3, 64, 96)
    gap = convify.replace_linear_head(vgg11, x, mode="gap")
    row = convify.report(gap).replaced[0]
    assert not row.exact and any("the paper's GAP head replaces the MLP" in n for n in row.notes)
    assert row.detail.removal.value == "resampling"  # the AdaptiveAvgPool2d(7) went with the MLP
    assert gap.get_submodule("classifier.0").kernel_size == (1, 1)
    body = sum(p.numel() for p in vgg11.features.parameters())
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(vgg11) == 132_863_336 and count(gap) == body + 512 * 1000 + 1000 == 9_733_480
    assert row.detail.parameters == (count(vgg11) - body, 513_000)
    assert run(gap, torch.randn(1, 3, 80, 80)).shape == (1, 1000)
    keep = convify.replace_linear_head(vgg11, x, mode="gap_mlp")
    assert count(keep) == body + 512 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000 == 32_200_040


def test_zoo_alexnet_gap_head_is_the_papers_head() -> None:
    model = build("alexnet")
    x = torch.randn(2, 3, 127, 127)  # a 3x3 map resampled to 6x6: not constant over the positions
    new = convify.replace_linear_head(model, x, mode="gap")
    row = convify.report(new).replaced[0]
    assert not row.exact and any("the paper's GAP head replaces the MLP" in n for n in row.notes)
    assert row.detail.dropped == ("classifier.4", "classifier.6")
    body = sum(p.numel() for p in model.features.parameters())
    assert sum(p.numel() for p in new.parameters()) == body + 256 * 1000 + 1000
    assert rel_err(run(new, x), run(model, x)) > 1e-3


def test_zoo_googlenet_aux_heads_in_train_mode() -> None:
    model = build("googlenet", aux_logits=True, init_weights=False).train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    x = torch.randn(2, 3, 64, 64)
    new = convify.replace_linear_head(model, x)
    assert sorted(r.name for r in convify.report(new).replaced) == ["aux1.fc1", "aux2.fc1", "fc"]
    want, got = run(model, x), run(new, x)
    assert type(got).__name__ == "GoogLeNetOutputs"
    for a, b in zip(got, want):
        assert rel_err(a, b) <= TOL


def test_zoo_squeezenet_has_no_linear_head() -> None:
    model = build("squeezenet1_1")
    new = convify.replace_linear_head(model, torch.randn(1, 3, 35, 35))
    rep = convify.report(new)
    assert rep.replaced == () and rep.skipped == ()
    assert any("no Linear head" in n and "already convolutional" in n for n in rep.notes)


def test_zoo_resnet18_dense_map_mean() -> None:
    model = build("resnet18")
    new = convify.replace_linear_head(model, torch.randn(1, 3, 32, 32), dense=True)
    x = torch.randn(2, 3, 96, 96)
    got = run(new, x)
    assert got.shape == (2, 1000, 3, 3)
    assert rel_err(got.mean((2, 3)), run(model, x)) <= TOL


# --------------------------------------------------------------------------- standard modules


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The modules the report's head records name (the former Linears)."""
    return [model.get_submodule(name) for row in convify.report(model).replaced for name in row.detail.linears]


@pytest.mark.parametrize("make,size,kwargs", [
    (lambda: LeNet("torch.flatten"), (1, 32, 32), {}),
    (lambda: LeNet("view-1"), (1, 32, 32), {"dense": True}),
    (lambda: GapNet("mean", mlp=True), (3, 12, 12), {"mode": "gap"}),
    (lambda: LeNet("torch.flatten"), (1, 32, 32), {"mode": "gap"}),
])
def test_heads_are_standard_convolutions(make, size, kwargs) -> None:
    """No convify class in a rewritten model: eager runs what is exported."""
    model = tiny(make())
    x = torch.randn(2, *size)
    new = convify.replace_linear_head(model, x[:1], **kwargs)
    heads = head_modules(new)
    assert heads and all(type(m) is nn.Conv2d for m in heads)
    assert not [type(m) for m in new.modules() if type(m).__module__.startswith("convify")]
    program = torch.export.export(new, (x,))
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert sum("conv2d" in t for t in targets) == sum(isinstance(m, nn.Conv2d) for m in new.modules())
    assert not any(op in t for t in targets for op in ("addmm", "aten.mm", "matmul", "linear"))


def test_head_record_carries_the_plan() -> None:
    from convify.core.rewrites.head import Exactness, HeadMode, HeadRecord, PoolRemoval

    model = tiny(GapNet("module", mlp=True))
    x = torch.randn(1, 3, 12, 12)
    flat = convify.report(convify.replace_linear_head(model, x)).replaced[0].detail
    dense = convify.report(convify.replace_linear_head(model, x, dense=True)).replaced[0].detail
    assert isinstance(flat, HeadRecord) and flat.linears == dense.linears == ("fc.0", "fc.3")
    assert (flat.mode, flat.dense, flat.removal, flat.exactness) == (
        HeadMode.CONV, False, PoolRemoval.NONE, Exactness.EXACT)
    assert (dense.dense, dense.removal, dense.kernel) == (True, PoolRemoval.GLOBAL, (1, 1))
    assert dense.exactness is Exactness.PER_POSITION  # the MLP has a Hardswish


def test_dense_head_with_dropout_between_linears_is_a_score_map_whose_mean_is_exact() -> None:
    """Dropout between the Linears is affine in eval mode: the mean of the score map is the original."""
    from convify.core.rewrites.head import Exactness

    model = reinit(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, 16), nn.Dropout(), nn.Linear(16, 5))).eval()
    new = convify.replace_linear_head(model, torch.randn(1, 3, 8, 8), dense=True)
    row = convify.report(new).replaced[0]
    assert row.detail.exactness is Exactness.SCORE_MAP_MEAN and not row.exact
    assert any("mean over the positions equals the original output" in n for n in row.notes)
    x = torch.randn(2, 3, 12, 12)
    assert rel_err(run(new, x).mean((2, 3)), run(model, x)) <= TOL


def test_one_linear_shared_by_two_heads_gets_two_sites() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 5)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(self.a(x).mean((2, 3))), self.fc(self.b(x).mean((2, 3)))

    model = tiny(Shared())
    x = torch.randn(2, 3, 6, 6)
    new = convify.replace_linear_head(model, x)
    assert sorted(r.name for r in convify.report(new).replaced) == ["fc", "fc@1"]
    for got, want in zip(run(new, x), run(model, x)):
        assert rel_err(got, want) <= TOL
    assert linears(new) == []


def test_batchnorm1d_between_head_linears_becomes_batchnorm2d():
    model = reinit(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 32),
                                 nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10))).eval()
    x = torch.randn(4, 3, 8, 8)
    out = convify.replace_linear_head(model, x[:1])
    assert isinstance(out.get_submodule("4"), nn.BatchNorm2d)
    assert not any(isinstance(m, nn.Linear) for m in out.modules())
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= 1e-5
    model.train()
    out = convify.replace_linear_head(model, x[:1])
    assert rel_err(out(x), model(x)) <= 1e-5  # batch statistics over N, as BatchNorm1d computes them


def test_layernorm_between_head_linears_ends_the_head_with_a_note():
    model = reinit(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 32), nn.LayerNorm(32),
                                 nn.Linear(32, 10))).eval()
    x = torch.randn(2, 3, 8, 8)
    out = convify.replace_linear_head(model, x[:1])
    row = convify.report(out).replaced[0]
    assert any("the head ends at" in n for n in row.notes) and any("stay Linear" in n for n in row.notes)
    with torch.no_grad():
        assert rel_err(out(x), model(x)) <= 1e-5


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("options", [{"head": "gap"}, {"head": "gap", "dense": True}, {"head": "gap_mlp"},
                                     {"head": "gap", "calibrate": True}])
def test_gap_recipes_round_trip(tmp_path, options) -> None:
    """Saved and loaded back: the same modules (the hidden layers stay gone), weights (fitted ones
    too: the rebuild makes the data-free init, the checkpoint's weights replace it) and outputs."""
    from cli_factories import tiny_net

    options = dict(options)
    shape = (1, 3, 16, 16)
    model = reinit(tiny_net(), seed=4).eval()
    calibration = [torch.randn(8, 3, 16, 16) for _ in range(2)] if options.pop("calibrate", False) else None
    new = convify.convify(model, torch.zeros(shape), pool=None, calibration=calibration, **options)
    assert convify.report(new).replaced[0].detail.collapsed == (options["head"] == "gap")
    assert (convify.report(new).replaced[0].fit is not None) == (calibration is not None)
    back = convify.load(convify.save(new, tmp_path / "c.pt", arch="cli_factories:tiny_net"), trust_code=True)
    want_sd, got_sd = new.state_dict(), back.state_dict()
    assert list(got_sd) == list(want_sd) and all(torch.equal(got_sd[k], v) for k, v in want_sd.items())
    x = torch.randn(2, 3, 24, 32)
    assert rel_err(run(back, x), run(new, x)) <= 1e-6


class MeanNormHead(nn.Module):
    """ConvNeXt's head as Hugging Face writes it: a mean over the map, a LayerNorm over the channels, a Linear."""

    def __init__(self, flat: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.flat = flat
        self.norm = nn.LayerNorm(6 * 4 * 4 if flat else 6)
        self.fc = nn.Linear(6 * 4 * 4 if flat else 6, 4)

    def forward(self, x):
        h = self.conv(x)
        h = h.flatten(1) if self.flat else h.mean([-2, -1])
        return self.fc(self.norm(h))


def test_layer_norm_after_the_global_mean_converts_exactly():
    model = tiny(MeanNormHead())
    x = torch.randn(3, 3, 4, 4)
    new = convify.replace_linear_head(model, x[:1])
    row = convify.report(new).replaced[0]
    assert row.exact and isinstance(new.get_submodule("fc"), nn.Conv2d)
    assert rel_err(run(new, x), run(model, x)) <= TOL


def test_layer_norm_over_flattened_features_is_skipped_with_its_reason():
    model = tiny(MeanNormHead(flat=True))
    new = convify.replace_linear_head(model, torch.randn(1, 3, 4, 4))
    rep = convify.report(new)
    assert rep.replaced == () and "LayerNorm normalizes the flattened C*H*W features" in rep.skipped[0].reason


@pytest.mark.parametrize("mode, dense, collapsed, removal, point, source_point, front, tail, class_op, verdict", [
    ("conv", False, False, "none", False, False, False, False, None, "exact"),
    ("conv", True, False, "global", False, False, True, True, None, "score map mean"),
    ("conv", True, False, "global", False, True, False, False, None, "exact"),       # a 1x1 map in front
    ("conv", True, False, "global", False, False, True, True, "Softmax", "per-position"),
    ("conv", True, False, "global", False, False, True, False, None, "per-position"),
    ("gap", False, True, "none", False, False, True, True, None, "approximate"),
    ("gap_mlp", False, False, "none", True, False, True, True, None, "exact"),      # the first layer reads 1x1
    ("gap_mlp", False, False, "none", False, False, True, True, None, "approximate"),
    ("gap_mlp", False, False, "global", False, False, True, True, None, "exact"),
    ("gap_mlp", False, False, "global", False, False, False, True, None, "approximate"),
])
def test_the_core_judges_a_head_from_what_a_frontend_saw(mode, dense, collapsed, removal, point, source_point, front,
                                                          tail, class_op, verdict):
    from convify.core.rewrites.head import Exactness, HeadFacts, HeadMode, PoolRemoval, judge_head  # noqa: PLC0415

    exactness, why = judge_head(HeadFacts(HeadMode(mode), dense, collapsed, PoolRemoval(removal), point,
                                          source_point, front, tail, class_op))
    assert exactness is Exactness(verdict)
    assert (why is None) == exactness.exact
    if class_op:
        assert f"a map of {class_op} at each position" in why
