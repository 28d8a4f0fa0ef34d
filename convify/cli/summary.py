"""What inspect, rewrite and verify print about a rewrite: the report of the
passes this run added, a summary (one headline, or JSON) and the verification."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from convify.cli.console import note, shape_text
from convify.wording import counted

if TYPE_CHECKING:
    import torch.nn as nn

    from convify.core.report import Report
    from convify.io import ModelSource


def report_of(model: "nn.Module", src: "ModelSource | None" = None) -> "Report":
    """The model's report; with ``src``, only the passes this run added (a
    convify checkpoint arrives with the passes it was made with)."""
    from convify.core.report import report  # noqa: PLC0415

    rep = report(model)
    return rep if src is None else rep.since(report(src.model))


def rewrite_summary(src: "ModelSource", rewritten: "nn.Module", options: dict[str, Any], shape: tuple[int, ...]
                    ) -> dict[str, Any]:
    return {
        "model": src.label,
        "arch": str(src.arch) if src.arch is not None else None,
        "input_shape": list(shape),
        "rewrite": options,
        "parameters": {"before": _count(src.model), "after": _count(rewritten)},
        "replaced": len(report_of(rewritten, src).replaced),
        "nothing_to_rewrite": not report_of(rewritten, src).replaced,
    }


def headline(summary: dict[str, Any]) -> str:
    """A :func:`rewrite_summary` on one line."""
    opts = " ".join(f"{k}={v}" for k, v in summary["rewrite"].items() if v not in (None, False))
    params = summary["parameters"]
    return (f"{summary['model']}  input {shape_text(summary['input_shape'])}  {opts}  "
            f"parameters {params['before']:,} -> {params['after']:,}")


def _count(model: "nn.Module") -> int:
    return sum(p.numel() for p in model.parameters())


def note_if_nothing(rep: "Report", src: "ModelSource", written: str | None = None) -> None:
    """Say so when nothing was replaced (and that ``written`` then holds the model unchanged); callers say it
    before anything else, so that it is the first line a user reads."""
    if not rep.replaced:
        copy = f"; {written} holds the model unchanged" if written else ""
        note(f"nothing to rewrite in {src.label}: no max pooling or Linear head was replaced "
             f"({counted(len(rep.skipped), 'site')} skipped, see the report){copy}")


def verification_dict(verification: Any) -> dict[str, Any] | None:
    if verification is None:
        return None
    to_dict = getattr(verification, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return {"passed": bool(verification.passed), "table": str(verification)}
