"""Example inputs: what the caller gave, as positional arguments, or one
worked out from the model itself.

Every rewrite, ``export_onnx`` and ``verify`` take an optional example input;
this module turns it into arguments (``as_args``), probes one when it is
missing (``probe_input``), and makes inputs of a recorded shape in a model's
dtype and device (``zeros_like_model``, ``to_model``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from convify.errors import ExampleInputError, UsageError, one_line
from convify.fx.copying import eval_mode
from convify.fx.shapes import meta_weights
from convify.wording import counted


def as_args(model: nn.Module, example_input: Any) -> tuple:
    """The example input as a tuple of positional arguments (probed if None),
    refused when the model cannot take its dtype or device (:func:`check_dtype_and_device`)."""
    if example_input is None:
        return (probe_input(model),)
    if isinstance(example_input, torch.Tensor):
        args: tuple = (example_input,)
    elif isinstance(example_input, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in example_input):
        args = tuple(example_input)
    else:
        raise ExampleInputError(
            f"example_input must be a tensor or a tuple of tensors, not {type(example_input).__name__}"
        )
    check_dtype_and_device(model, args)
    return args


def check_dtype_and_device(model: nn.Module, args: Sequence[torch.Tensor]) -> None:
    """Raise :class:`ExampleInputError` when ``model`` cannot take ``args``'
    dtype or device.

    Shapes are propagated on meta tensors, which skip the dtype and device
    checks of a real run: a float32 input to a float64 model would go through
    and the new modules would come out float32 inside a float64 network. So
    when a floating-point input's dtype, or any input's device, differs from
    the model's parameters (or the parameters themselves differ among each
    other), the model runs the input once for real, and the input is refused
    if that fails. A model that converts its input itself (``x.to(self.dtype)``)
    passes; the common case, an input like the model, costs nothing.

    >>> check_dtype_and_device(resnet18().double(), (torch.randn(1, 3, 64, 64),))
    Traceback (most recent call last):
    ExampleInputError: example_input is torch.float32 but ResNet's parameters are torch.float64 ...
    """
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not tensors:
        return
    dtypes = list(dict.fromkeys(t.dtype for t in tensors))
    devices = list(dict.fromkeys(t.device for t in tensors))
    if devices == [torch.device("meta")]:
        return  # a model without data runs nothing; its shapes are all that is asked of it
    differ = [i for i, t in enumerate(args) if (t.is_floating_point() and t.dtype not in dtypes)
              or t.device not in devices]
    if not differ and len(dtypes) == 1 and len(devices) == 1:
        return
    try:
        with torch.no_grad(), eval_mode(model):
            model(*args)
    except Exception as e:
        raise ExampleInputError(_foreign_input_message(model, args, differ, dtypes, devices, e)) from e


def _foreign_input_message(model: nn.Module, args: Sequence[torch.Tensor], differ: list[int],
                           dtypes: list[torch.dtype], devices: list[torch.device], error: Exception) -> str:
    name = type(model).__name__
    i = differ[0] if differ else 0
    x = args[i]
    what = "example_input" if len(args) == 1 else f"example_input[{i}]"
    has = " and ".join(map(str, dtypes))
    on = " and ".join(map(str, devices))
    cause = one_line(error)
    if not differ:  # the input is like some parameters, but the model mixes dtypes or devices
        return (f"{name} does not run on {what} ({x.dtype} on {x.device}); its parameters are {has} on {on} "
                f"({cause}); put the whole model in one dtype and device (model.to(...)) and pass an "
                "example_input like it")
    fixes, facts = [], []
    if x.is_floating_point() and x.dtype not in dtypes:
        facts.append(f"{what} is {x.dtype} but {name}'s parameters are {has}")
        fixes.append(f"{what}.to({dtypes[0]})")
    if x.device not in devices:
        facts.append(f"{what} is on {x.device} but {name}'s parameters are on {on}")
        fixes.append(f"{what}.to('{devices[0]}')")
    change = f"model.to({x.dtype})" if x.is_floating_point() and x.dtype not in dtypes else f"model.to('{x.device}')"
    return (f"{'; '.join(facts)}, and the model does not run on it ({cause}); pass {' and '.join(fixes)}, "
            f"or convert the model first ({change})")


def float_like(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's first floating-point parameter or buffer."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def zeros_like_model(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    """Zeros of ``input_shape`` in the model's floating dtype and device."""
    dtype, device = float_like(model)
    return torch.zeros(tuple(input_shape), dtype=dtype, device=device)


def to_model(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the model's device, in its dtype when ``x`` is floating point."""
    dtype, device = float_like(model)
    return x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)


_COMMON_SIZES = (224, 32, 28, 299, 64, 96, 128, 256)


def output_tensor(output: Any) -> torch.Tensor | None:
    """The main tensor of a model's output: the output itself, its ``logits`` (a Hugging Face ``ModelOutput``
    or a dict), or the first element of a tuple (timm, torchvision aux heads); None when there is none."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, dict) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output:
        return output_tensor(output[0])
    return None


def first_conv(model: nn.Module) -> nn.Module | None:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m
    return None


def _runs(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``model`` accepts ``x``: on meta tensors when that works (free),
    else for real."""
    try:
        with torch.no_grad(), eval_mode(model), meta_weights(model):
            model(x.to("meta"))
        return True
    except Exception:
        pass
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    except Exception:
        return False
    return True


def _pretrained_size(model: nn.Module) -> tuple[int, ...] | None:
    """timm's ``pretrained_cfg["input_size"]``: channels first, then the spatial size (``(3, 288, 288)``)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)):
        return tuple(int(d) for d in cfg["input_size"])
    return None


class _Stop(Exception):
    pass


def _flat_features(model: nn.Module, linear: nn.Linear, x: torch.Tensor) -> int | None:
    """Features arriving at ``linear`` for input ``x`` (stops the forward there)."""
    seen: list[int] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        seen.append(int(args[0].shape[-1]))
        raise _Stop

    handle = linear.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    except _Stop:
        pass
    except Exception:
        return None
    finally:
        handle.remove()
    return seen[0] if seen else None


def _solve_for_linear(model: nn.Module, make: Callable[[int], torch.Tensor]) -> torch.Tensor | None:
    """Find the size at which the first Linear receives its ``in_features``
    (a LeNet on 32x32, a VGG-style net on 64x64...). Features grow with the
    input size, so a binary search over sizes needs a handful of forwards."""
    linear = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        return None
    lo, hi = 1, 1024
    while lo < hi:
        mid = (lo + hi) // 2
        got = _flat_features(model, linear, make(mid))
        if got is None:  # too small to pass the feature extractor
            lo = mid + 1
        elif got < linear.in_features:
            lo = mid + 1
        else:
            hi = mid
    x = make(lo)
    return x if _runs(model, x) else None


def probe_input(model: nn.Module) -> torch.Tensor:
    """A batch-1 input the model accepts, worked out from the model itself.

    Channels and dimensionality come from the first convolution; the spatial
    size from timm's ``pretrained_cfg`` when there is one, else the first of the
    common sizes (224, 32, 28, 299, ...) that runs, else the size at which a
    flatten-then-Linear head receives its ``in_features``.
    """
    conv = first_conv(model)
    if conv is None:
        raise ExampleInputError(
            f"{type(model).__name__} has no convolution to read the input channels from; "
            "pass example_input=torch.randn(1, C, H, W)"
        )
    dims = len(conv.kernel_size)
    channels = conv.in_channels
    dtype, device = float_like(model)

    def make(size: int | Sequence[int]) -> torch.Tensor:
        spatial = (size,) * dims if isinstance(size, int) else tuple(size)
        return torch.randn(1, channels, *spatial, dtype=dtype, device=device)

    tried: list[str] = []
    pre = _pretrained_size(model)
    if pre is not None and len(pre) == dims + 1 and pre[0] == channels:
        x = make(pre[1:])
        if _runs(model, x):
            return x
        tried.append("x".join(map(str, pre[1:])))
    sizes = _COMMON_SIZES if dims < 3 else (16, 32, 64, 112)
    for size in sizes:
        x = make(size)
        if _runs(model, x):
            return x
        tried.append(str(size))
    solved = _solve_for_linear(model, make)
    if solved is not None:
        return solved
    raise ExampleInputError(
        f"could not find an input {type(model).__name__} accepts (tried {counted(channels, 'channel')} at sizes "
        f"{', '.join(tried)} and solving for its first Linear); pass example_input="
        f"torch.randn(1, {channels}, ...) of the size the model was built for"
    )


def parse_input_shape(text: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``."""
    if not isinstance(text, str):
        parts: Sequence[Any] = list(text)
    else:
        body = text.strip().strip("()[]")
        parts = [p.strip() for p in body.split("," if "," in body else "x")]
    try:
        shape = tuple(int(p) for p in parts)
    except (TypeError, ValueError) as e:
        raise UsageError(f"malformed input shape {text!r}: write N,C,H,W with whole numbers, "
                         "e.g. 1,3,224,224") from e
    if len(shape) < 3 or any(d <= 0 for d in shape):
        raise UsageError(f"malformed input shape {text!r}: give batch, channels and at least one "
                         "spatial size, all positive, e.g. 1,3,224,224")
    return shape
