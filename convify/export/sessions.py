"""onnxruntime sessions on a checked execution provider: a provider that cannot run is an error, never a quiet CPU run.

``verify`` and ``dense_map(..., onnx=...)`` open their sessions here.

>>> session = open_session("model.onnx", execution_provider("cuda"))
>>> session.get_providers()[0]
'CUDAExecutionProvider'
"""
from __future__ import annotations

import os
from typing import Any

from convify.errors import VerificationError, one_line

#: The provider names convify accepts, and onnxruntime's execution provider for each.
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def execution_provider(provider: str) -> str:
    """onnxruntime's execution provider for ``provider`` (``"cpu"`` or ``"cuda"``), checked to be
    installed: ``VerificationError`` (saying what to install) when it is not."""
    import onnxruntime as ort  # noqa: PLC0415  (heavy; loaded on first use)

    ep = PROVIDERS.get(provider.lower()) if isinstance(provider, str) else None
    if ep is None:
        raise VerificationError(f"provider must be 'cpu' or 'cuda', not {provider!r}")
    available = ort.get_available_providers()
    if ep not in available:
        raise VerificationError(
            f"provider={provider!r} needs onnxruntime's {ep}, which this onnxruntime {ort.__version__} does not "
            f"have (it has {', '.join(available)}). For CUDA, replace the CPU package with the GPU one "
            "(they cannot be installed together): pip uninstall onnxruntime && pip install onnxruntime-gpu")
    return ep


def open_session(path: str | os.PathLike, ep: str) -> Any:
    """An ``onnxruntime.InferenceSession`` on ``path`` that runs on ``ep`` (from :func:`execution_provider`);
    ``VerificationError`` when the file does not load or the session would run elsewhere."""
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the per-node placement warnings are noise here
    providers = [ep] if ep == "CPUExecutionProvider" else [ep, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:
        raise VerificationError(f"onnxruntime could not load {path} on {ep}: {one_line(e)}") from e
    got = session.get_providers()
    if not got or got[0] != ep:
        # onnxruntime drops a provider it cannot initialize (no GPU, missing CUDA or
        # cuDNN libraries) and runs on the CPU without an error: refuse that.
        raise VerificationError(
            f"onnxruntime was asked for {ep} but the session runs on {', '.join(got) or 'nothing'}: {ep} is "
            "installed but could not start (no GPU visible, or the CUDA/cuDNN libraries onnxruntime-gpu needs "
            "are missing); fix the CUDA setup or verify with provider='cpu'")
    return session
