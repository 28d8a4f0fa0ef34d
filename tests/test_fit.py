"""init="fit": least-squares convolutions that imitate the max pooling they replace."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convify
from convify.core import weights as W
from convify.errors import ConvifyError

from conftest import reinit


class TwoPools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.p1 = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.c2 = nn.Conv2d(8, 12, 3, padding=1)
        self.p2 = nn.MaxPool2d(2)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.p1(torch.relu(self.c1(x)))
        x = self.p2(torch.relu(self.c2(x)))
        return self.head(x).mean((2, 3))


class Pool1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv1d(2, 6, 3, padding=1)
        self.head = nn.Conv1d(6, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.max_pool1d(torch.relu(self.c(x)), 3, 2, dilation=2)).mean(-1)


class Pool3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv3d(2, 4, 3, padding=1)
        self.pool = nn.MaxPool3d(2)
        self.head = nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(torch.relu(self.c(x)))).mean((2, 3, 4))


def _batches(seed: int, n: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def _model_err(model: nn.Module, rewritten: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y = model(x)
        return float((rewritten(x) - y).norm() / y.norm())


def _site_output(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def _site_input(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = model.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


# --------------------------------------------------------------------------- reconstruction


@pytest.mark.parametrize("mode", ["conv", "depthwise"])
def test_fit_lowers_reconstruction_error_against_avg(mode: str) -> None:
    model = reinit(TwoPools()).eval()
    calibration = _batches(0, 4, (16, 3, 15, 15))
    held_out = torch.randn(32, 3, 15, 15, generator=torch.Generator().manual_seed(99))
    avg = convify.replace_maxpool(model, mode=mode)
    fit = convify.replace_maxpool(model, mode=mode, init="fit", calibration=calibration)
    # First site: its input is the same in all three models, so compare it with the pooling directly.
    pooled = _site_output(model, "p1", held_out)
    err_avg = float((_site_output(avg, "p1", held_out) - pooled).norm() / pooled.norm())
    err_fit = float((_site_output(fit, "p1", held_out) - pooled).norm() / pooled.norm())
    assert err_fit < 0.6 * err_avg, (err_fit, err_avg)
    # Whole model, on inputs the fit never saw.
    assert _model_err(model, fit, held_out) < 0.5 * _model_err(model, avg, held_out)


class SamePools(nn.Module):
    """Two of timm's "same" max poolings, with no ReLU before them: negative
    values at the borders, where -inf padding and zero padding differ."""

    def __init__(self) -> None:
        super().__init__()
        from timm.layers.pool2d_same import MaxPool2dSame
        self.c1 = nn.Conv2d(3, 6, 3)
        self.p1 = MaxPool2dSame(3, 2)
        self.c2 = nn.Conv2d(6, 6, 1)
        self.p2 = MaxPool2dSame(2, 3)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.p2(self.c2(self.p1(self.c1(x))))).mean((2, 3))


@pytest.mark.parametrize("target", ["original", "pool"])
def test_fit_on_same_padded_pools(target: str) -> None:
    """The target is the -inf-padded max pooling; the convolution reads the zero-padded input."""
    pytest.importorskip("timm")
    model = reinit(SamePools()).eval()
    calibration = _batches(0, 3, (8, 3, 16, 17))
    held_out = torch.randn(16, 3, 16, 17, generator=torch.Generator().manual_seed(99))
    avg = convify.replace_maxpool(model)
    fit = convify.replace_maxpool(model, init="fit", calibration=calibration, fit_target=target)
    rows = convify.report(fit).replaced
    assert [r.detail.params.same for r in rows] == [True, True]
    # the first site's starting error, computed here from timm's module and the average over the zero-padded window
    with torch.no_grad():
        h = torch.cat([model.c1(x) for x in calibration])
        pooled = model.p1(h)
        averaged = avg.get_submodule("p1")(avg.get_submodule("p1_pad")(h))
    assert rows[0].fit.error_before == pytest.approx(float((averaged - pooled).norm() / pooled.norm()), rel=1e-6)
    for row in rows:
        assert row.fit.error_after < 0.8 * row.fit.error_before, row
    assert _model_err(model, fit, held_out) < _model_err(model, avg, held_out)


@pytest.mark.parametrize("model_cls, shape", [(Pool1d, (8, 2, 40)), (Pool3d, (4, 2, 8, 8, 8))])
def test_fit_in_1d_and_3d(model_cls: type[nn.Module], shape: tuple[int, ...]) -> None:
    model = reinit(model_cls()).eval()
    fit = convify.replace_maxpool(model, init="fit", calibration=_batches(1, 3, shape))
    # Pool3d's site is named "pool": the call matching must not take it for a max pooling call.
    assert convify.report(fit).replaced[0].fit.toward == "the original model's pooling output"
    avg = convify.replace_maxpool(model)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    assert _model_err(model, fit, x) < 0.7 * _model_err(model, avg, x)


def _fit(model: nn.Module, calibration: list[torch.Tensor], target: str, **options) -> nn.Module:
    return convify.replace_maxpool(model, None, init="fit", calibration=calibration, fit_target=target, **options)


def test_later_sites_are_fitted_on_the_rewritten_activations() -> None:
    """target='pool': p2 is fitted on what the already-fitted p1 feeds it: the
    same as fitting p1 alone, then p2 on top of that model, and not what
    fitting p2 on the original activations gives."""
    model = reinit(TwoPools()).eval()
    calibration = _batches(2, 4, (16, 3, 15, 15))
    sequential = _fit(model, calibration, "pool")
    p1_first = _fit(model, calibration, "pool", only="p1")
    then_p2 = _fit(p1_first, calibration, "pool", only="p2")
    p2_alone = _fit(model, calibration, "pool", only="p2")
    w = sequential.get_submodule("p2").weight
    assert torch.allclose(w, then_p2.get_submodule("p2").weight, atol=1e-6)
    assert not torch.allclose(w, p2_alone.get_submodule("p2").weight, atol=1e-3)


def test_later_sites_target_the_original_models_pooling_output() -> None:
    """The default target: p2 reads the fitted p1's activations and is fitted
    toward the original's p2 output, so it is the least-squares map from those
    inputs to those outputs: on the calibration data it beats the weights
    fitted toward max pooling of its own input (which win on their own target)."""
    model = reinit(TwoPools()).eval()
    calibration = _batches(2, 4, (16, 3, 15, 15))
    teacher = _fit(model, calibration, "original")
    pool = _fit(model, calibration, "pool")
    assert torch.allclose(teacher.p1.weight, pool.p1.weight, atol=1e-6)  # the first site sees no drift
    assert not torch.allclose(teacher.p2.weight, pool.p2.weight, atol=1e-3)
    x = torch.cat(calibration)
    inputs = _site_input(teacher, "p2", x)  # p1 is the same in both, so are the inputs to p2
    original_out, own_pool = _site_output(model, "p2", x), F.max_pool2d(inputs, 2)

    def err(rewritten: nn.Module, target: torch.Tensor) -> float:
        with torch.no_grad():
            return float((rewritten.p2(inputs) - target).norm())

    assert err(teacher, original_out) < err(pool, original_out)
    assert err(pool, own_pool) < err(teacher, own_pool)
    assert convify.report(teacher).replaced[1].fit.toward == "the original model's pooling output"
    assert convify.report(pool).replaced[1].fit.toward == "max pooling of its input"


@pytest.mark.parametrize("mode", ["conv", "depthwise"])
def test_original_target_lowers_the_model_error(mode: str) -> None:
    model = reinit(TwoPools()).eval()
    calibration = _batches(4, 4, (16, 3, 15, 15))
    held_out = torch.randn(64, 3, 15, 15, generator=torch.Generator().manual_seed(99))
    teacher = _fit(model, calibration, "original", mode=mode)
    pool = _fit(model, calibration, "pool", mode=mode)
    assert _model_err(model, teacher, held_out) < 0.8 * _model_err(model, pool, held_out)
    # In place: the original is copied first, so the targets are still the original's.
    inplace = _fit(reinit(TwoPools()).eval(), calibration, "original", mode=mode, inplace=True)
    assert torch.allclose(inplace.p2.weight, teacher.p2.weight, atol=1e-6)


def test_original_target_falls_back_with_a_note_when_calls_do_not_line_up() -> None:
    model = reinit(TwoPools()).eval()
    model.p2 = nn.MaxPool2d(3, 2)  # p1 folds; p2 cannot (c2 at stride 2 gives 4x4, the pool 3x3): a conv to fit
    fold = convify.replace_maxpool(model, mode="fold", init="fit", calibration=_batches(0, 2, (8, 3, 15, 15)))
    rep = convify.report(fold)
    assert [r.detail.mode for r in rep.replaced] == ["fold", "conv"]
    assert any("fitted toward max pooling of the rewritten model's own activations" in n
               and "the original ran 2 max poolings" in n for n in rep.notes)
    fitted = [r for r in rep.replaced if r.fit is not None]
    assert fitted and all(r.fit.toward == "max pooling of its input" for r in fitted)
    with pytest.raises(ConvifyError, match="fit_target must be one of"):
        _fit(model, _batches(0, 1, (2, 3, 15, 15)), "teacher")


def test_report_says_fit_and_the_error_per_site() -> None:
    model = reinit(TwoPools()).eval()
    fit = convify.replace_maxpool(model, init="fit", calibration=_batches(0, 2, (8, 3, 15, 15)))
    last = convify.report(fit).last
    assert last.options["init"] == "fit"
    assert [r.name for r in last.replaced] == ["p1", "p2"]
    for row in last.replaced:
        assert row.fit is not None and row.fit.samples == 16 and row.fit.error_after < row.fit.error_before
        assert f"note: {row.name}: init=fit, reconstruction error" in str(convify.report(fit))
        assert "on 16 calibration samples" in str(convify.report(fit))


def test_fit_leaves_the_original_alone_and_respects_inplace() -> None:
    model = reinit(TwoPools()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    convify.replace_maxpool(model, init="fit", calibration=_batches(0, 1, (4, 3, 15, 15)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.p1, nn.MaxPool2d)
    train_model = reinit(TwoPools()).train()
    out = convify.replace_maxpool(train_model, init="fit", calibration=_batches(0, 1, (4, 3, 15, 15)),
                                  inplace=True)
    assert out.training


def test_calibration_forms() -> None:
    model = reinit(TwoPools()).eval()
    data = _batches(3, 3, (8, 3, 15, 15))
    from_list = convify.replace_maxpool(model, init="fit", calibration=data)
    from_generator = convify.replace_maxpool(model, init="fit", calibration=(x for x in data))
    from_pairs = convify.replace_maxpool(model, init="fit",
                                         calibration=[(x, torch.zeros(len(x), dtype=torch.long)) for x in data])
    x = torch.randn(4, 3, 15, 15)
    with torch.no_grad():
        ref = from_list(x)
        assert torch.allclose(from_generator(x), ref, atol=1e-6)
        assert torch.allclose(from_pairs(x), ref, atol=1e-6)


def test_fit_without_calibration_is_an_error() -> None:
    with pytest.raises(ConvifyError, match="init='fit' needs calibration="):
        convify.replace_maxpool(TwoPools(), init="fit")
    with pytest.raises(ConvifyError, match="yielded no batches"):
        convify.replace_maxpool(TwoPools(), init="fit", calibration=[])
    with pytest.raises(ConvifyError, match="does not run through the model"):
        convify.replace_maxpool(TwoPools(), torch.randn(1, 3, 15, 15), init="fit",
                                calibration=[torch.randn(2, 5, 15, 15)])


def test_fold_notes_that_folded_sites_have_nothing_to_fit() -> None:
    model = reinit(TwoPools()).eval()
    fit = convify.replace_maxpool(model, mode="fold", init="fit", calibration=_batches(0, 2, (8, 3, 15, 15)))
    rep = convify.report(fit)
    assert any("mode='fold': its sites add no weights to fit (dropped; its stride moves onto" in n for n in rep.notes)
    folded = [r for r in rep.replaced if r.new.startswith("stride")]
    assert folded and all(r.fit is None for r in folded)


def test_fit_on_an_exact_rewrite_says_there_is_nothing_to_fit() -> None:
    model = reinit(TwoPools()).eval()
    exact = convify.replace_maxpool(model, mode="exact", init="fit", calibration=_batches(0, 2, (8, 3, 15, 15)))
    rep = convify.report(exact)
    assert any("the exact sites compute the max pooling exactly; nothing to fit there" in n for n in rep.notes)
    assert rep.replaced and all(r.detail.exact and r.fit is None and r.exact for r in rep.replaced)
    assert not any("add no weights" in n for n in rep.notes)


# --------------------------------------------------------------------------- the pure math


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), (2, 2), (1, 1), (1, 1)), ((2, 3), (1, 2), (0, 1), (2, 1)),
])
def test_patches_apply_like_a_convolution(kernel, stride, padding, dilation) -> None:
    x = torch.randn(2, 3, 9, 10, dtype=torch.float64)
    w = torch.randn(4, 3, *kernel, dtype=torch.float64)
    ref = F.conv2d(x, w, None, stride, padding, dilation)
    rows = W.patches(x, kernel, stride, padding, dilation)
    got = (rows.reshape(rows.shape[0], -1) @ w.reshape(4, -1).T).reshape(2, *ref.shape[2:], 4).movedim(-1, 1)
    assert torch.allclose(got, ref, atol=1e-12)


def test_ridge_solve_is_least_squares_and_shrinks_toward_the_prior() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 5, generator=g, dtype=torch.float64),
                   torch.ones(200, 1, dtype=torch.float64)], 1)
    y = torch.randn(200, 2, generator=g, dtype=torch.float64)
    prior = torch.randn(6, 2, generator=g, dtype=torch.float64)
    gram, cross = x.T @ x, x.T @ y
    exact = torch.linalg.lstsq(x, y).solution
    assert torch.allclose(W.ridge_solve(gram, cross, prior, 1e-12), exact, atol=1e-8)
    heavy = W.ridge_solve(gram, cross, prior, 1e6)
    assert torch.allclose(heavy[:-1], prior[:-1], atol=1e-3)
    residual = W.squared_residual(gram, cross, (y * y).sum(), exact)
    assert torch.allclose(residual, ((x @ exact - y) ** 2).sum())


def test_convify_passes_calibration_to_the_pool_fit() -> None:
    class WithLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 6, 3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(6 * 4 * 4, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.pool(torch.relu(self.c(x))), 1))

    model = reinit(WithLinear()).eval()
    calibration = _batches(4, 3, (8, 3, 8, 8))
    fit = convify.convify(model, torch.randn(1, 3, 8, 8), init="fit", calibration=calibration)
    avg = convify.convify(model, torch.randn(1, 3, 8, 8))
    rep = convify.report(fit)
    assert [p.rewrite for p in rep.passes] == ["maxpool", "head"]
    assert rep.passes[0].options["init"] == "fit"
    x = torch.randn(16, 3, 8, 8)
    assert _model_err(model, fit, x) < 0.7 * _model_err(model, avg, x)


class FlatHead(nn.Module):
    """A VGG-style head: Linear on the flattened map, then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(6 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(torch.relu(self.c(x))), 1)
        return self.fc2(torch.relu(self.fc1(x)))


def _structured(n: int, seed: int) -> torch.Tensor:
    """Images with spatial structure (a fixed pattern at a random strength,
    plus noise), like centred objects. On spatially stationary inputs the
    summed weights are already the least-squares optimum of a gap head."""
    pattern = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 1, 1, generator=g) * pattern + 0.5 * torch.randn(n, 3, 8, 8, generator=g)


def test_convify_fits_gap_heads_that_are_not_exact() -> None:
    model = reinit(FlatHead()).eval()
    example = torch.randn(1, 3, 8, 8)
    calibration = (_structured(16, s) for s in range(1, 5))  # one-shot: both passes must still see it
    fit = convify.convify(model, example, head="gap", init="fit", calibration=calibration)
    avg = convify.convify(model, example, head="gap")
    head_pass = convify.report(fit).passes[1]
    assert head_pass.rewrite == "head"
    row = head_pass.replaced[0]
    assert not row.exact and row.fit is not None and row.fit.error_after < row.fit.error_before
    assert "note: fc1: init=fit, reconstruction error" in str(convify.report(fit))
    x = _structured(128, 99)
    assert _model_err(model, fit, x) < 0.8 * _model_err(model, avg, x)
    # The head alone (pooling kept): the fit beats the summed-weight init on unseen inputs.
    calibration = [_structured(16, s) for s in range(1, 5)]
    head_fit = convify.convify(model, example, pool=None, head="gap", init="fit", calibration=calibration)
    head_avg = convify.convify(model, example, pool=None, head="gap")
    assert _model_err(model, head_fit, x) < 0.8 * _model_err(model, head_avg, x)


def _agreement(model: nn.Module, rewritten: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((rewritten(x).argmax(1) == model(x).argmax(1)).double().mean())


def test_gap_fit_toward_the_logits_raises_the_top1_agreement() -> None:
    """The paper's GAP head: least squares from the pooled features toward the
    original logits beats the data-free product init, and the report says by how much."""
    model = reinit(FlatHead(), seed=2).eval()
    example = torch.randn(1, 3, 8, 8)
    calibration = [_structured(64, s) for s in range(1, 9)]
    fit = convify.replace_linear_head(model, example, mode="gap", calibration=calibration)
    free = convify.replace_linear_head(model, example, mode="gap")
    row = convify.report(fit).replaced[0]
    assert row.detail.collapsed and not row.exact and linears_of(fit) == []
    assert row.fit.toward == "the original's logits" and row.fit.samples == 512
    assert row.fit.error_after < 0.8 * row.fit.error_before
    assert row.fit.agreement > row.fit.agreement_before + 0.1
    assert f"top-1 agreement with the original {row.fit.agreement:.1%}" in str(convify.report(fit))
    x = _structured(512, 99)
    assert _agreement(model, fit, x) > _agreement(model, free, x) + 0.1
    assert _model_err(model, fit, x) < 0.8 * _model_err(model, free, x)


def test_gap_mlp_fit_targets_the_first_linear_and_keeps_the_mlp() -> None:
    model = reinit(FlatHead()).eval()
    example = torch.randn(1, 3, 8, 8)
    calibration = [_structured(16, s) for s in range(1, 5)]
    fit = convify.replace_linear_head(model, example, mode="gap_mlp", calibration=calibration)
    free = convify.replace_linear_head(model, example, mode="gap_mlp")
    row = convify.report(fit).replaced[0]
    assert row.fit.toward == "the first Linear's output" and row.fit.agreement is None
    assert [type(fit.get_submodule(n)) for n in ("fc1", "fc2")] == [nn.Conv2d, nn.Conv2d]
    x = _structured(128, 99)
    assert _model_err(model, fit, x) < 0.8 * _model_err(model, free, x)


def test_exact_gap_heads_are_not_fitted() -> None:
    model = reinit(nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(6, 4))).eval()
    fit = convify.replace_linear_head(model, torch.randn(1, 3, 8, 8), mode="gap",
                                      calibration=[_structured(8, 1)])
    row = convify.report(fit).replaced[0]
    assert row.exact and row.fit is None


def linears_of(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
