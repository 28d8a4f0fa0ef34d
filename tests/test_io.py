"""convify.checkpoint in-process: spec parsing, reading files without running
their code, state_dict wrappers, key mismatches, atomic writes, and the
save -> load round trip."""
from __future__ import annotations

import copy
import pickle
import random
import re
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import convify
from convify import io as ck
from convify.errors import CheckpointError, UsageError
from convify.io.digest import weights_digest

from cli_factories import WritesAFile, tiny_net
from conftest import reinit, rel_err

SHAPE = (1, 3, 16, 16)
TINY = "cli_factories:tiny_net"


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("spec, kind, name", [
    ("torchvision:resnet18", "torchvision", "resnet18"),
    ("timm:resnet50", "timm", "resnet50"),
    ("cli_factories:tiny_net", "import", "cli_factories:tiny_net"),
    ("pkg.sub.mod:Factory.build", "import", "pkg.sub.mod:Factory.build"),
])
def test_parse_arch(spec, kind, name):
    arch = ck.parse_arch(spec)
    assert (arch.kind, arch.name, str(arch)) == (kind, name, spec)


@pytest.mark.parametrize("spec, match", [
    ("resnet18", r"did you mean torchvision:resnet18"),
    ("torchvision:", "names no model"),
    ("pkg.mod", "package.module:factory"),
    ("a b:c", "cannot read architecture"),
])
def test_parse_arch_refuses(spec, match):
    with pytest.raises(CheckpointError, match=match):
        ck.parse_arch(spec)


def test_parse_arch_kwargs_reads_literals():
    got = ck.parse_arch_kwargs(["num_classes=10", "dropout=0.5", "aux_logits=False", "name='x'",
                                "sizes=[1, 2]", "norm=None"])
    assert got == {"num_classes": 10, "dropout": 0.5, "aux_logits": False, "name": "x", "sizes": [1, 2],
                   "norm": None}


@pytest.mark.parametrize("item, match", [
    ("num_classes", "write key=value"),
    ("=3", "write key=value"),
    ("variant=small", "Python literal"),
    ("x=__import__('os')", "Python literal"),
])
def test_parse_arch_kwargs_refuses(item, match):
    with pytest.raises(CheckpointError, match=match):
        ck.parse_arch_kwargs([item])


def test_build_arch_errors_name_the_fix():
    with pytest.raises(CheckpointError, match="did you mean resnet18"):
        ck.build_arch("torchvision:resnet81")
    with pytest.raises(CheckpointError, match=r"building torchvision:resnet18\(num_clases=10\) failed"):
        ck.build_arch("torchvision:resnet18", {"num_clases": 10})
    with pytest.raises(CheckpointError, match="not a torch.nn.Module"):
        ck.build_arch("cli_factories:not_a_model")
    with pytest.raises(CheckpointError, match="cannot import 'no_such_module_xyz'"):
        ck.build_arch("no_such_module_xyz:f")
    with pytest.raises(CheckpointError, match="has no attribute 'nope'"):
        ck.build_arch("cli_factories:nope")


def test_build_arch_is_in_eval_mode_with_kwargs():
    model = ck.build_arch(TINY, {"num_classes": 4})
    assert not model.training and model[-1].out_features == 4


# --------------------------------------------------------------------------- reading files


def test_unwrap_opens_wrappers_and_prefixes():
    sd = tiny_net().state_dict()
    wrapped = {"epoch": 3, "optimizer": {"lr": 0.1},
               "state_dict": {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}}
    got = ck.unwrap(wrapped)
    assert list(got) == list(sd)
    assert all(got[k] is sd[k] for k in sd)


def test_unwrap_refuses_what_holds_no_state_dict():
    with pytest.raises(CheckpointError, match=r"keys \['epoch', 'lr'\] and no state_dict"):
        ck.unwrap({"epoch": 3, "lr": 0.1}, "x.pt")
    with pytest.raises(CheckpointError, match="holds a list"):
        ck.unwrap([1, 2], "x.pt")


def test_read_file_refuses_unreadable_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "garbage.pt").write_bytes(b"hello, not a checkpoint\n")
    torch.save(tiny_net().state_dict(), tmp_path / "good.pt")
    (tmp_path / "trunc.pt").write_bytes((tmp_path / "good.pt").read_bytes()[:500])
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    cases = {"missing.pt": "no such model file", "empty.pt": "is empty", "garbage.pt": "is a text file",
             "trunc.pt": "truncated or corrupt", "bad.safetensors": "not a readable safetensors", ".": "is a folder"}
    for name, match in cases.items():
        with pytest.raises(CheckpointError, match=match):
            ck.read_file(tmp_path / name)


def _onnx_model(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    onnx.save(helper.make_model(graph, producer_name="pytorch"), path)
    return path


def test_read_file_names_an_onnx_model_or_a_text_file_for_what_it_is(tmp_path):
    """Not "Unsupported operand 8" or "KeyError: 101" from unpickling them: what the file is, and what convify takes."""
    _onnx_model(tmp_path / "model.onnx")
    (tmp_path / "model.bin").write_bytes((tmp_path / "model.onnx").read_bytes())  # the name does not decide
    (tmp_path / "notes.pt").write_text("epoch 7: accuracy 0.91\n")
    (tmp_path / "config.pt").write_text('{"num_classes": 10}')
    for name, what in [("model.onnx", "an ONNX model"), ("model.bin", "an ONNX model"), ("notes.pt", "a text file"),
                       ("config.pt", "a JSON text file")]:
        with pytest.raises(CheckpointError, match=rf"{re.escape(name)} is {what}, not a PyTorch model file: .*"
                                                  r"convify checkpoint, a state_dict .* with arch="):
            ck.read_file(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"model\.onnx is an ONNX model, not a PyTorch weights file: .*"
                                              r"state_dict saved with torch.save"):
        ck.read_file(tmp_path / "model.onnx", what="weights file")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, and still what people have
def test_read_file_refuses_torchscript(tmp_path):
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3)))
    torch.jit.save(scripted, tmp_path / "ts.pt")
    with pytest.raises(CheckpointError, match="TorchScript archive: torch.fx cannot trace"):
        ck.read_file(tmp_path / "ts.pt", trust_pickle=True)


def test_read_file_reads_safetensors_and_legacy_format(tmp_path):
    from safetensors.torch import save_file

    sd = tiny_net().state_dict()
    save_file(sd, tmp_path / "w.safetensors")
    torch.save(sd, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("w.safetensors", "legacy.pt"):
        got = ck.read_file(tmp_path / name)
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def _evil(tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    marker = tmp_path / f"pwned_{fmt}"
    path = tmp_path / f"evil_{fmt}.pt"
    if fmt == "zip":
        torch.save({"state_dict": WritesAFile(str(marker))}, path)
    elif fmt == "legacy":
        torch.save({"x": WritesAFile(str(marker))}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(WritesAFile(str(marker)), protocol=4))
    assert not marker.exists()
    return path, marker


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw"])
def test_malicious_pickle_never_runs_without_trust(tmp_path, fmt):
    path, marker = _evil(tmp_path, fmt)
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(.*open.*\).*runs code.*trust_pickle=True"):
        ck.read_file(path)
    assert not marker.exists()


def test_malicious_pickle_runs_with_trust(tmp_path):
    """The control: the same file does run code once trusted, so the test above can fail."""
    path, marker = _evil(tmp_path, "zip")
    ck.read_file(path, trust_pickle=True)
    assert marker.exists()


def test_pickled_module_needs_trust(tmp_path):
    torch.save(tiny_net(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"torch.nn.modules.*trust_pickle=True"):
        ck.open_model(tmp_path / "m.pt")
    src = ck.open_model(tmp_path / "m.pt", trust_pickle=True)
    assert src.pickled and isinstance(src.model, nn.Sequential) and not src.model.training


# --------------------------------------------------------------------------- weights that do not fit


def test_mismatch_lists_missing_unexpected_and_shapes():
    model = tiny_net()
    sd = dict(tiny_net(num_classes=3).state_dict())
    del sd["0.weight"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        ck.load_weights(model, sd, source="w.pt", target=TINY)
    text = str(info.value)
    assert "1 missing (0.weight)" in text
    assert "1 unexpected (extra.weight)" in text
    assert "10.weight [3, 16] in file vs [10, 16] in model" in text
    assert "arch_kwargs=" in text and "--" not in text


def test_lightning_prefix_and_missing_num_batches_tracked_fit():
    src = reinit(tiny_net(), seed=1)
    sd = {f"model.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    model = tiny_net()
    ck.load_weights(model, sd, source="w.ckpt", target=TINY)
    assert torch.equal(model[0].weight, src[0].weight)


def test_open_model_errors():
    with pytest.raises(UsageError, match="no model given"):
        ck.open_model()
    with pytest.raises(UsageError, match="weights= needs arch="):
        ck.open_model(weights="w.pt")
    with pytest.raises(UsageError, match="either as path or with weights="):
        ck.open_model("a.pt", arch=TINY, weights="b.pt")


def test_state_dict_without_arch_asks_for_arch(tmp_path):
    torch.save(tiny_net().state_dict(), tmp_path / "w.pt")
    with pytest.raises(UsageError, match=r"holds a state_dict \(\d+ tensors\) but no architecture.*arch="):
        ck.open_model(tmp_path / "w.pt")


# --------------------------------------------------------------------------- writing


def test_check_output_refusals(tmp_path):
    existing = tmp_path / "out.pt"
    existing.write_bytes(b"keep")
    with pytest.raises(CheckpointError, match="exists: pass force=True to replace it"):
        ck.check_output(existing)
    with pytest.raises(CheckpointError, match="refusing to write over the input"):
        ck.check_output(existing, force=True, inputs=[str(tmp_path / "." / "out.pt")])
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.check_output(tmp_path / "nope" / "out.pt")
    with pytest.raises(CheckpointError, match="is not a folder"):
        ck.check_output(existing / "out.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        ck.check_output(tmp_path, force=True)
    assert ck.check_output(existing, force=True) == existing


def test_atomic_write_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    out = tmp_path / "out.pt"
    out.write_bytes(b"old")

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        ck.atomic_write(out, fail, force=True)
    assert out.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]
    ck.atomic_write(out, lambda tmp: tmp.write_bytes(b"new"), force=True)
    assert out.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pt"]


# --------------------------------------------------------------------------- round trip


@pytest.fixture
def rewritten():
    model = reinit(tiny_net(), seed=2).eval()
    options = {"head": "conv", "pool": "conv", "init": "kaiming"}
    torch.manual_seed(0)
    return model, convify.convify(model, torch.zeros(SHAPE), **options), options


def test_save_load_round_trip(tmp_path, rewritten):
    _model, new, options = rewritten
    out = convify.save(new, tmp_path / "c.pt", arch=TINY)
    raw = torch.load(out, weights_only=True)
    assert raw["format"] == "convify" and raw["version"] == convify.__version__
    assert raw["arch"] == TINY and raw["input_shape"] == list(SHAPE)
    assert raw["passes"] == [
        {"rewrite": "maxpool", "options": {"mode": "conv", "init": "kaiming"}, "only": None, "skip": None,
         "input_shape": list(SHAPE)},
        {"rewrite": "head", "options": {"mode": "conv", "dense": False}, "only": None, "skip": None,
         "input_shape": list(SHAPE)}]
    assert [r.rewrite for r in convify.report(new).replaced] == ["maxpool", "maxpool", "head"]
    with pytest.raises(CheckpointError, match=r"calling cli_factories:tiny_net, code chosen by whoever wrote.*trust"):
        convify.load(out)
    back = convify.load(out, trust_code=True)
    assert not back.training
    x = torch.randn(4, *SHAPE[1:])
    with torch.no_grad():
        want, got = new(x), back(x)
    assert rel_err(got, want) <= 1e-6
    assert convify.report(back).replaced  # it is the rewritten model, report included


# recipe -> the convify.convify options it records; each rebuilds modules or shapes the defaults do not
RECIPES = {
    "fold": {"pool": "fold"},
    "depthwise": {"pool": "depthwise", "init": "kaiming"},
    "gap": {"head": "gap"},
    "dense": {"dense": True},
    "only": {"only": ["3", "8"]},
    "skip": {"skip": "6"},
}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_round_trips(tmp_path, recipe):
    """Rewritten through the public API, saved, loaded back: the same sites, weights and outputs
    (a dense model also at a larger, non-square size, where it gives a map of scores)."""
    options = RECIPES[recipe]
    new = convify.convify(reinit(tiny_net(), seed=4).eval(), torch.zeros(SHAPE), **options)
    out = convify.save(new, tmp_path / "c.pt", arch=TINY, check=False)
    keywords = {k: v for k, v in options.items() if k not in ("only", "skip")}
    want_passes = ck.plan_passes(keywords, SHAPE, only=options.get("only"), skip=options.get("skip"))
    assert torch.load(out, weights_only=True)["passes"] == [p.to_dict() for p in want_passes]
    back = convify.load(out, trust_code=True)
    rows = lambda m: ([(r.rewrite, r.name, r.new, r.exact) for r in convify.report(m).replaced],
                      [(s.name, s.reason) for s in convify.report(m).skipped])
    assert rows(back) == rows(new)
    want_sd, got_sd = new.state_dict(), back.state_dict()
    assert list(got_sd) == list(want_sd) and all(torch.equal(got_sd[k], v) for k, v in want_sd.items())
    sizes = [SHAPE[2:], (24, 32)] if options.get("dense") else [SHAPE[2:]]
    for size in sizes:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            want, got = new(x), back(x)
        assert got.shape == want.shape and rel_err(got, want) <= 1e-6
    if options.get("dense"):
        assert want.shape == (2, 10, 3, 5)


def test_save_refuses_a_recipe_that_does_not_rebuild(tmp_path, rewritten):
    _model, new, _options = rewritten
    with pytest.raises(CheckpointError, match="does not rebuild this model"):
        convify.save(new, tmp_path / "c.pt", arch=TINY, passes=ck.plan_passes({"head": None}, SHAPE))
    assert not (tmp_path / "c.pt").exists()


def test_chained_rewrites_round_trip(tmp_path):
    """A checkpoint rewritten again records both rewrites and rebuilds through both."""
    model = reinit(tiny_net(), seed=3).eval()
    first = convify.convify(model, torch.zeros(SHAPE), head=None)
    convify.save(first, tmp_path / "a.pt", arch=TINY)
    src = ck.open_model(tmp_path / "a.pt", trust_code=True)
    assert src.input_shape == SHAPE and [p.rewrite for p in ck.passes_of(src.model)] == ["maxpool"]
    second = convify.convify(src.model, torch.zeros(SHAPE), pool=None)
    convify.save(second, tmp_path / "b.pt", arch=TINY)
    raw = torch.load(tmp_path / "b.pt", weights_only=True)
    assert [p["rewrite"] for p in raw["passes"]] == ["maxpool", "head"]
    back = convify.load(tmp_path / "b.pt", trust_code=True)
    x = torch.randn(2, *SHAPE[1:])
    with torch.no_grad():
        assert rel_err(back(x), second(x)) <= 1e-6
        assert rel_err(back(x), model(x)) > 1e-3  # the pooling rewrite is not exact: compared for real
    assert not any(isinstance(m, (nn.MaxPool2d, nn.Linear)) for m in back.modules())


@pytest.mark.parametrize("mode", ["conv", "gap"])
def test_rebuild_dense_gives_the_dense_rewrite_with_the_same_weights(mode):
    """A head converted without dense, rebuilt dense: what convify(..., dense=True) makes of the same weights."""
    model = reinit(tiny_net(), seed=4).eval()
    flat = convify.convify(model, torch.zeros(SHAPE), head=mode)
    dense = ck.rebuild_dense(flat, TINY)
    want = convify.convify(model, torch.zeros(SHAPE), head=mode, dense=True)
    assert convify.report(dense).last.options["dense"] is True
    x = torch.randn(2, 3, 40, 28)
    with torch.no_grad():
        got, map_ = dense(x), want(x)
    assert got.dim() == 4 and got.shape[2:] != (1, 1)  # a map of scores, one per position
    assert got.shape == map_.shape and rel_err(got, map_) <= 1e-6
    assert ck.rebuild_dense(convify.convify(model, torch.zeros(SHAPE), head=None), TINY) is None


def test_load_refuses_a_plain_state_dict(tmp_path):
    torch.save(tiny_net().state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="not a convify checkpoint"):
        convify.load(tmp_path / "w.pt")


def test_load_refuses_weights_that_do_not_fit_the_recipe(tmp_path, rewritten):
    _model, new, options = rewritten
    out = convify.save(new, tmp_path / "c.pt", arch=TINY, check=False)
    raw = torch.load(out, weights_only=True)
    raw["arch_kwargs"] = {"num_classes": 3}
    torch.save(raw, out)
    with pytest.raises(CheckpointError, match="do not fit the model its recipe rebuilds"):
        convify.load(out, trust_code=True)


def test_checkpoint_zip_holds_no_code(tmp_path, rewritten):
    _model, new, options = rewritten
    out = convify.save(new, tmp_path / "c.pt", arch=TINY)
    with zipfile.ZipFile(out) as z:
        assert not any("/code/" in n for n in z.namelist())
    assert torch.serialization.get_unsafe_globals_in_checkpoint(out) == []


def test_a_checkpoint_written_by_0_1_0_still_loads(tmp_path, rewritten):
    """0.1.0 wrote one "rewrite" dict of convify() keywords (and earlier "before" steps)."""
    _model, new, _options = rewritten
    legacy = {"format": "convify", "version": "0.1.0", "arch": TINY, "arch_kwargs": {},
              "rewrite": {"pool": "conv", "head": "conv", "init": "kaiming", "dense": False, "only": None,
                          "skip": None},
              "before": [], "input_shape": list(SHAPE), "state_dict": new.state_dict()}
    torch.save(legacy, tmp_path / "old.pt")
    back = convify.load(tmp_path / "old.pt", trust_code=True)
    assert [p.rewrite for p in convify.report(back).passes] == ["maxpool", "head"]
    assert convify.report(back).passes[0].options == {"mode": "conv", "init": "kaiming"}
    x = torch.randn(3, *SHAPE[1:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(back(x), new(x)) <= 1e-6
    # "before" steps and "none": a pooling-only step, then a head-only step
    first = convify.convify(reinit(tiny_net(), seed=4).eval(), torch.zeros(SHAPE), head=None)
    second = convify.convify(first, torch.zeros(SHAPE), pool=None)
    legacy = {"format": "convify", "version": "0.1.0", "arch": TINY, "arch_kwargs": {},
              "rewrite": {"pool": "none", "head": "conv", "input_shape": list(SHAPE)},
              "before": [{"pool": "conv", "head": None, "input_shape": list(SHAPE)}],
              "input_shape": list(SHAPE), "state_dict": second.state_dict()}
    torch.save(legacy, tmp_path / "old2.pt")
    back = convify.load(tmp_path / "old2.pt", trust_code=True)
    with torch.no_grad():
        assert rel_err(back(x), second(x)) <= 1e-6


# --------------------------------------------------------------------------- the digest of the weights


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _payloads(path: Path) -> tuple[list[range], int, int]:
    """Where the tensors' bytes lie in a checkpoint (zip) file, and where its
    first and last tensor entries start and end."""
    data = path.read_bytes()
    ranges = []
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            if "/data/" not in info.filename or "/.data/" in info.filename:
                continue
            local = info.header_offset
            start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") \
                + int.from_bytes(data[local + 28:local + 30], "little")
            ranges.append(range(start, start + info.compress_size))
    return ranges, min(r.start for r in ranges), max(r.stop for r in ranges)


def test_checkpoint_records_the_digest_of_its_weights(tmp_path, rewritten):
    _model, new, _options = rewritten
    raw = torch.load(convify.save(new, tmp_path / "c.pt", arch=TINY), weights_only=True)
    assert raw["digest"]["algorithm"] == "sha256" and len(raw["digest"]["value"]) == 64
    assert raw["digest"] == weights_digest(new.state_dict())
    assert "digest" not in ck.recipe_of(raw) and "digest" not in ck.make_recipe(arch=TINY, passes=[])
    # a recipe carried over to other weights (as distill does) gets their digest, not the stale one
    other = reinit(copy.deepcopy(new), seed=9)
    moved = ck.to_checkpoint(other, raw)
    assert moved["digest"] == weights_digest(other.state_dict()) != raw["digest"]


def test_weights_digest_sees_each_change():
    base = {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.zeros(0),
            "b.weight": torch.ones(2, dtype=torch.bfloat16), "n": torch.tensor(3)}
    changed = {
        "a value": {**base, "a.weight": base["a.weight"] + torch.eye(2, 3) * 1e-6},
        "a shape": {**base, "a.weight": base["a.weight"].reshape(3, 2)},
        "a dtype": {**base, "a.weight": base["a.weight"].double()},
        "an empty shape": {**base, "a.bias": torch.zeros(0, 4)},
        "a bfloat16 value": {**base, "b.weight": torch.tensor([1.0, 1.0078125], dtype=torch.bfloat16)},
        "a key": {("c.weight" if k == "a.weight" else k): v for k, v in base.items()},
        "an entry less": {k: v for k, v in base.items() if k != "n"},
    }
    digest = weights_digest(base)["value"]
    assert weights_digest(dict(reversed(base.items())))["value"] == digest  # key order, not insertion order
    transposed = {k: v.t() if v.dim() == 2 else v for k, v in base.items()}
    assert weights_digest(transposed)["value"] != digest  # the values in order, not the storage
    assert weights_digest({**base, "a.weight": base["a.weight"].t().contiguous().t()})["value"] == digest
    for name, state_dict in changed.items():
        assert weights_digest(state_dict)["value"] != digest, name


def test_corrupt_checkpoint_is_refused_or_loads_the_same_weights(tmp_path, rewritten):
    """Bytes changed at seeded places in the header, the tensor data and the end of
    a checkpoint: each copy is refused with a CheckpointError, or (where the damage
    missed everything that is read) loads with the original's exact tensors."""
    _model, new, _options = rewritten
    path = convify.save(new, tmp_path / "c.pt", arch=TINY)
    data, want = path.read_bytes(), _weights(path)
    payloads, first, last = _payloads(path)
    rng = random.Random(13)
    positions = ([rng.randrange(0, first) for _ in range(10)] + [rng.randrange(first, last) for _ in range(10)]
                 + [rng.randrange(last, len(data)) for _ in range(10)])
    outcomes = {}
    for i, pos in enumerate(positions):
        damaged = bytearray(data)
        damaged[pos] ^= rng.randrange(1, 256)
        copy_path = tmp_path / f"damaged{i}.pt"
        copy_path.write_bytes(bytes(damaged))
        try:
            got = convify.load(copy_path, trust_code=True).state_dict()
        except CheckpointError as e:
            assert str(copy_path) in str(e) and "\n" not in str(e)
            outcomes[pos] = "refused"
            if any(pos in r for r in payloads):
                assert "do not match the digest in its recipe" in str(e)
            continue
        outcomes[pos] = "same"
        assert list(got) == list(want)
        assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in want.items())
        assert not any(pos in r for r in payloads), f"byte {pos} of the tensor data changed and was loaded"
    assert sum(any(p in r for r in payloads) for p in positions) >= 5  # the draw does reach the tensor data
    assert "refused" in outcomes.values()


@pytest.mark.parametrize("damage, match", [
    ("a tensor value", "the weights do not match the digest in its recipe"),
    ("a tensor shape", "the weights do not match the digest in its recipe"),
    ("no digest", r"its recipe has no digest of its weights, which every convify checkpoint of version '0\.2\.0'"),
    ("another algorithm", "the digest in its recipe is unreadable"),
])
def test_load_refuses_weights_that_do_not_match_the_digest(tmp_path, rewritten, damage, match):
    """Refused before the model is built: the import-path architecture is not even asked about."""
    _model, new, _options = rewritten
    out = convify.save(new, tmp_path / "c.pt", arch=TINY)
    raw = torch.load(out, weights_only=True)
    sd = raw["state_dict"]
    if damage == "a tensor value":
        sd["0.weight"][0, 0, 0, 0] += 1.0
    elif damage == "a tensor shape":
        sd["0.bias"] = sd["0.bias"].reshape(2, -1)
    elif damage == "no digest":
        del raw["digest"]
    else:
        raw["digest"]["algorithm"] = "md5"
    torch.save(raw, out)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(out))}: {match}"):
        convify.load(out)
    with pytest.raises(CheckpointError, match=match):
        ck.open_model(out, trust_code=True)


def test_a_checkpoint_written_by_0_2_0_still_loads():
    """tests/data/checkpoint_0.2.0.pt was written by 0.2.0's command line (main at 86e914d):
    ``convify rewrite --arch cli_factories:tiny_net --input-shape 1,3,16,16 --pool fold --head gap_mlp --dense``;
    checkpoint_0.2.0.io.pt holds an input of another size and what 0.2.0 loaded it to compute."""
    data = Path(__file__).parent / "data"
    back = convify.load(data / "checkpoint_0.2.0.pt", trust_code=True)
    saved = torch.load(data / "checkpoint_0.2.0.io.pt", weights_only=True)
    with torch.no_grad():
        assert torch.allclose(back(saved["input"]), saved["output"], rtol=1e-5, atol=1e-6)
    rep = convify.report(back)
    assert [(p.rewrite, p.options) for p in rep.passes] == [("maxpool", {"mode": "fold", "init": "avg"}),
                                                            ("head", {"mode": "gap_mlp", "dense": True})]
    assert [r.detail.mode for r in rep.passes[0].replaced] == ["fold", "fold"]
