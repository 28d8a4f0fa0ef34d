"""Tracing, shape propagation, probe inputs and module helpers."""
from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convify.errors import ExampleInputError, TraceError, UsageError
from convify.fx import copying, nodes, shapes, tracing


class SamePool(nn.MaxPool2d):
    def forward(self, x):
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=-float("inf")), 2)


def test_tracer_keeps_pool_subclasses_opaque():
    gm = tracing.trace(nn.Sequential(nn.Conv2d(3, 3, 1), SamePool(2)), (nn.MaxPool2d,))
    ops = [(n.op, str(n.target)) for n in gm.graph.nodes]
    assert ("call_module", "1") in ops
    assert not any("pad" in t for _, t in ops)


def test_trace_error_carries_fx_reason():
    class Bad(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError, match="torch.fx cannot trace Bad: .*"):
        tracing.trace(Bad())


def test_shape_propagation_records_shapes_and_falls_back_to_real_data():
    class NeedsData(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x)
            return y * y.abs().max().item()  # .item() cannot run on meta tensors

    gm = tracing.trace(NeedsData())
    shapes.propagate_shapes(gm, torch.randn(2, 3, 9, 9))
    conv = next(n for n in gm.graph.nodes if n.target == "conv")
    assert shapes.info(conv).shape == (2, 4, 7, 7) and shapes.info(conv).device.type == "cpu"


def test_eval_mode_restores_each_flag():
    model = nn.Sequential(nn.BatchNorm2d(2), nn.BatchNorm2d(2)).train()
    model[1].eval()
    with copying.eval_mode(model):
        assert not model.training and not model[0].training
    assert model.training and model[0].training and not model[1].training


def test_free_name_and_set_submodule():
    root = nn.Module()
    nodes.set_submodule(root, "a.b.pool", nn.Identity())
    assert isinstance(root.get_submodule("a.b.pool"), nn.Identity)
    assert nodes.free_name(root, "a.b.pool") == "a.b.pool@1"
    assert nodes.free_name(root, "a.b.conv") == "a.b.conv"


def test_scope_names_from_module_stack():
    class Inner(nn.Module):
        def forward(self, x):
            return F.max_pool2d(x, 2)

    gm = tracing.trace(nn.Sequential(nn.Conv2d(1, 1, 1), Inner()))
    call = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert nodes.scope_of(call) == "1"


def test_convify_leaf_modules_stay_one_call_when_retraced():
    from convify.dense.matmul import MatmulConv2d

    gm = tracing.trace(nn.Sequential(MatmulConv2d(4, 3, 2), nn.ReLU()))
    assert [n.op for n in gm.graph.nodes][1] == "call_module"
    assert type(gm.get_submodule("0")) is MatmulConv2d


def test_meta_shape_propagation_shortcuts_shape_preserving_modules():
    """On meta tensors, BatchNorm and activations hand their input on (no fallback to a real forward)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2)).eval()
    gm = tracing.trace(model, (nn.MaxPool2d,))
    with torch.no_grad(), shapes.meta_weights(gm):
        shapes.ShapeProp(gm, shortcut_shape_preserving=True).run(torch.randn(1, 3, 10, 10, device="meta"))
    assert [shapes.info(n).shape for n in gm.graph.nodes if n.op == "call_module"] == [
        (1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 8, 8), (1, 4, 4, 4)]


# --------------------------------------------------------------------------- tracing as the model is called


class WithOptions(nn.Module):
    """A forward with arguments beyond its input, a shape check, and a cache
    filled in eval mode (as LeViT's attention biases are)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x, mask=None, return_both: bool = False, scale: float = 2.0):
        if x.shape[1] != 3:  # a check on shapes: follows the example, guarded
            raise ValueError("three channels, please")
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.conv.bias * 0
        y = self.conv(x) * scale + self.cache[key][:, None, None]
        if mask is not None:
            y = y * mask
        return (y, x) if return_both else y


def test_forward_arguments_keep_their_defaults_and_are_guarded():
    model = WithOptions().eval()
    gm = tracing.trace(model, args=(torch.randn(1, 3, 8, 8),))
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x", "mask", "return_both", "scale"]
    x = torch.randn(2, 3, 12, 10)  # other batch and spatial sizes still run: shapes used as values stay symbolic
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x))
        assert torch.allclose(gm(x, return_both=False, scale=2.0), model(x))
    with pytest.raises(UsageError, match=r"rewritten with return_both=False .* called with return_both=True"):
        gm(x, return_both=True)
    with pytest.raises(UsageError, match=r"with mask=None .* called with mask=a tensor of shape \(1,\)"):
        gm(x, mask=torch.ones(1))


def test_branches_on_shapes_follow_the_example_and_are_guarded():
    gm = tracing.trace(WithOptions().eval(), args=(torch.randn(1, 3, 8, 8),))
    assert any(n.target is tracing.check_traced_branch for n in gm.graph.nodes)
    with pytest.raises(ExampleInputError, match=r"this input's shapes take another branch"):
        gm(torch.randn(1, 5, 8, 8))
    with pytest.raises(TraceError, match=r"cannot be used as inputs to control flow"):
        tracing.trace(WithOptions().eval())  # without an example nothing is known about the shapes


def test_branches_on_data_stay_untraceable_with_an_example():
    class Bad(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError, match=r"depends on tensor data, not only on shapes"):
        tracing.trace(Bad(), args=(torch.randn(1, 3, 4, 4),))


def test_tracing_leaves_no_proxy_in_module_state():
    model = WithOptions().eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
    before = dict(model.cache)
    first = tracing.trace(model, args=(torch.randn(1, 3, 8, 8),))
    assert model.cache == before
    second = tracing.trace(model, args=(torch.randn(1, 3, 8, 8),))  # would read the first trace's Proxy back
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(first(x), second(x))


def test_decorated_forwards_trace_with_their_decorators():
    def returns_doubled(forward):
        @functools.wraps(forward)
        def wrapper(self, *args, **kwargs):
            return forward(self, *args, **kwargs) * 2
        return wrapper

    class Decorated(nn.Module):
        @returns_doubled
        def forward(self, x, flag: bool = False, **kwargs):
            return x + 1 if flag else x - 1

    gm = tracing.trace(Decorated(), args=(torch.zeros(1, 3, 4, 4),))
    assert torch.equal(gm(torch.zeros(1, 3, 4, 4)), torch.full((1, 3, 4, 4), -2.0))


@dataclasses.dataclass
class DictOutput(dict):
    """A dict that is a dataclass, as transformers' ModelOutput is."""

    logits: torch.Tensor | None = None
    extra: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.update({k: v for k, v in vars(self).items() if v is not None})


def test_dataclass_dict_outputs_are_rebuilt():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return DictOutput(logits=self.fc(x))

    gm = tracing.trace(Net(), args=(torch.randn(1, 4),))
    out = gm(torch.randn(3, 4))
    assert type(out) is DictOutput and out.logits.shape == (3, 2) and out.extra is None
    fc = next(n for n in gm.graph.nodes if n.target == "fc")
    assert all(nodes.is_output_like(u) for u in fc.users)


def test_copy_module_copies_cached_non_leaf_tensors():
    model = WithOptions().eval()
    model(torch.randn(1, 3, 8, 8))  # outside no_grad: the cache holds a tensor with a grad_fn
    assert model.cache["cpu"].grad_fn is not None
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    copied = copying.copy_module(model)
    assert copied.cache["cpu"].grad_fn is None and torch.equal(copied.cache["cpu"], model.cache["cpu"])
    assert copied.conv.weight is not model.conv.weight


def test_a_keyword_its_parent_fixed_keeps_the_forwards_default_and_is_guarded():
    model = WithOptions().eval()
    gm = tracing.trace(model, args=(torch.randn(1, 3, 8, 8),), kwargs={"scale": 3.0})
    scale = next(n for n in gm.graph.nodes if n.target == "scale")
    assert scale.args == (2.0,)  # the forward's default: called without scale, the guard refuses
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(gm(x, scale=3.0), model(x, scale=3.0))
        assert not torch.allclose(gm(x, scale=3.0), model(x))
    with pytest.raises(UsageError, match=r"rewritten with scale=3.0 .* called with scale=2.0: give scale=3.0"):
        gm(x)


class ShapesAsNumbers(nn.Module):
    """TF-style "same" padding from ``int(x.shape[-1])`` and a reshape that
    unpacks a shape into a new one (``len`` of a shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        size = int(x.shape[-1])
        pad = max(0, (size + 1) // 2 * 2 - size + 1)
        y = self.conv(F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)))
        return y.reshape(*y.shape[:-2], -1)


def test_shapes_turned_into_numbers_follow_the_example_and_are_guarded():
    model = ShapesAsNumbers().eval()
    gm = tracing.trace(model, args=(torch.randn(1, 3, 8, 8),))
    x = torch.randn(2, 3, 8, 8)  # another batch size: only the traced width is fixed
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert sum(n.target is tracing.check_traced_value for n in gm.graph.nodes) == 1
    with pytest.raises(ExampleInputError, match=r"turns a shape into a number, 8 on the example .* 9 on this one"):
        gm(torch.randn(1, 3, 9, 9))
    with pytest.raises(TraceError, match="not 'Proxy'"):
        tracing.trace(model)  # without an example nothing is known about the shapes


def test_guards_survive_a_second_trace():
    gm = tracing.trace(WithOptions().eval(), args=(torch.randn(1, 3, 8, 8),))
    again = torch.fx.symbolic_trace(gm)
    guards = [n.target for n in again.graph.nodes if n.op == "call_function" and n.target in
              (tracing.check_traced_argument, tracing.check_traced_branch)]
    assert len(guards) == 4  # three keywords and the channel check
    with pytest.raises(ExampleInputError, match="another branch"):
        again(torch.randn(1, 5, 8, 8))
