"""calibration="synthetic": inputs made to match a model's BatchNorm statistics."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import convify
from convify.errors import UsageError
from convify.recovery.synthetic import SynthesisOptions, synthesize, synthetic_calibration

from conftest import reinit

SMALL = SynthesisOptions(count=32, batch_size=16, steps=60)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.b1(self.c1(x))))
        return self.head(torch.relu(self.b2(self.c2(x))).mean((2, 3)))


def _stat_gap(model: nn.Module, x: torch.Tensor) -> float:
    """Summed distance between the BatchNorms' input statistics on ``x`` and their running statistics."""
    gaps: list[float] = []

    def hook(bn: nn.Module, args: tuple) -> None:
        a = args[0]
        gaps.append(float((a.mean((0, 2, 3)) - bn.running_mean).norm()
                          + (a.var((0, 2, 3), unbiased=False).sqrt() - bn.running_var.sqrt()).norm()))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return sum(gaps)


def test_synthesized_inputs_match_the_batchnorm_statistics_far_better_than_noise() -> None:
    model = reinit(BNNet(), seed=2).eval()
    batches = synthesize(model, (3, 12, 12), SMALL)
    assert [tuple(b.shape) for b in batches] == [(16, 3, 12, 12), (16, 3, 12, 12)]
    noise = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    assert _stat_gap(model, torch.cat(batches)) < 0.5 * _stat_gap(model, noise)
    assert all(p.requires_grad for p in model.parameters()) and not model.training


def test_synthesis_is_deterministic_and_cached_until_the_weights_change() -> None:
    model = reinit(BNNet(), seed=2).eval()
    first = synthetic_calibration(model, "synthetic", (1, 3, 12, 12), "t", SMALL)
    assert synthetic_calibration(model, "synthetic", (1, 3, 12, 12), "t", SMALL) is first
    again = synthesize(reinit(BNNet(), seed=2).eval(), (3, 12, 12), SMALL)
    torch.testing.assert_close(torch.cat(again), torch.cat(first))
    with torch.no_grad():
        model.b1.running_mean.add_(0.5)
    changed = synthetic_calibration(model, "synthetic", (1, 3, 12, 12), "t", SMALL)
    assert changed is not first and not torch.allclose(torch.cat(changed), torch.cat(first))


def test_replace_maxpool_fits_on_synthetic_calibration(monkeypatch) -> None:
    import convify.recovery.synthetic as S

    monkeypatch.setattr(S, "SynthesisOptions", lambda: SMALL)
    model = reinit(BNNet(), seed=2).eval()
    x = torch.zeros(1, 3, 12, 12)
    fitted = convify.replace_maxpool(model, x, init="fit", calibration="synthetic")
    row = convify.report(fitted).replaced[0]
    assert row.fit is not None and row.fit.samples == 32
    assert row.fit.error_after < row.fit.error_before
    convify.reconstruct(model, fitted, "synthetic", steps=5, progress=False)
    assert convify.report(fitted).replaced[0].reconstruction.samples == 32


def test_synthetic_needs_batchnorm_and_the_right_word() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Flatten())
    with pytest.raises(UsageError, match="needs BatchNorm layers with running statistics"):
        convify.replace_maxpool(plain, torch.zeros(1, 3, 8, 8), init="fit", calibration="synthetic")
    with pytest.raises(UsageError, match="calibration='synth'"):
        synthetic_calibration(BNNet(), "synth", (1, 3, 8, 8), "replace_maxpool")
