"""Hugging Face image classifiers: built from small configs (nothing is
downloaded), traced whole, rewritten through the Python API and through the
command line from a folder as ``save_pretrained`` writes it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import convify
from convify import io as ck
from convify.errors import CheckpointError, ExampleInputError, UsageError

from conftest import assert_input_dependent, reinit, rel_err

transformers = pytest.importorskip("transformers")

X = (1, 3, 64, 64)


def hf_resnet() -> nn.Module:
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                       num_labels=5)
    return reinit(transformers.ResNetForImageClassification(config)).eval()


def hf_regnet() -> nn.Module:
    config = transformers.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8,
                                       num_labels=5)
    return reinit(transformers.RegNetForImageClassification(config)).eval()


def hf_convnext() -> nn.Module:
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    return reinit(transformers.ConvNextForImageClassification(config)).eval()


def hf_mobilenet_v2() -> nn.Module:  # TF "same" padding from int(x.shape[-2])
    config = transformers.MobileNetV2Config(depth_multiplier=0.35, num_labels=5)
    return reinit(transformers.MobileNetV2ForImageClassification(config)).eval()


def hf_vit() -> nn.Module:  # (*x.shape[:-1], -1, head_dim)
    config = transformers.ViTConfig(image_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, num_labels=5)
    return reinit(transformers.ViTForImageClassification(config)).eval()


@pytest.mark.parametrize("make", [hf_resnet, hf_regnet, hf_convnext, hf_mobilenet_v2, hf_vit],
                         ids=["resnet", "regnet", "convnext", "mobilenet_v2", "vit"])
def test_hf_classifiers_trace_whole(make):
    model = make()
    out = convify.convify(model, torch.randn(X))
    rep = convify.report(out)
    assert all(p.untraced == () for p in rep.passes), [p.untraced for p in rep.passes]
    assert not any(isinstance(m, nn.MaxPool2d) for m in out.modules())
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert out(x).logits.shape == model(x).logits.shape == (3, 5)


@pytest.mark.parametrize("make", [hf_resnet, hf_regnet], ids=["resnet", "regnet"])
def test_hf_heads_become_exact_convolutions(make):
    model = make()
    out = convify.replace_linear_head(model, torch.randn(X))
    (row,) = convify.report(out).passes[0].replaced
    assert row.name == "classifier.1" and row.exact
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want = model(x).logits
        assert_input_dependent(want)
        assert rel_err(out(x).logits, want) <= 1e-5


def test_hf_resnet_max_pooling_is_replaced():
    out = convify.replace_maxpool(hf_resnet(), torch.randn(X))
    (row,) = convify.report(out).passes[0].replaced
    assert row.name == "resnet.embedder.pooler"
    assert isinstance(out.get_submodule("resnet.embedder.pooler"), nn.Conv2d)


def test_dense_hf_resnet_gives_a_score_map_whose_mean_is_the_logits():
    model = hf_resnet()
    dense = convify.replace_linear_head(model, torch.randn(X), dense=True)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        scores, want = dense(x).logits, model(x).logits
    assert scores.shape == (2, 5, 16, 16)
    assert rel_err(scores.mean((2, 3)), want) <= 1e-5


def test_rewritten_hf_model_keeps_its_output_type_and_keywords():
    model = hf_resnet()
    out = convify.convify(model, torch.randn(X))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = out(pixel_values=x)
    assert type(got) is type(model(x))
    assert got.logits.shape == (2, 5)


def test_rewritten_hf_model_refuses_what_it_was_not_traced_for():
    out = convify.convify(hf_resnet(), torch.randn(X))
    with pytest.raises(UsageError, match=r"with labels=None .* with labels=a tensor of shape \(2,\): give labels=None"):
        out(torch.randn(2, 3, 64, 64), labels=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ExampleInputError, match=r"resnet.embedder: this input's shapes take another branch"):
        out(torch.randn(1, 4, 64, 64))


# --------------------------------------------------------------------------- folders and recipes


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "tiny-resnet"
    hf_resnet().save_pretrained(path)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    return path


def test_open_model_reads_a_folder_with_a_self_contained_recipe(folder, tmp_path):
    src = ck.open_model(folder)
    assert src.arch == ck.ArchSpec("hf", "ResNetForImageClassification")
    assert src.arch_kwargs["config"]["hidden_sizes"] == [8, 16]
    rewritten = convify.convify(src.model, torch.zeros(X))
    path = ck.save(rewritten, tmp_path / "out.pt", arch=src.arch, arch_kwargs=src.arch_kwargs)
    moved = shutil.move(str(folder), str(tmp_path / "moved"))  # the recipe does not need the folder
    try:
        loaded = convify.load(path)
    finally:
        shutil.move(moved, str(folder))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, rewritten(x).logits)


def test_arch_hf_folder_with_weights_gets_the_same_recipe(folder):
    src = ck.open_model(arch=f"hf:{folder}", weights=folder / "model.safetensors")
    assert src.arch == ck.ArchSpec("hf", "ResNetForImageClassification")
    assert src.arch_kwargs == ck.open_model(folder).arch_kwargs
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(src.model(x).logits, ck.open_model(folder).model(x).logits)


def test_folder_through_the_command_line(folder, tmp_path):
    tests = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "convify", "rewrite", str(folder), "-o", str(tmp_path / "out.pt"),
                           "--input-shape", "1,3,64,64", "--dense"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "resnet.embedder.pooler" in proc.stdout and "classifier.1" in proc.stdout
    assert "Loading weights" not in proc.stderr
    loaded = convify.load(tmp_path / "out.pt")
    original = transformers.AutoModelForImageClassification.from_pretrained(folder, local_files_only=True)
    want = convify.convify(original, torch.zeros(X), dense=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, want(x).logits)
    assert loaded(x).logits.shape == (2, 5, 12, 12)


def test_folder_errors(tmp_path, monkeypatch, folder):
    with pytest.raises(CheckpointError, match=r"folder without config.json"):
        ck.open_model(tmp_path)
    with pytest.raises(CheckpointError, match=r"transformers has no model class 'Nope'"):
        ck.build_arch("hf:Nope", {"config": {}})
    with pytest.raises(CheckpointError, match=r"give arch_kwargs=\{'config'"):
        ck.build_arch("hf:ResNetForImageClassification", {"num_labels": 3})
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(CheckpointError, match=r"needs Hugging Face transformers: pip install -e '\.\[hf\]'"):
        ck.open_model(folder)


def test_hf_convnext_head_norm_after_the_mean_becomes_a_channel_norm():
    """HF ConvNeXt: mean over the map -> LayerNorm(C) -> Linear; exact as a channel LayerNorm and a 1x1 conv."""
    model = hf_convnext()
    out = convify.replace_linear_head(model, torch.randn(X))
    (row,) = convify.report(out).passes[0].replaced
    assert row.name == "classifier" and row.exact
    assert isinstance(out.get_submodule("classifier"), nn.Conv2d)  # the blocks' channel MLPs stay Linear
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        want = model(x).logits
        assert_input_dependent(want)
        assert rel_err(out(x).logits, want) <= 1e-5
    dense = convify.replace_linear_head(model, torch.randn(X), dense=True)
    (row,) = convify.report(dense).passes[0].replaced
    assert any("per-position classifier" in n for n in row.notes)
    with torch.no_grad():
        assert dense(torch.randn(1, 3, 128, 128)).logits.shape == (1, 5, 16, 16)  # stride 8
