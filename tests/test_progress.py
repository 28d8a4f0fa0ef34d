"""Progress bars: drawn on a terminal's stderr, absent from logs and pipes; the same results either way."""
from __future__ import annotations

import io
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

import convify
from convify.progress import terminal_bar

from conftest import reinit


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _net() -> nn.Module:
    return reinit(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Conv2d(4, 3, 3, padding=1)), 0).eval()


def test_no_bar_off_a_terminal_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with terminal_bar(total=2) as bar:
        assert bar is None
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with terminal_bar(False, total=2) as bar:
        assert bar is None
    with terminal_bar(total=2, desc="convify: work") as bar:
        bar.update(2)
    assert "convify: work" in sys.stderr.getvalue()


def _runs(terminal: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[str, list[torch.Tensor]]:
    stderr = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    original = _net()
    images = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    rewritten = convify.replace_maxpool(original, images[:1], init="fit", calibration=[images])
    convify.reconstruct(original, rewritten, [images], steps=5)
    convify.distill(original, rewritten, TensorDataset(images), epochs=1, batch_size=8, device="cpu")
    score_map = convify.dense_map(rewritten.eval(), torch.randn(1, 40, 40), tile=16)
    return stderr.getvalue(), [*(p.detach().clone() for p in rewritten.parameters()), score_map]


def test_reconstruct_distill_and_dense_map_draw_bars_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    shown, on_terminal = _runs(True, monkeypatch)
    for words in ("reconstruct", "distill 1/1", "dense_map"):
        assert words in shown, (words, shown)
    quiet, in_a_log = _runs(False, monkeypatch)
    assert quiet == ""
    for a, b in zip(on_terminal, in_a_log):
        torch.testing.assert_close(a, b)
