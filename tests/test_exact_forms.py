"""``mode="exact"``'s ``exact_form`` and ``grouped``: the forms neural-network
verifiers take (convolutions and ReLUs only; no grouped convolution), through
``replace_maxpool``, ``convify()``, ONNX, the command line and a checkpoint.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import convify
from convify.core.maxtree import TreeForm
from convify.errors import OptionError
from convify.export.census import op_census

from cli_factories import tiny_net
from conftest import rel_err

#: the modules a verifier takes at a site proven >= 0 (no addition, no padding module)
CONV_RELU = {nn.Conv2d, nn.ReLU}


class Verifier(nn.Module):
    """A VNN-COMP-like net: a signed pool (straight after a convolution), a
    non-negative one with padding, a non-negative ceil_mode one."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3)
        self.signed, self.padded = nn.MaxPool2d(2, 2), nn.MaxPool2d(3, 2, 1)
        self.ceil = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.fc = nn.Linear(6 * 2 * 2, 10)

    def forward(self, x):
        x = self.padded(self.signed(self.conv1(x)).relu())
        x = self.ceil(self.conv2(x).relu())
        return self.fc(x.flatten(1))


def tree_modules(model: nn.Module, name: str) -> list[nn.Module]:
    return [m for m in model.get_submodule(name).modules() if not list(m.children())]


@pytest.mark.parametrize("form", ["separable", "direct"])
@pytest.mark.parametrize("grouped", [True, False])
def test_a_non_negative_site_is_convolutions_and_relus_only(form, grouped):
    model = Verifier().double().eval()
    x = torch.randn(1, 1, 21, 21, dtype=torch.float64)
    out = convify.replace_maxpool(model, x, mode="exact", exact_form=form, grouped=grouped)
    rows = {r.name: r.detail.tree for r in convify.report(out).replaced}
    assert set(rows) == {"signed", "padded", "ceil"}
    padded = tree_modules(out, "padded")
    assert {type(m) for m in padded} == CONV_RELU  # zeros inside the first convolutions: no padding module
    assert isinstance(padded[0], nn.Conv2d) and padded[0].padding != (0, 0)
    assert not rows["padded"].signed and rows["padded"].form is TreeForm(form)
    assert rows["signed"].signed
    convs = [m for site in rows for m in tree_modules(out, site) if isinstance(m, nn.Conv2d)]
    assert all(c.groups == (c.in_channels // c.weight.shape[1] if grouped else 1) for c in convs)
    assert all(c.groups > 1 for c in convs) if grouped else all(c.groups == 1 for c in convs)
    y = torch.randn(3, 1, 21, 21, dtype=torch.float64)  # the Linear head fixes the size
    with torch.no_grad():
        assert rel_err(out(y), model(y)) <= 1e-12


@pytest.mark.parametrize("form", list(TreeForm))
@pytest.mark.parametrize("signed", [True, False])
def test_ungrouped_trees_compute_the_same_numbers(form, signed):
    pool = nn.MaxPool2d((3, 2), (2, 1), (1, 0), (1, 2), ceil_mode=True)
    model = nn.Sequential(nn.Conv2d(2, 5, 1), *([] if signed else [nn.ReLU()]), pool).double().eval()
    x = torch.randn(2, 2, 11, 13, dtype=torch.float64)
    grouped = convify.replace_maxpool(model, x, mode="exact", exact_form=form.value)
    ungrouped = convify.replace_maxpool(model, x, mode="exact", exact_form=form.value, grouped=False)
    site = "2" if not signed else "1"
    convs = [m for m in ungrouped.get_submodule(site).modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.groups == 1 and c.in_channels % 5 == 0 for c in convs)
    with torch.no_grad():
        assert rel_err(ungrouped(x), model(x)) <= 1e-12 and rel_err(ungrouped(x), grouped(x)) <= 1e-12
    g, u = (convify.report(m).replaced[0].detail.tree for m in (grouped, ungrouped))
    assert g.grouped and not u.grouped and u.channels == g.channels and u.relu_levels == g.relu_levels
    assert u.parameters == 5 * g.parameters and u.macs == 5 * g.macs  # C times: block-diagonal weights
    assert "ungrouped (block-diagonal) convolutions" in u.describe() and ", ungrouped," in convify.report(
        ungrouped).replaced[0].new


def test_the_forms_options_refuse_another_mode():
    with pytest.raises(OptionError, match=r"grouped=False shape the layers of mode='exact' only, not of "
                                          r"mode='conv'; pass mode='exact'"):
        convify.replace_maxpool(tiny_net(), torch.zeros(1, 3, 16, 16), grouped=False)
    with pytest.raises(OptionError, match="exact_form must be one of 'chain', 'separable', 'direct'"):
        convify.replace_maxpool(tiny_net(), torch.zeros(1, 3, 16, 16), mode="exact", exact_form="tree")


def test_onnx_of_the_verifier_form_is_conv_relu_and_the_rest_of_the_model(tmp_path):
    import onnx
    import onnxruntime as ort

    model = Verifier().eval()
    x = torch.randn(1, 1, 21, 21)
    out = convify.convify(model, x, pool="exact", exact_form="separable", grouped=False, head="conv")
    path = convify.export_onnx(out, tmp_path / "verifier.onnx", x, exporter="legacy")
    census = op_census(path)
    # the signed site has no padding; ceil_mode's zeros are inside the convolutions; Identity: the legacy
    # exporter's deduplicated initializers. Nothing adds, pads or takes a max.
    assert set(census) <= {"Conv", "Relu", "Flatten", "Identity"}, census
    groups = [a.i for n in onnx.load(str(path)).graph.node if n.op_type == "Conv" for a in n.attribute
              if a.name == "group"]
    assert set(groups) <= {1}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = torch.randn(1, 1, 21, 21)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: y.numpy()})[0])
    with torch.no_grad():
        assert rel_err(got, model(y)) <= 1e-5


def test_the_command_line_takes_the_form_and_ungrouped_into_a_checkpoint(tmp_path, capsys):
    from convify.cli import main

    out = tmp_path / "verifier.pt"
    code = main(["rewrite", "--arch", "cli_factories:tiny_net", "--input-shape", "1,3,16,16", "--pool", "exact",
                 "--exact-form", "separable", "--ungrouped", "--head", "none", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "exact max tree (separable, ungrouped" in capsys.readouterr().out
    back = convify.load(out, trust_code=True)
    assert convify.report(back).passes[0].options == {"mode": "exact", "init": "avg", "exact_form": "separable",
                                                      "grouped": False}
    convs = [m for m in back.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.groups == 1 for c in convs)
    model = tiny_net().eval()
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(back(x), model(x)) <= 1e-5
    help_text = main_help()
    assert "--ungrouped" in help_text and "--exact-form {chain,separable,direct}" in help_text


def main_help() -> str:
    import contextlib
    import io

    from convify.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(["rewrite", "--help"])
    return buf.getvalue()


@pytest.mark.parametrize("form", list(TreeForm))
@pytest.mark.parametrize("k,s,p,d,inside", [(3, 2, 1, 1, True), (2, 2, 0, 1, True), (3, 3, 0, 2, True),
                                            (2, 2, 0, 2, False), ((3, 2), (2, 3), (1, 0), 1, True)])
def test_ceil_mode_zeros_go_inside_the_convolutions_where_the_dilation_allows(form, k, s, p, d, inside):
    pool = nn.MaxPool2d(k, s, p, d, ceil_mode=True)
    model = nn.Sequential(nn.ReLU(), pool).double()
    out = convify.replace_maxpool(model, torch.zeros(1, 3, 17, 16, dtype=torch.float64), mode="exact",
                                  exact_form=form.value)
    pads = [m for m in out.modules() if isinstance(m, nn.ConstantPad2d)]
    assert (not pads) == inside
    for size in ((17, 16), (20, 23), (9, 11)):
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        with torch.no_grad():
            assert out(x).shape == model(x).shape and rel_err(out(x), model(x)) <= 1e-12, size
