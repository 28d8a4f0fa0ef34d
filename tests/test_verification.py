"""convify.verify: export fidelity in onnxruntime, equivalence with the
original, the ONNX op census, and providers that are never silently swapped."""
from __future__ import annotations

import copy

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convify
import convify.api
import convify.export.verify as V
from convify.core.report import Pass, Replaced, Report, attach
from convify.demo.printing import demo_verify
from convify.errors import VerificationError

from conftest import reinit
from zoo import MAXPOOL_ZOO, build

HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_HEAD = hasattr(convify.api, "replace_linear_head")
needs_head = pytest.mark.skipif(not HAS_HEAD, reason="convify.replace_linear_head is not there yet")


class TinyNet(nn.Module):
    """conv -> max pool -> conv -> 4x4 average pool -> flatten -> Linear (a flatten head:
    replace_linear_head makes it a 4x4 convolution). No ceil_mode here: the legacy
    exporter cannot size an adaptive pooling behind its F.pad (test_onnx covers ceil_mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(self.pool(F.relu(self.conv1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 4), 1))


class DiffersInExport(TinyNet):
    """Computes something else while being exported: export fidelity must catch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if torch.onnx.is_in_onnx_export():
            out = out + 1.0
        return out


X = torch.randn(1, 3, 16, 16)


def tiny(cls: type[nn.Module] = TinyNet, seed: int = 0) -> nn.Module:
    return reinit(cls(), seed).eval()


def exact_copy_claiming(model: nn.Module, rewrite: str = "noop") -> nn.Module:
    """A copy of ``model`` whose report says an exact ``rewrite`` was applied."""
    twin = copy.deepcopy(model)
    row = Replaced(rewrite, "pool", "MaxPool2d", "Conv2d", (1, 8, 16, 16), (1, 8, 8, 8), exact=True)
    attach(twin, Report((Pass(rewrite, replaced=(row,)),)))
    return twin


# --------------------------------------------------------------------------- the three checks


def test_maxpool_rewrite_passes_with_equivalence_not_judged():
    model = tiny()
    rewritten = convify.replace_maxpool(model, X)
    v = convify.verify(model, rewritten, X, exporter="legacy")
    assert v.passed
    assert v.fidelity.passed and v.fidelity.rel <= 1e-5
    assert not v.equivalence.exact and v.equivalence.passed is None
    assert v.equivalence.top1_agreement is not None and v.equivalence.cosine is not None
    assert v.equivalence.max_abs > 0, "avg-initialized pooling cannot equal max pooling"
    assert v.census_original["MaxPool"] == 1 and "MaxPool" not in v.census_rewritten
    assert v.census_rewritten["Conv"] == v.census_original["Conv"] + 1
    assert v.session_providers[0] == "CPUExecutionProvider" and v.provider == "CPUExecutionProvider"
    assert v.input_shapes == ((8, 3, 16, 16),)
    text = str(v)
    for needle in ("PASSED", "export fidelity", "not judged", "equivalence not judged", "MaxPool", "census",
                   "CPUExecutionProvider", "legacy exporter", "rel <= 1e-04"):
        assert needle in text, needle


def test_min_agreement_judges_an_approximate_rewrite():
    """Thresholds on both sides of the measured agreement: met exactly, missed by 1%."""
    model = tiny()
    rewritten = convify.replace_maxpool(model, X)
    measured = convify.verify(model, rewritten, X, exporter="legacy").equivalence.top1_agreement
    assert 0.5 <= measured < 0.99, f"top-1 agreement {measured}: both thresholds below must be reachable"
    met = convify.verify(model, rewritten, X, exporter="legacy", min_agreement=measured)
    assert met.passed and met.equivalence.passed is True
    assert met.equivalence.top1_agreement == measured
    assert "equivalence not judged" not in str(met) and f"top-1 agree >= {measured:.1%}" in str(met)
    missed = convify.verify(model, rewritten, X, exporter="legacy", min_agreement=measured + 0.01)
    assert not missed.passed and missed.equivalence.passed is False
    assert "FAILED" in str(missed) and f"top-1 agree >= {measured + 0.01:.1%}" in str(missed)


def test_an_exact_rewrite_must_agree_within_tolerance():
    model = tiny()
    good = exact_copy_claiming(model)
    v = convify.verify(model, good, X, exporter="legacy")
    assert v.passed and v.equivalence.exact and v.equivalence.passed and v.equivalence.rel == 0
    bad = exact_copy_claiming(model)
    with torch.no_grad():
        bad.fc.bias.add_(0.5)
    v = convify.verify(model, bad, X, exporter="legacy")
    assert not v.passed and v.equivalence.passed is False and v.fidelity.passed
    assert "equivalence (exact rewrite)" in str(v) and "FAIL" in str(v)


def test_tolerances_are_the_callers_to_set():
    model = tiny()
    bad = exact_copy_claiming(model)
    with torch.no_grad():
        bad.fc.bias.add_(1e-3)
    assert not convify.verify(model, bad, X, exporter="legacy").passed
    v = convify.verify(model, bad, X, exporter="legacy", atol=1e-2)
    assert v.passed and "abs <= 1e-02" in str(v)


def test_export_fidelity_catches_a_graph_that_computes_something_else():
    model = tiny(DiffersInExport)
    v = convify.verify(model, model, X, exporter="legacy")
    assert not v.passed and not v.fidelity.passed and v.fidelity.max_abs == pytest.approx(1.0, rel=1e-4)


def test_census_catches_a_maxpool_that_is_still_there():
    model = tiny()
    liar = exact_copy_claiming(model, "maxpool")  # claims a max pooling was replaced; the graph still has it
    v = convify.verify(model, liar, X, exporter="legacy")
    assert not v.passed and [c.passed for c in v.checks] == [False, True]
    assert "census: MaxPool" in str(v) and "1 -> 1" in str(v)


class MaxInDisguise(nn.Module):
    """2x2/2 max pooling from slices and ``torch.maximum``: no MaxPool node, but Max ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def test_census_catches_a_max_pooling_replaced_by_max_ops():
    model = tiny()
    liar = exact_copy_claiming(model, "maxpool")
    liar.pool = MaxInDisguise()
    v = convify.verify(model, liar, X, exporter="legacy")
    assert v.census_rewritten.get("MaxPool", 0) == 0 and v.census_rewritten["Max"] == 2
    assert v.equivalence.passed  # it computes the same numbers: only the census catches it
    assert not v.passed and [c.passed for c in v.checks] == [True, False]
    assert "census: Max+ReduceMax+TopK+ArgMax" in str(v)


def test_user_inputs_are_used_as_given():
    model = tiny()
    rewritten = convify.replace_maxpool(model, X)
    batch = torch.randn(3, 3, 16, 16)
    v = convify.verify(model, rewritten, inputs=batch, exporter="legacy")
    assert v.input_shapes == ((3, 3, 16, 16),) and v.passed


def test_a_list_of_batches_is_measured_together():
    """inputs= as several batches: run one by one, judged on the agreement over all their samples (not on
    8 random inputs), exported with the example input; the result says how many inputs and where from."""
    from convify.core.metrics import top1_agreement

    model = tiny()
    rewritten = convify.replace_maxpool(model, X)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 3, 16, 16, generator=g) for n in (16, 16, 5)]
    with torch.no_grad():
        want = top1_agreement(rewritten(torch.cat(batches)), model(torch.cat(batches)))
    assert 0.5 <= want < 1.0, f"top-1 agreement {want}: both thresholds below must be reachable"
    v = convify.verify(model, rewritten, X, inputs=batches, exporter="legacy", min_agreement=want)
    assert v.passed and v.equivalence.top1_agreement == pytest.approx(want), str(v)
    assert v.input_shapes == ((37, 3, 16, 16),) and v.input_count == 37 and v.inputs_source == "given"
    assert v.to_dict()["inputs"] == {"source": "given", "count": 37}
    assert "inputs 37x3x16x16, given" in str(v)
    missed = convify.verify(model, rewritten, X, inputs=batches, exporter="legacy", min_agreement=want + 1 / 37)
    assert not missed.passed and missed.equivalence.passed is False
    default = convify.verify(model, rewritten, X, exporter="legacy")
    assert default.input_count == 8 and default.inputs_source == "seeded random"


@pytest.mark.parametrize("inputs, match", [
    ([], "inputs holds no batch"),
    ([torch.randn(2, 3, 16, 16), "image.png"], "each batch of inputs must be a tensor"),
    (3, "inputs must be a tensor, a tuple of tensors or a list"),
])
def test_inputs_that_are_not_batches_are_refused(inputs, match):
    model = tiny()
    with pytest.raises(VerificationError, match=match):
        convify.verify(model, convify.replace_maxpool(model, X), X, inputs=inputs, exporter="legacy")


def test_onnx_path_keeps_the_exported_model(tmp_path):
    model = tiny()
    v = convify.verify(model, convify.replace_maxpool(model, X), X, exporter="legacy",
                       onnx_path=tmp_path / "kept.onnx")
    assert v.onnx_path == tmp_path / "kept.onnx" and v.onnx_path.exists()
    assert v.to_dict()["onnx_path"].endswith("kept.onnx")


def test_each_original_is_exported_once(monkeypatch):
    calls: list[str] = []
    real = V.export

    def counting(model, path, *args, **kwargs):
        calls.append(path.name)
        return real(model, path, *args, **kwargs)

    monkeypatch.setattr(V, "export", counting)
    model = tiny(seed=3)
    for mode in ("conv", "depthwise"):
        assert convify.verify(model, convify.replace_maxpool(model, X, mode=mode), X, exporter="legacy").passed
    assert calls.count("original.onnx") == 1 and calls.count("rewritten.onnx") == 2
    with torch.no_grad():  # new weights: a new export
        model.conv1.weight.mul_(2)
    convify.verify(model, convify.replace_maxpool(model, X), X, exporter="legacy")
    assert calls.count("original.onnx") == 2


def test_to_dict_is_json_ready():
    import json

    model = tiny()
    v = convify.verify(model, convify.replace_maxpool(model, X), X, exporter="legacy")
    d = json.loads(json.dumps(v.to_dict()))
    assert d["passed"] is True and d["census"]["original"]["MaxPool"] == 1 and d["equivalence"]["passed"] is None


def test_demo_verify_exports_and_prints_the_table(tmp_path):
    lines: list[str] = []
    model = tiny()
    v = demo_verify(model, convify.replace_maxpool(model, X), X, path=tmp_path / "demo.onnx", exporter="legacy",
                    echo=lines.append)
    assert v.passed and (tmp_path / "demo.onnx").exists()
    assert "exported" in lines[0] and "weights embedded" in lines[0] and "ONNX op census" in lines[1]


# --------------------------------------------------------------------------- providers


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime has CUDA")
def test_cuda_without_onnxruntime_gpu_is_a_clear_error():
    model = tiny()
    with pytest.raises(VerificationError, match=r"CUDAExecutionProvider.*pip uninstall onnxruntime && pip install "
                                                r"onnxruntime-gpu"):
        convify.verify(model, model, X, provider="cuda", exporter="legacy")


def test_a_silent_cpu_fallback_is_refused(monkeypatch):
    """onnxruntime drops a provider it cannot start and runs on the CPU: this
    onnxruntime is told it has CUDA, the session then runs without it."""
    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *available])
    real_session = ort.InferenceSession

    class CpuOnlySession(real_session):  # what onnxruntime-gpu does without a usable GPU
        def __init__(self, path, sess_options=None, providers=None, **kwargs):
            super().__init__(path, sess_options=sess_options, providers=["CPUExecutionProvider"], **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", CpuOnlySession)
    model = tiny()
    with pytest.raises(VerificationError, match="asked for CUDAExecutionProvider but the session runs on "
                                                "CPUExecutionProvider"):
        convify.verify(model, model, X, provider="cuda", exporter="legacy")


def test_unknown_provider_is_a_clear_error():
    with pytest.raises(VerificationError, match="provider must be 'cpu' or 'cuda', not 'tpu'"):
        convify.verify(tiny(), tiny(), X, provider="tpu")


def test_non_module_is_a_clear_error():
    with pytest.raises(VerificationError, match="rewritten must be a torch.nn.Module"):
        convify.verify(tiny(), "model.pt", X)
    with pytest.raises(VerificationError, match="example_input and onnx_path apply to PyTorch models only"):
        convify.verify(tiny(), "model.onnx", X)  # an ONNX side: both run in onnxruntime, at inputs= sizes


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EP or not torch.cuda.is_available(), reason="needs onnxruntime-gpu and a GPU")
def test_cuda_provider_runs_on_cuda():
    model = build("resnet18")
    x = torch.randn(1, 3, 64, 64)
    v = convify.verify(model, convify.replace_maxpool(model, x), x, provider="cuda", exporter="legacy")
    assert v.passed and v.session_providers[0] == "CUDAExecutionProvider"
    assert "CUDAExecutionProvider" in str(v)


# --------------------------------------------------------------------------- torchvision


# (model, maxpool mode, exporter): the legacy exporter for breadth, dynamo on
# two; the slow ones (about 15 s each on 2 busy cores) behind the mark.
ZOO_CASES = [
    ("squeezenet1_1", "depthwise", "dynamo"),
    ("resnet18", "fold", "legacy"),
    ("shufflenet_v2_x0_5", "conv", "legacy"),
    pytest.param("inception_v3", "conv", "legacy", marks=pytest.mark.slow),
    pytest.param("resnet18", "conv", "dynamo", marks=pytest.mark.slow),
]


def zoo_inputs(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The example, and a batch of 4 (the default 8 is covered on TinyNet)."""
    return torch.randn(1, 3, size, size), torch.randn(4, 3, size, size)


@pytest.mark.parametrize("name,mode,exporter", ZOO_CASES)
def test_maxpool_zoo_verifies_in_onnxruntime(name, mode, exporter):
    size, kwargs = MAXPOOL_ZOO[name]
    model = build(name, **kwargs)
    x, batch = zoo_inputs(size)
    rewritten = convify.replace_maxpool(model, x, mode=mode)
    v = convify.verify(model, rewritten, x, inputs=batch, exporter=exporter)
    assert v.passed, str(v)
    assert v.exporter == exporter and v.exporter_fallback is None
    assert v.census_original.get("MaxPool", 0) > 0 and v.census_rewritten.get("MaxPool", 0) == 0
    assert v.fidelity.rel <= 1e-5


# --------------------------------------------------------------------------- heads


@needs_head
def test_conv_head_is_exact_and_leaves_no_gemm():
    model = tiny()
    rewritten = convify.replace_linear_head(model, X)
    v = convify.verify(model, rewritten, X, exporter="legacy")
    assert v.passed and v.equivalence.exact and v.equivalence.passed, str(v)
    assert v.census_original["Gemm"] == 1
    assert v.census_rewritten.get("Gemm", 0) + v.census_rewritten.get("MatMul", 0) == 0
    assert "census: Gemm+MatMul" in str(v)


@needs_head
def test_a_dense_head_is_compared_through_its_mean_over_positions():
    model = tiny()
    dense = convify.replace_linear_head(model, X, dense=True)
    v = convify.verify(model, dense, X, exporter="legacy", min_agreement=1.0)
    assert v.passed and v.equivalence.rel <= 1e-5, str(v)
    assert "averaged over its positions" in str(v)


@needs_head
def test_census_catches_a_head_gemm_that_is_still_there():
    model = tiny()
    liar = exact_copy_claiming(model, "head")
    v = convify.verify(model, liar, X, exporter="legacy")
    assert not v.passed and "census: Gemm+MatMul" in str(v)


@needs_head
@pytest.mark.parametrize("name,size,exporter", [
    ("resnet18", 64, "legacy"),
    ("mobilenet_v3_small", 64, "legacy"),
    pytest.param("alexnet", 224, "legacy", marks=pytest.mark.slow),  # flatten head: 6x6 conv, 230 MB
])
def test_both_rewrites_on_the_zoo(name, size, exporter):
    model = build(name)
    x, batch = zoo_inputs(size)
    allconv = convify.convify(model, x)
    v = convify.verify(model, allconv, x, inputs=batch, exporter=exporter)
    assert v.passed, str(v)
    assert v.census_rewritten.get("MaxPool", 0) == 0
    assert v.census_rewritten.get("Gemm", 0) + v.census_rewritten.get("MatMul", 0) == 0
    assert v.census_original.get("Gemm", 0) > 0


def small_convnext() -> nn.Module:
    """torchvision's ConvNeXt with two one-block stages: 4 block Linears and the head."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    return reinit(ConvNeXt([CNBlockConfig(16, 32, 1), CNBlockConfig(32, None, 1)], num_classes=10)).eval()


@needs_head
@pytest.mark.parametrize("which", ["small", pytest.param("convnext_tiny", marks=pytest.mark.slow)])
def test_convnext_keeps_its_block_linears(which):
    """Only the head's Gemm goes; the block Linears (MatMul) stay: 36 in convnext_tiny."""
    from torchvision.models import convnext_tiny

    model = small_convnext() if which == "small" else reinit(convnext_tiny()).eval()
    blocks = 4 if which == "small" else 36
    x, batch = zoo_inputs(32)
    rewritten = convify.replace_linear_head(model, x)
    v = convify.verify(model, rewritten, x, inputs=batch, exporter="legacy")
    assert v.passed and v.equivalence.exact, str(v)
    assert v.census_original.get("Gemm", 0) + v.census_original.get("MatMul", 0) == blocks + 1
    assert v.census_rewritten.get("Gemm", 0) + v.census_rewritten.get("MatMul", 0) == blocks
