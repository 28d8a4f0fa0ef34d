"""convify.distill: knowledge distillation of the rewritten model toward the original."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import convify
import convify.recovery.distillation as D
import convify.recovery.distillation.run as R  # the run reads distillation_loss here: the tests patch it here
from convify.errors import CompileError, ConvifyError, UsageError
from convify.recovery.distillation import CHECKPOINT_NAME, History, distillation_loss, load_checkpoint

from conftest import reinit


class Small(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.p1 = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 16, 3, padding=1)
        self.p2 = nn.MaxPool2d(2)
        self.head = nn.Conv2d(16, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.p1(torch.relu(self.c1(x)))
        x = self.p2(torch.relu(self.c2(x)))
        return self.head(x).mean((2, 3))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _agreement(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((teacher(x).argmax(1) == student(x).argmax(1)).float().mean())


def _sign_labels(x: torch.Tensor) -> torch.Tensor:
    """1 for images brighter than zero on average, else 0: a rule the random
    teacher does not know (``_pair(1)``'s teacher says class 3 for nearly every image)."""
    return (x.mean((1, 2, 3)) > 0).long()


def _accuracy(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == labels).float().mean())


def _pair(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    teacher = reinit(Small(), seed).eval()
    student = convify.replace_maxpool(teacher, init="kaiming")
    torch.manual_seed(seed)
    with torch.no_grad():  # a poor start, so that there is something to recover
        for name in ("p1", "p2"):
            student.get_submodule(name).weight.normal_(0, 0.3)
    return teacher, student


def test_an_exact_rewrite_starts_at_full_agreement_and_its_tree_trains() -> None:
    """mode="exact" is an ordinary model: distillation trains its layers (here toward labels, so they move)."""
    teacher = reinit(Small(), 0).eval()
    student = convify.replace_maxpool(teacher, _images(1, 0), mode="exact")
    held_out = _images(128, 2)
    assert _agreement(teacher, student, held_out) == 1.0
    tree = [p for n, p in student.named_parameters() if n.startswith(("p1", "p2"))]
    start = [p.detach().clone() for p in tree]
    assert tree and all(p.requires_grad for p in tree)
    train = _images(64, 1)
    convify.distill(teacher, student, TensorDataset(train, _sign_labels(train)), epochs=1, batch_size=16, lr=1e-2,
                    alpha=0.0, device="cpu", progress=False)
    assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(tree, start))


def test_distillation_raises_agreement_on_unlabelled_images() -> None:
    teacher, student = _pair()
    train, held_out = _images(256, 1), _images(256, 2)
    before = _agreement(teacher, student, held_out)
    torch.manual_seed(0)
    history = convify.distill(teacher, student, TensorDataset(train), epochs=3, batch_size=32, lr=3e-3,
                              val_data=TensorDataset(held_out), device="cpu", progress=False)
    after = _agreement(teacher, student, held_out)
    assert after > before + 0.2, (before, after)
    assert after > 0.75, after
    assert history.epochs == 3
    assert history.val_agreement[-1] == pytest.approx(after)
    assert history.val_accuracy == [None] * 3  # no labels, no accuracy
    assert history.loss[-1] < history.loss[0]


class _Wrapped(nn.Module):
    """``model``'s logits wrapped the way a zoo returns them: a dict with ``logits`` (a Hugging Face
    ``ModelOutput`` is one), a tuple with the logits first, or a score map ``N x classes x 1 x 1``."""

    def __init__(self, model: nn.Module, form: str) -> None:
        super().__init__()
        self.model, self.form = model, form

    def forward(self, x: torch.Tensor):
        logits = self.model(x)
        if self.form == "dict":
            return {"logits": logits, "hidden_states": None}
        if self.form == "tuple":
            return logits, logits.detach() * 0
        if self.form == "map":
            return logits[:, :, None, None]
        return "no logits here"


@pytest.mark.parametrize("form", ["dict", "tuple", "map"])
def test_zoo_outputs_distill_like_plain_logits(form: str) -> None:
    teacher, student = _pair()
    plain = convify.replace_maxpool(teacher, init="kaiming")
    plain.load_state_dict(student.state_dict())
    train = TensorDataset(_images(64, 1))
    runs = []
    for t, s in ((teacher, plain), (_Wrapped(teacher, form), _Wrapped(student, form))):
        torch.manual_seed(0)
        runs.append(convify.distill(t, s, train, epochs=1, batch_size=32, device="cpu", progress=False).loss)
    assert runs[1] == pytest.approx(runs[0])
    for a, b in zip(plain.parameters(), student.parameters()):
        torch.testing.assert_close(a, b)


def test_an_output_without_logits_is_refused_with_its_type() -> None:
    teacher, student = _pair()
    with pytest.raises(ConvifyError, match="returned str, which holds no tensor of class logits"):
        convify.distill(_Wrapped(teacher, "none"), _Wrapped(student, "none"), TensorDataset(_images(8, 1)),
                        epochs=1, batch_size=8, device="cpu", progress=False)


def test_labels_give_validation_accuracy_apart_from_agreement() -> None:
    teacher, student = _pair(1)
    x = _images(128, 3)
    labels = _sign_labels(x)
    assert _accuracy(teacher, x, labels) < 0.1  # labels the teacher does not give: accuracy is not agreement
    loader = DataLoader(TensorDataset(x, labels), batch_size=32, shuffle=True)
    history = convify.distill(teacher, student, loader, val_data=TensorDataset(x, labels), device="cpu",
                              progress=False)
    accuracy, agreement = _accuracy(student, x, labels), _agreement(teacher, student, x)
    assert abs(accuracy - agreement) > 0.2, (accuracy, agreement)
    assert history.val_accuracy[0] == pytest.approx(accuracy)
    assert history.val_agreement[0] == pytest.approx(agreement)


def test_alpha_zero_follows_the_labels_not_the_teacher() -> None:
    """alpha=0 leaves cross-entropy alone: the student learns labels that its
    teacher never gives; alpha=1 on the same data follows the teacher instead."""
    train, held_out = _images(256, 8), _images(256, 9)
    data, val = TensorDataset(train, _sign_labels(train)), TensorDataset(held_out, _sign_labels(held_out))
    runs, before = {}, {}
    for alpha in (0.0, 1.0):
        teacher, student = _pair(1)
        before[alpha] = _accuracy(student, held_out, _sign_labels(held_out))
        torch.manual_seed(0)
        runs[alpha] = convify.distill(teacher, student, data, epochs=3, batch_size=16, lr=3e-2, alpha=alpha,
                                      val_data=val, device="cpu", progress=False)
    labels_only, teacher_only = runs[0.0], runs[1.0]
    assert labels_only.val_accuracy[-1] > before[0.0] + 0.2, (before[0.0], labels_only.val_accuracy)
    assert labels_only.val_accuracy[-1] > 0.75, labels_only.val_accuracy
    assert labels_only.val_accuracy[-1] > labels_only.val_agreement[-1] + 0.5, labels_only
    assert teacher_only.val_agreement[-1] > 0.9 and teacher_only.val_accuracy[-1] < 0.2, teacher_only


def test_loss_is_kl_times_t_squared_plus_weighted_cross_entropy() -> None:
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    labels = torch.tensor([0, 1, 2, 0])
    assert float(distillation_loss(t, t, None, 4.0, 0.9)) == pytest.approx(0.0, abs=1e-6)
    kd = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.softmax(t / 2, 1), reduction="batchmean") * 4
    ce = torch.nn.functional.cross_entropy(s, labels)
    assert float(distillation_loss(s, t, None, 2.0, 0.7)) == pytest.approx(float(kd), rel=1e-5)
    assert float(distillation_loss(s, t, labels, 2.0, 0.7)) == pytest.approx(float(0.7 * kd + 0.3 * ce), rel=1e-5)


def test_teacher_is_frozen_and_modes_are_restored() -> None:
    teacher, student = _pair(2)
    teacher.train()
    student.eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    convify.distill(teacher, student, TensorDataset(_images(64, 4)), batch_size=16, device="cpu", progress=False)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())
    assert teacher.training and not student.training
    assert any(not torch.equal(student_before[k], v) for k, v in student.state_dict().items())


def test_checkpoints_and_resume(tmp_path: Path) -> None:
    teacher, student = _pair(3)
    data = TensorDataset(_images(64, 5))
    first = convify.distill(teacher, student, data, epochs=1, batch_size=16, device="cpu", progress=False,
                            checkpoint_dir=tmp_path)
    saved = load_checkpoint(tmp_path)
    assert saved["epoch"] == 0 and saved["history"].loss == first.loss
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in saved["student"].items())

    _, fresh = _pair(3)
    resumed = convify.distill(teacher, fresh, data, epochs=2, batch_size=16, device="cpu", progress=False,
                              checkpoint_dir=tmp_path, resume=True)
    assert resumed.epochs == 2 and resumed.loss[0] == first.loss[0]
    assert load_checkpoint(tmp_path)["epoch"] == 1
    # Resuming a finished run trains nothing more and loads the finished weights.
    _, again = _pair(3)
    done = convify.distill(teacher, again, data, epochs=2, batch_size=16, device="cpu", progress=False,
                           checkpoint_dir=tmp_path, resume=True)
    assert done.loss == resumed.loss
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in again.state_dict().items())


class _Interrupted(Exception):
    pass


class _Failing(torch.utils.data.Dataset):
    """``data`` until ``fail_after`` items have been read, then an error (a crash mid-run)."""

    def __init__(self, data: torch.Tensor, fail_after: int) -> None:
        self.data, self.fail_after, self.reads = data, fail_after, 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads += 1
        if self.reads > self.fail_after:
            raise _Interrupted
        return self.data[index]


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_decays_and_a_resumed_run_continues_it(tmp_path: Path, schedule: str) -> None:
    teacher, student = _pair(5)
    images = _images(64, 7)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    whole = convify.distill(teacher, student, DataLoader(TensorDataset(images), batch_size=16), epochs=2, lr=3e-3,
                            schedule=schedule, device="cpu", progress=False, checkpoint_dir=tmp_path / "whole")
    final_lr = load_checkpoint(tmp_path / "whole")["optimizer"]["param_groups"][0]["lr"]
    assert final_lr == pytest.approx(0.0 if schedule == "cosine" else 3e-3, abs=1e-12)

    _, crashed = _pair(5)
    crashed.load_state_dict(start)
    with pytest.raises(_Interrupted):  # dies in the second epoch, after the first epoch's checkpoint
        convify.distill(teacher, crashed, DataLoader(_Failing(images, 64 + 20), batch_size=16), epochs=2, lr=3e-3,
                        schedule=schedule, device="cpu", progress=False, checkpoint_dir=tmp_path / "crashed")
    if schedule == "cosine":  # half way along the curve: 4 of 8 steps
        assert load_checkpoint(tmp_path / "crashed")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1.5e-3)
    _, resumed = _pair(5)
    history = convify.distill(teacher, resumed, DataLoader(TensorDataset(images), batch_size=16), epochs=2,
                              lr=3e-3, schedule=schedule, device="cpu", progress=False,
                              checkpoint_dir=tmp_path / "crashed", resume=True)
    assert history.loss[1] == pytest.approx(whole.loss[1], rel=1e-5)
    for k, v in student.state_dict().items():
        assert torch.allclose(resumed.state_dict()[k], v, atol=1e-6), k


def test_resume_from_a_checkpoint_of_another_model_names_the_file(tmp_path: Path) -> None:
    teacher, student = _pair(4)
    data = TensorDataset(_images(32, 6))
    convify.distill(teacher, student, data, batch_size=16, device="cpu", progress=False, checkpoint_dir=tmp_path)
    other = convify.replace_maxpool(Small(classes=3))
    with pytest.raises(ConvifyError, match=f"cannot resume from .*{CHECKPOINT_NAME}"):
        convify.distill(Small(classes=3), other, data, epochs=2, device="cpu", progress=False,
                        checkpoint_dir=tmp_path, resume=True)


def test_argument_errors() -> None:
    teacher, student = _pair()
    data = TensorDataset(_images(8, 0))
    with pytest.raises(ConvifyError, match="alpha .* must be in"):
        convify.distill(teacher, student, data, alpha=1.5, progress=False)
    with pytest.raises(ConvifyError, match="resume=True needs checkpoint_dir"):
        convify.distill(teacher, student, data, resume=True, progress=False)
    with pytest.raises(ConvifyError, match="must be a torch DataLoader or Dataset"):
        convify.distill(teacher, student, [_images(8, 0)], progress=False, device="cpu")
    with pytest.raises(ConvifyError, match="the same module"):
        convify.distill(teacher, teacher, data, progress=False)
    with pytest.raises(ConvifyError, match="schedule must be one of"):
        convify.distill(teacher, student, data, schedule="linear", progress=False)


def test_history_round_trips() -> None:
    h = History([1.0], [0.5], [None], [None], [2.0], ["bf16"])
    assert History.from_dict(h.to_dict()) == h
    assert "epoch" in str(h)
    # saved before precision= existed: those epochs ran in float32
    assert History.from_dict({"loss": [1.0, 0.9], "seconds": [1.0, 1.0]}).precision == ["fp32", "fp32"]


def test_a_non_finite_loss_stops_before_the_step_on_the_cpu(monkeypatch) -> None:
    teacher, student = _pair(6)
    images = _images(32, 6)
    images[20] = float("nan")  # in the second batch of 16
    before = {k: v.clone() for k, v in student.state_dict().items()}
    after_one_step = {}

    class Spy(torch.optim.Adam):
        def step(self, *args, **kwargs):
            out = super().step(*args, **kwargs)
            after_one_step.update({k: v.clone() for k, v in student.state_dict().items()})
            return out

    monkeypatch.setattr(torch.optim, "Adam", Spy)
    with pytest.raises(ConvifyError, match="the loss became nan in epoch 1; lower lr="):
        convify.distill(teacher, student, DataLoader(TensorDataset(images), batch_size=16), device="cpu",
                        progress=False)
    assert any(not torch.equal(before[k], v) for k, v in after_one_step.items())
    for k, v in student.state_dict().items():  # the first batch's step, not the second's
        assert torch.equal(v, after_one_step[k]), k


def test_a_non_finite_loss_on_an_accelerator_stops_at_the_end_of_the_epoch(monkeypatch) -> None:
    """Where checking every step would make the host wait for the device, the check is the epoch's sum."""
    monkeypatch.setattr(D._Run, "check_every_step", property(lambda self: False))
    teacher, student = _pair(6)
    images = _images(32, 6)
    images[20] = float("nan")
    with pytest.raises(ConvifyError, match="the loss became nan in epoch 1"):
        convify.distill(teacher, student, DataLoader(TensorDataset(images), batch_size=16), device="cpu",
                        progress=False)


# --------------------------------------------------------------------------- speed options


def _cpu_precisions() -> list:
    """bf16 and fp16, each skipped where this torch cannot autocast to it on the CPU (found by trying)."""
    params = []
    for name in ("bf16", "fp16"):
        reason = D._autocasts(name, torch.device("cpu"))
        params.append(pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=f"{name}: {reason}")))
    return params


def _default_run() -> tuple[History, nn.Module]:
    """Two epochs with the default options, to compare the others with."""
    teacher, student = _pair(7)
    torch.manual_seed(0)
    history = convify.distill(teacher, student, TensorDataset(_images(64, 8)), epochs=2, batch_size=16, lr=3e-3,
                              device="cpu", progress=False)
    return history, student


@pytest.mark.parametrize("precision", _cpu_precisions())
def test_mixed_precision_trains_the_student_with_a_float32_loss(monkeypatch, precision: str) -> None:
    teacher, student = _pair(7)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    seen: dict[str, set] = {"teacher": set(), "student": set(), "loss": set(), "teacher_inference": set()}
    teacher.c2.register_forward_hook(lambda m, i, o: seen["teacher"].add(o.dtype))
    teacher.c2.register_forward_hook(lambda m, i, o: seen["teacher_inference"].add(torch.is_inference_mode_enabled()))
    student.get_submodule("c2").register_forward_hook(lambda m, i, o: seen["student"].add(o.dtype))
    real_loss = D.distillation_loss

    def loss_spy(s, t, labels, temperature, alpha):
        seen["loss"].update({s.dtype, t.dtype})
        return real_loss(s, t, labels, temperature, alpha)

    monkeypatch.setattr(R, "distillation_loss", loss_spy)
    x = _images(64, 8)
    history = convify.distill(teacher, student, TensorDataset(x, _sign_labels(x)), batch_size=16, lr=3e-3,
                              val_data=TensorDataset(x), device="cpu", progress=False, precision=precision)
    dtype = D.PRECISIONS[precision]
    assert seen == {"teacher": {dtype}, "student": {dtype}, "loss": {torch.float32}, "teacher_inference": {True}}
    assert history.precision == [precision] and all(v == v for v in history.loss)  # finite, not NaN
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


class _SpyScaler(torch.amp.GradScaler):
    made: list["_SpyScaler"] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scaled = self.stepped = 0
        _SpyScaler.made.append(self)

    def scale(self, outputs):
        self.scaled += 1
        return super().scale(outputs)

    def step(self, optimizer, *args, **kwargs):
        self.stepped += 1
        return super().step(optimizer, *args, **kwargs)


@pytest.mark.parametrize("precision", _cpu_precisions())
def test_only_fp16_scales_the_loss_and_its_scale_is_checkpointed(monkeypatch, tmp_path: Path, precision: str
                                                                 ) -> None:
    monkeypatch.setattr(_SpyScaler, "made", [])
    monkeypatch.setattr(torch.amp, "GradScaler", _SpyScaler)
    teacher, student = _pair(7)
    convify.distill(teacher, student, TensorDataset(_images(64, 8)), batch_size=16, device="cpu", progress=False,
                    precision=precision, checkpoint_dir=tmp_path)
    state = load_checkpoint(tmp_path)
    assert state["options"] == {"precision": precision, "channels_last": False, "workers": 0, "compile": False}
    if precision == "bf16":
        assert _SpyScaler.made == []
        assert "scaler" not in state
        return
    used = [s for s in _SpyScaler.made if s.scaled]
    assert len(used) == 1 and used[0].scaled == used[0].stepped == 4  # every one of the 4 steps
    assert state["scaler"]["scale"] == used[0].get_scale()


def _needs_both_cpu_precisions() -> None:
    for name in ("bf16", "fp16"):
        reason = D._autocasts(name, torch.device("cpu"))
        if reason is not None:
            pytest.skip(f"{name}: {reason}")


def test_resuming_in_another_precision_is_recorded_per_epoch(tmp_path: Path) -> None:
    _needs_both_cpu_precisions()
    teacher, student = _pair(8)
    data = TensorDataset(_images(32, 9))
    common = dict(batch_size=16, device="cpu", progress=False, checkpoint_dir=tmp_path)
    convify.distill(teacher, student, data, epochs=1, precision="fp16", **common)
    assert "scaler" in load_checkpoint(tmp_path)
    _, again = _pair(8)
    history = convify.distill(teacher, again, data, epochs=2, precision="bf16", resume=True, **common)
    assert history.precision == ["fp16", "bf16"]
    state = load_checkpoint(tmp_path)
    assert state["options"]["precision"] == "bf16" and "scaler" not in state


def test_an_fp16_run_resumed_in_fp16_continues_its_loss_scale(tmp_path: Path, monkeypatch) -> None:
    _needs_both_cpu_precisions()
    teacher, student = _pair(8)
    data = TensorDataset(_images(32, 9))
    common = dict(batch_size=16, device="cpu", progress=False, checkpoint_dir=tmp_path, precision="fp16")
    convify.distill(teacher, student, data, epochs=1, **common)
    saved = load_checkpoint(tmp_path)["scaler"]
    loaded = []
    real = torch.amp.GradScaler.load_state_dict
    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", lambda self, state: (loaded.append(state),
                                                                                      real(self, state))[1])
    _, again = _pair(8)
    history = convify.distill(teacher, again, data, epochs=2, resume=True, **common)
    assert loaded == [saved] and history.precision == ["fp16", "fp16"]


def test_channels_last_gives_the_default_results() -> None:
    seen: list[bool] = []
    default, plain = _default_run()
    teacher, student = _pair(7)
    # the images (one channel: channels-last strides them (HW, 1, W, 1), contiguous (HW, HW, W, 1)) and
    # the activations inside
    student.register_forward_pre_hook(lambda m, args: seen.append(args[0].stride()[1] == 1))
    student.get_submodule("c2").register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                    and not args[0].is_contiguous()))
    torch.manual_seed(0)
    history = convify.distill(teacher, student, TensorDataset(_images(64, 8)), epochs=2, batch_size=16, lr=3e-3,
                              device="cpu", progress=False, channels_last=True)
    assert seen and all(seen)  # the student did run channels-last
    assert history.loss == pytest.approx(default.loss, rel=1e-5)
    for k, v in plain.state_dict().items():
        assert torch.allclose(student.state_dict()[k], v, atol=1e-5), k
    # given back in the default memory format, like the teacher
    assert all(p.is_contiguous() for p in student.parameters())
    assert all(p.is_contiguous() for p in teacher.parameters())


class _OnlyInWorkers(torch.utils.data.Dataset):
    """Items that can only be read in a DataLoader worker process."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        if torch.utils.data.get_worker_info() is None:
            raise RuntimeError("read in the main process, not in a worker")
        return self.data[index]


def test_workers_load_a_dataset_and_give_the_same_results() -> None:
    default, plain = _default_run()
    teacher, student = _pair(7)
    torch.manual_seed(0)
    history = convify.distill(teacher, student, _OnlyInWorkers(_images(64, 8)), epochs=2, batch_size=16, lr=3e-3,
                              val_data=_OnlyInWorkers(_images(16, 9)), device="cpu", progress=False, workers=2)
    assert history.loss == pytest.approx(default.loss, rel=1e-6)  # the same shuffles: drawn in this process
    assert all(torch.equal(student.state_dict()[k], v) for k, v in plain.state_dict().items())


def test_workers_on_no_dataset_of_distills_is_an_error() -> None:
    teacher, student = _pair()
    loader = DataLoader(TensorDataset(_images(8, 0)), batch_size=4)
    with pytest.raises(UsageError, match="workers=2 sets the loaders distill builds .* give it num_workers="):
        convify.distill(teacher, student, loader, workers=2, device="cpu", progress=False)


def test_the_teacher_runs_in_inference_mode_and_the_loss_may_save_its_logits(monkeypatch) -> None:
    """A loss that keeps the teacher's logits for backward (a product) still trains: they reach it as an
    ordinary tensor, not as the inference tensor the teacher made."""
    modes = []
    teacher, student = _pair(9)
    teacher.register_forward_hook(lambda m, i, o: modes.append((torch.is_inference_mode_enabled(), o.is_inference())))
    before = {k: v.clone() for k, v in student.state_dict().items()}
    monkeypatch.setattr(R, "distillation_loss", lambda s, t, labels, temperature, alpha: (s * t).mean())
    convify.distill(teacher, student, TensorDataset(_images(32, 1)), batch_size=16, device="cpu", progress=False)
    assert modes == [(True, True)] * 2
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_compile_failures_name_the_fix(monkeypatch) -> None:
    teacher, student = _pair()
    data = TensorDataset(_images(8, 0))

    def unavailable(module, *args, **kwargs):
        raise RuntimeError("Dynamo is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unavailable)
    with pytest.raises(CompileError, match=r"torch.compile is not available here .*Dynamo.* pass compile=False") as e:
        convify.distill(teacher, student, data, compile=True, device="cpu", progress=False)
    assert isinstance(e.value.__cause__, RuntimeError)

    class Broken(nn.Module):
        def __init__(self, module: nn.Module) -> None:
            super().__init__()
            self.module = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("backend compiler failed")

    monkeypatch.setattr(torch, "compile", lambda module, *args, **kwargs: Broken(module))
    with pytest.raises(CompileError, match=r"failed on its first training step .*backend compiler failed.* "
                                           r"pass compile=False") as e:
        convify.distill(teacher, student, data, compile=True, device="cpu", progress=False)
    assert "backend compiler failed" in str(e.value.__cause__)


def _compile_works() -> str | None:
    """Why torch.compile cannot run here (None: it can), found by trying."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as e:  # noqa: BLE001
        return f"torch.compile does not work here: {type(e).__name__}: {e}"
    return None


@pytest.mark.slow  # about 20 s on 2 busy cores with Inductor's cache empty (3 s with it warm)
def test_compile_trains_like_eager_and_checkpoints_the_plain_student(tmp_path: Path, monkeypatch) -> None:
    reason = _compile_works()
    if reason:
        pytest.skip(reason)
    compiled = []
    real_compile = torch.compile

    def spy(module, *args, **kwargs):
        compiled.append(module)
        return real_compile(module, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    teacher, eager = _pair(7)
    torch.manual_seed(0)
    expected = convify.distill(teacher, eager, TensorDataset(_images(32, 8)), batch_size=16, lr=3e-3,
                               device="cpu", progress=False)
    teacher, student = _pair(7)
    torch.manual_seed(0)
    history = convify.distill(teacher, student, TensorDataset(_images(32, 8)), batch_size=16, lr=3e-3,
                              device="cpu", progress=False, compile=True, checkpoint_dir=tmp_path)
    assert compiled == [student]
    assert load_checkpoint(tmp_path)["student"].keys() == eager.state_dict().keys()  # no "_orig_mod." prefixes
    assert history.loss == pytest.approx(expected.loss, rel=1e-4)
    for k, v in eager.state_dict().items():
        assert torch.allclose(student.state_dict()[k], v, atol=1e-4), k


def test_bad_precision_and_workers_are_usage_errors() -> None:
    teacher, student = _pair()
    data = TensorDataset(_images(8, 0))
    with pytest.raises(UsageError, match=r"precision must be one of \('fp32', 'bf16', 'fp16'\), not 'half'"):
        convify.distill(teacher, student, data, precision="half", progress=False)
    with pytest.raises(UsageError, match="workers must be a whole number"):
        convify.distill(teacher, student, data, workers=-1, progress=False)


def test_a_precision_the_device_cannot_run_is_refused_with_the_fix(monkeypatch) -> None:
    """Where torch has no gradient scaler (or no autocast) for the device it only warns and runs float32;
    distill says so instead."""

    class NoScaler(torch.amp.GradScaler):
        def is_enabled(self) -> bool:
            return False

    monkeypatch.setattr(torch.amp, "GradScaler", NoScaler)
    teacher, student = _pair()
    if D._autocasts("bf16", torch.device("cpu")) is not None:
        pytest.skip("bf16 does not autocast on this CPU either")
    with pytest.raises(UsageError, match=r"precision 'fp16' cannot run on cpu \(.*no gradient scaler for cpu\); "
                                         r"choose another precision= \(fp32 or bf16\) or another device="):
        convify.distill(teacher, student, TensorDataset(_images(8, 0)), precision="fp16", device="cpu",
                        progress=False)


# --------------------------------------------------------------------------- torchrun

_WORKER = textwrap.dedent('''
    import os, sys
    import torch
    import torch.nn as nn
    from torch.utils.data import TensorDataset
    import convify

    def build():
        torch.manual_seed(0)
        teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
        return teacher, convify.replace_maxpool(teacher, init="kaiming")

    if __name__ == "__main__":
        torch.set_num_threads(1)
        out = sys.argv[1]
        teacher, student = build()
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
        history = convify.distill(teacher, student, data, epochs=2, batch_size=8, device="cpu", progress=False,
                                  val_data=data, checkpoint_dir=os.path.join(out, "ckpt"))
        rank = os.environ["RANK"]
        torch.save({"state": student.state_dict(), "history": history.to_dict()},
                   os.path.join(out, f"rank{rank}.pt"))
''')


def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CHECKPOINT_NAME]  # rank 0 only

    spec = importlib.util.spec_from_file_location("distill_worker", script)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    _, student = worker.build()
    initial = {k: v.clone() for k, v in student.state_dict().items()}
    state = load_checkpoint(tmp_path / "ckpt", student)
    assert state["epoch"] == 1 and state["history"].epochs == 2
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for k, v in student.state_dict().items():
        assert torch.equal(v, ranks[0]["state"][k]) and torch.equal(v, ranks[1]["state"][k])  # DDP kept them equal
    assert any(not torch.equal(initial[k], v) for k, v in student.state_dict().items())
    # The metrics were reduced over both ranks: each rank reports the same numbers.
    same = ("loss", "agreement", "val_agreement", "val_accuracy")
    assert {k: ranks[0]["history"][k] for k in same} == {k: ranks[1]["history"][k] for k in same}
    with torch.no_grad():
        assert student(torch.randn(2, 1, 8, 8)).shape == (2, 3)


# --------------------------------------------------------------------------- command line

_TINY = textwrap.dedent('''
    import torch.nn as nn

    def build(classes=2):
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(4, classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
''')


def test_cli_distill_on_an_image_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from convify import io as ck
    from convify.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tinynet_for_distill.py").write_text(_TINY)
    g = torch.Generator().manual_seed(0)
    for cls in ("a", "b"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(12, 12, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / cls / f"{i}.png")
    sys.modules.pop("tinynet_for_distill", None)
    torch.manual_seed(0)
    teacher = ck.build_arch("tinynet_for_distill:build")
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")
    arch = ["--arch", "tinynet_for_distill:build", "--trust-code", "--weights", "teacher.pt",
            "--input-shape", "1,3,12,12", "--init", "kaiming"]
    assert main(["rewrite", *arch, "-o", "rewritten.pt"]) == 0
    code = main(["distill", "rewritten.pt", "--teacher", "teacher.pt", "--data", "images", "-o", "distilled.pt",
                 "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--trust-code"])
    assert code == 0
    distilled = ck.load(tmp_path / "distilled.pt", trust_code=True)
    rewritten = ck.load(tmp_path / "rewritten.pt", trust_code=True)
    assert any(not torch.equal(v, rewritten.state_dict()[k]) for k, v in distilled.state_dict().items())
    assert distilled(torch.randn(1, 3, 12, 12)).shape == (1, 2)
    # A flat folder of images: no labels, pure distillation.
    assert main(["distill", "rewritten.pt", "--teacher", "teacher.pt", "--data", "images/a", "-o", "flat.pt",
                 "--batch-size", "4", "--device", "cpu", "--trust-code", "--json"]) == 0
    assert (tmp_path / "flat.pt").exists()
