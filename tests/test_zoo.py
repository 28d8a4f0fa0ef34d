"""convify.zoo: Model C as each script builds it, the MAC counter against hand counts, the IDX reader."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from convify.errors import DataError, UsageError
from convify.zoo import count_macs, fashion_mnist, model_c, read_idx

# (kwargs, input shape, parameters): the demo's, the example's and the recovery benchmark's Model C.
# 102,826 is Model C's parameter count in examples/all_cnn_fashion_mnist.md once its converged run is committed
# (the table committed now is the earlier width-8 one, with the redundant conv bias: 6,770).
MODEL_C = {
    "demo": ({}, (2, 3, 32, 32), 107_306),
    "example": ({"width": 32, "in_channels": 1, "batch_norm": True, "hidden_1x1": False}, (2, 1, 28, 28), 102_826),
    "recovery": ({"width": 16, "in_channels": 1, "batch_norm": True, "hidden_1x1": False}, (2, 1, 28, 28), 26_074),
}


@pytest.mark.parametrize("name", MODEL_C)
def test_model_c_builds_and_runs_at_its_size(name: str) -> None:
    kwargs, shape, parameters = MODEL_C[name]
    model = model_c(**kwargs).eval()
    with torch.no_grad():
        out = model(torch.randn(shape))
    assert out.shape == (shape[0], 10)
    assert sum(p.numel() for p in model.parameters()) == parameters
    kinds = [type(m) for m in model.features]
    assert kinds.count(nn.MaxPool2d) == 2
    assert (nn.BatchNorm2d in kinds) == kwargs.get("batch_norm", False)


def test_model_c_keeps_the_recovery_benchmarks_state_dict_keys() -> None:
    """The benchmark caches the trained original's state_dict: its keys must not move."""
    keys = list(model_c(16, in_channels=1, batch_norm=True, hidden_1x1=False).state_dict())
    assert keys[:6] == ["features.0.weight", "features.1.weight", "features.1.bias", "features.1.running_mean",
                        "features.1.running_var", "features.1.num_batches_tracked"]
    assert keys[-2:] == ["classifier.weight", "classifier.bias"]
    assert sum(k.endswith(".weight") and k.startswith("features.") for k in keys) == 10  # 5 convs, 5 BatchNorms


def test_model_c_is_reproducible_under_a_seed() -> None:
    torch.manual_seed(3)
    a = model_c(4)
    torch.manual_seed(3)
    b = model_c(4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class Tiny(nn.Module):
    """A grouped conv, BatchNorm, pooling and a Linear; the depthwise conv is called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.grouped = nn.Conv2d(4, 6, 3, groups=2)   # (N, 6, 4, 4) from (N, 4, 6, 6)
        self.bn = nn.BatchNorm2d(6)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.grouped(x)).relu()
        x = self.depthwise(self.depthwise(x)) + x
        return self.fc(F.max_pool2d(x, 2).flatten(1))


def test_count_macs_matches_a_hand_count() -> None:
    x = torch.randn(2, 4, 6, 6)
    grouped = 2 * 6 * 4 * 4 * (4 // 2) * 3 * 3     # output elements x in/groups x taps
    depthwise = 2 * (2 * 6 * 4 * 4 * 1 * 3 * 3)    # called twice
    linear = 2 * 5 * 24                            # output elements x in_features
    assert count_macs(Tiny(), x) == grouped + depthwise + linear == 3456 + 2 * 1728 + 240


@pytest.mark.parametrize("module, shape, macs", [
    (nn.Conv1d(2, 3, 5), (1, 2, 10), 3 * 6 * 2 * 5),
    (nn.Conv3d(1, 2, 2), (1, 1, 3, 3, 3), 2 * 8 * 1 * 8),
    (nn.ConvTranspose2d(4, 6, 3, groups=2), (1, 4, 5, 5), 4 * 25 * (6 // 2) * 9),  # input elements x out/groups x taps
    (nn.Linear(4, 3), (2, 5, 4), 2 * 5 * 3 * 4),
    (nn.Sequential(nn.AvgPool2d(2), nn.BatchNorm2d(3), nn.ReLU()), (1, 3, 4, 4), 0),
])
def test_count_macs_per_layer_type(module: nn.Module, shape: tuple[int, ...], macs: int) -> None:
    assert count_macs(module, torch.randn(shape)) == macs


def test_count_macs_leaves_modes_and_batchnorm_statistics_alone() -> None:
    model = Tiny().train()
    model.bn.eval()  # a frozen BatchNorm in a training model stays frozen, and the rest stays in training
    model.bn.running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, torch.randn(2, 4, 6, 6))
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    model.bn.train()
    count_macs(model, torch.randn(2, 4, 6, 6))
    assert model.bn.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def write_idx(path: Path, data: torch.Tensor, dtype: int = 0x08) -> None:
    raw = struct.pack(">BBBB", 0, 0, dtype, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    raw += data.numpy().tobytes()
    (gzip.open if path.suffix == ".gz" else open)(path, "wb").write(raw)


@pytest.mark.parametrize("name", ["data-idx3-ubyte", "data-idx3-ubyte.gz"])
def test_read_idx_round_trips(tmp_path: Path, name: str) -> None:
    data = torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    write_idx(tmp_path / name, data)
    back = read_idx(tmp_path / name)
    assert back.dtype == torch.uint8
    assert torch.equal(back, data)


def test_read_idx_rejects_other_types_and_short_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "floats", torch.zeros(2, 3, dtype=torch.uint8), dtype=0x0D)
    with pytest.raises(DataError, match=r"floats: IDX data type 0x0d, expected unsigned bytes"):
        read_idx(tmp_path / "floats")
    write_idx(tmp_path / "short", torch.zeros(2, 3, dtype=torch.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(DataError, match=r"short: 5 bytes of data, but the header declares shape \(2, 3\)"):
        read_idx(tmp_path / "short")


def test_fashion_mnist_reads_a_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.tensor([9, 0, 4], dtype=torch.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)  # plain files are read too
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path))
    x, y = fashion_mnist("test")
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(x, images.unsqueeze(1).float() / 255)
    assert y.dtype == torch.int64 and y.tolist() == [9, 0, 4]
    with pytest.raises(DataError, match=r"no train-images-idx3-ubyte\(\.gz\) under .*dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)
    with pytest.raises(UsageError, match="expected 'train' or 'test'"):
        fashion_mnist("t10k")
