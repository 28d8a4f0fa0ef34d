"""convify.reconstruct: block reconstruction toward the original's activations, BatchNorm re-estimation."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import convify
from convify.core.report import Reconstruction
from convify.core.rewrites.maxpool import PoolRecord
from convify.errors import ExampleInputError, UsageError

from conftest import reinit


class BNNet(nn.Module):
    """Two pooling sites with BatchNorms between them, one BatchNorm before the first site."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(8)
        self.p1 = nn.MaxPool2d(3, 2, 1)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(12)
        self.p2 = nn.MaxPool2d(2, ceil_mode=True)
        self.c3 = nn.Conv2d(12, 16, 3, padding=1, bias=False)
        self.b3 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.p1(torch.relu(self.b1(self.c1(x))))
        x = self.p2(torch.relu(self.b2(self.c2(x))))
        x = torch.relu(self.b3(self.c3(x)))
        return self.head(x.mean((2, 3)))


def _batches(seed: int, n: int = 4, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 15, 15, generator=g) for _ in range(n)]


def _model() -> nn.Module:
    return reinit(BNNet(), seed=3).eval()


def _rewritten(model: nn.Module, batches: list[torch.Tensor], init: str = "fit") -> nn.Module:
    return convify.replace_maxpool(model, batches[0][:1], init=init,
                                   calibration=batches if init == "fit" else None)


def test_reconstruct_lowers_every_sites_error_and_reports_it() -> None:
    model, batches = _model(), _batches(0)
    rewritten = _rewritten(model, batches)
    assert convify.reconstruct(model, rewritten, batches, steps=200, lr=3e-3, progress=False) is rewritten
    rows = {r.name: r.reconstruction for r in convify.report(rewritten).replaced}
    assert set(rows) == {"p1", "p2"}
    for name, rec in rows.items():
        assert isinstance(rec, Reconstruction), name
        assert rec.error_after < 0.98 * rec.error_before, (name, rec)
        assert rec.steps == 200 and rec.samples == 64 and not rec.reverted
    assert rows["p1"].toward == rows["p2"].toward == "the original's output of b3"  # the last spatial map
    assert set(rows["p1"].trained) == {"p1", "c2", "b2", "p2", "c3", "b3"}
    assert set(rows["p2"].trained) == {"p2", "c3", "b3"}  # the head reads b3 through relu and a mean
    assert rows["p1"].batchnorms == ("b2", "b3") and rows["p2"].batchnorms == ("b3",)
    text = str(convify.report(rewritten))
    assert "p1: reconstructed: error" in text and "200 Adam steps" in text


def test_reconstruct_leaves_the_original_and_upstream_layers_alone() -> None:
    model, batches = _model(), _batches(0)
    original_state = {k: v.clone() for k, v in model.state_dict().items()}
    rewritten = _rewritten(model, batches)
    upstream = {k: v.clone() for k, v in rewritten.state_dict().items() if k.startswith(("c1.", "b1."))}
    convify.reconstruct(model, rewritten, batches, steps=20, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, original_state[k]), k
    for k, v in upstream.items():
        assert torch.equal(rewritten.state_dict()[k], v), k  # before the first site: nothing drifted
    assert all(p.requires_grad for p in rewritten.parameters())  # flags restored
    assert not rewritten.training  # the mode it came in


def _bn_inputs(model: nn.Module, name: str, batches: list[torch.Tensor]) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, a: seen.append(a[0]) and None)
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    return torch.cat(seen).transpose(0, 1).reshape(seen[0].shape[1], -1).double()


def test_batchnorm_statistics_are_reestimated_for_the_drift_the_rewrite_caused() -> None:
    model, batches = _model(), _batches(0)
    rewritten = _rewritten(model, batches, init="avg")  # avg init: a large drift at b2 and b3
    before = {k: v.clone() for k, v in rewritten.state_dict().items() if "running" in k}
    convify.reconstruct(model, rewritten, batches, steps=0, progress=False)
    after = rewritten.state_dict()
    assert torch.equal(after["b1.running_mean"], before["b1.running_mean"])  # upstream of every site
    for bn in ("b2", "b3"):
        assert not torch.allclose(after[f"{bn}.running_mean"], before[f"{bn}.running_mean"]), bn
    # b2 now normalizes its drifted input r as the original normalized the least-squares estimate a*r+b of its
    # own input o: per channel, the normalized values agree as well as any affine map of r can make them
    o, r = _bn_inputs(model, "b2", batches), _bn_inputs(rewritten, "b2", batches)
    bn_o, bn_r = model.b2, rewritten.get_submodule("b2")
    norm_o = (o - bn_o.running_mean.double()[:, None]) / (bn_o.running_var.double()[:, None] + bn_o.eps).sqrt()
    norm_r = (r - bn_r.running_mean.double()[:, None]) / (bn_r.running_var.double()[:, None] + bn_r.eps).sqrt()
    error = (norm_r - norm_o).pow(2).mean(1)
    design = torch.stack([r, torch.ones_like(r)], -1)  # (C, M, 2)
    best = torch.linalg.lstsq(design, norm_o.unsqueeze(-1)).solution
    floor = (design @ best - norm_o.unsqueeze(-1)).squeeze(-1).pow(2).mean(1)
    torch.testing.assert_close(error, floor, atol=1e-6, rtol=1e-4)
    old = (r - bn_o.running_mean.double()[:, None]) / (bn_o.running_var.double()[:, None] + bn_o.eps).sqrt()
    assert float(error.sum()) < float((old - norm_o).pow(2).mean(1).sum())  # better than keeping the statistics
    rows = {r.name: r.reconstruction for r in convify.report(rewritten).replaced}
    assert rows["p1"].steps == 0 and rows["p1"].batchnorms == ("b2", "b3")
    assert rows["p1"].error_reestimated < rows["p1"].error_before


def test_a_batchnorm_whose_input_did_not_change_keeps_its_statistics() -> None:
    class Branch(nn.Module):  # b_side reads the input, not the pooling: the rewrite does not change it
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.side = nn.Conv2d(3, 4, 2, stride=2)
            self.b_side = nn.BatchNorm2d(4)
            self.b_main = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.b_main(self.pool(torch.relu(self.c(x)))) + self.b_side(self.side(x))).mean((2, 3))

    model = reinit(Branch(), seed=1).eval()
    batches = [torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    rewritten = convify.replace_maxpool(model, batches[0][:1])
    convify.reconstruct(model, rewritten, batches, steps=0, progress=False)
    torch.testing.assert_close(rewritten.get_submodule("b_side").running_mean, model.b_side.running_mean)
    torch.testing.assert_close(rewritten.get_submodule("b_side").running_var, model.b_side.running_var)
    assert not torch.allclose(rewritten.get_submodule("b_main").running_mean, model.b_main.running_mean)


def test_training_that_makes_a_block_worse_is_undone() -> None:
    model, batches = _model(), _batches(0)
    rewritten = _rewritten(model, batches)
    reference = _rewritten(model, batches)
    convify.reconstruct(model, reference, batches, steps=0, progress=False)
    convify.reconstruct(model, rewritten, batches, steps=5, lr=10.0, progress=False)  # diverges
    rows = [r.reconstruction for r in convify.report(rewritten).replaced]
    assert all(r.reverted for r in rows)
    for r in rows:
        assert r.error_after <= r.error_before
    assert "undone, as it made the error larger" in str(convify.report(rewritten))
    expected = reference.state_dict()  # undone: back to what the run without training left
    for k, v in rewritten.state_dict().items():
        assert torch.equal(v, expected[k]), k


class Foldable(nn.Module):
    """Every max pooling right after a stride-1 convolution and a ReLU, at sizes where the pool's stride moves
    onto the convolution (16x16 -> 8x8 -> 4x4 either way; an odd size would not fold): ``mode="fold"`` folds
    them all, and no site is left to reconstruct."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.p1 = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.p2 = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.p1(torch.relu(self.c1(x)))
        return self.p2(torch.relu(self.c2(x))).mean((2, 3))


def test_reconstruct_refuses_what_it_cannot_do() -> None:
    model, batches = _model(), _batches(0)
    with pytest.raises(UsageError, match="no max-pool rewrite in its convify report"):
        convify.reconstruct(model, _model(), batches)
    foldable = reinit(Foldable(), seed=2).eval()
    even = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    folded = convify.replace_maxpool(foldable, even[0][:1], mode="fold")
    rows = convify.report(folded).replaced
    assert [r.name for r in rows] == ["p1", "p2"]
    assert all(isinstance(r.detail, PoolRecord) and r.detail.mode == "fold" and r.detail.conv is None for r in rows)
    with pytest.raises(UsageError, match="nothing to reconstruct"):
        convify.reconstruct(foldable, folded, even)
    rewritten = _rewritten(model, batches)
    with pytest.raises(UsageError, match="steps=-1"):
        convify.reconstruct(model, rewritten, batches, steps=-1)
    with pytest.raises(UsageError, match="lr=0"):
        convify.reconstruct(model, rewritten, batches, lr=0)
    with pytest.raises(UsageError, match="calibration='real'"):
        convify.reconstruct(model, rewritten, "real")
    with pytest.raises(UsageError, match="yielded no batches"):
        convify.reconstruct(model, rewritten, [])
    with pytest.raises(ExampleInputError, match=r"^reconstruct: a calibration batch of shape \(2, 1, 15, 15\) "
                       "does not run through the model"):
        convify.reconstruct(model, rewritten, [torch.randn(2, 1, 15, 15)])


def test_reconstruct_reads_input_label_pairs_like_bare_batches() -> None:
    model, batches = _model(), _batches(0)
    pairs = [(b, torch.zeros(len(b), dtype=torch.long)) for b in batches]
    start, bare, paired = _rewritten(model, batches), _rewritten(model, batches), _rewritten(model, batches)
    torch.manual_seed(0)
    convify.reconstruct(model, bare, batches, steps=20, lr=3e-3, progress=False)
    torch.manual_seed(0)
    convify.reconstruct(model, paired, pairs, steps=20, lr=3e-3, progress=False)
    for run in (bare, paired):  # both trained: two runs that did nothing would agree too
        for row in convify.report(run).replaced:
            rec = row.reconstruction
            assert not rec.reverted and rec.error_after < rec.error_reestimated, (row.name, rec)
    initial = dict(start.named_parameters())
    assert any(not torch.equal(p, initial[n]) for n, p in bare.named_parameters())
    x = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(paired(x), bare(x))


class Branchy(nn.Module):
    """The class map comes from one of two heads, chosen by the input's sign (not traceable at the top)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.a = nn.Conv2d(8, 5, 1)
        self.b = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return (self.a(f) if float(x.mean()) > 0 else self.b(f)).mean((2, 3))


def test_a_batch_that_never_reaches_the_blocks_end_is_named() -> None:
    model = reinit(Branchy(), seed=1).eval()
    g = torch.Generator().manual_seed(0)
    positive, negative = torch.rand(8, 3, 12, 12, generator=g) + 0.1, -torch.rand(8, 3, 12, 12, generator=g) - 0.1
    rewritten = convify.replace_maxpool(model, positive[:1], init="fit", calibration=[positive, negative])
    with pytest.raises(convify.errors.RewriteError, match=r"^reconstruct at '.*': the original ran 'a' 0 times on a "
                       r"calibration batch, where the first batch reached call 1; pass batches that run"):
        convify.reconstruct(model, rewritten, [positive, negative], steps=2, progress=False)
    convify.reconstruct(model, rewritten, [positive, positive], steps=2, progress=False)  # one branch: runs


def test_an_exact_model_has_nothing_to_reconstruct_and_says_so() -> None:
    model, batches = _model(), _batches(0)
    exact = convify.replace_maxpool(model, batches[0][:1], mode="exact")
    before = {k: v.clone() for k, v in exact.state_dict().items()}
    out = convify.reconstruct(model, exact, batches, steps=5, progress=False)
    assert out is exact and all(torch.equal(v, exact.state_dict()[k]) for k, v in before.items())
    rows = convify.report(exact).replaced
    assert len(rows) == 2 and all(r.detail.exact and r.reconstruction is None for r in rows)
    assert all("nothing to reconstruct" in " ".join(r.notes) for r in rows)
    assert "exact (mode='exact')" in str(convify.report(exact))
    with torch.no_grad():
        assert torch.allclose(exact(batches[1]), model(batches[1]), rtol=1e-5, atol=1e-5)

