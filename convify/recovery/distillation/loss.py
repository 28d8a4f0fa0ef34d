"""What :func:`~convify.distill` minimizes: the softened KL divergence to the teacher (Hinton et al., 2015),
plus cross-entropy with the labels when the data has them, on the logits of each model's output."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from convify.errors import ConvifyError
from convify.fx.inputs import output_tensor


def logits_of(output: Any) -> torch.Tensor:
    """Classifier logits from a model output: a tensor (a ``N x classes x 1 x 1`` score map is flattened), a
    Hugging Face ``ModelOutput``'s ``logits``, or the first element of a tuple (timm, torchvision aux heads)."""
    logits = output_tensor(output)
    if logits is None:
        raise ConvifyError(f"distill: the model returned {type(output).__name__}, which holds no tensor of class "
                           "logits; distill a model that returns logits (or a tuple or ModelOutput holding them)")
    return logits.flatten(1) if logits.dim() > 2 else logits


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None,
                      temperature: float, alpha: float) -> torch.Tensor:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels)``
    (the KL term alone when there are no labels).

    >>> distillation_loss(torch.zeros(2, 3), torch.zeros(2, 3), None, 4.0, 0.9)
    tensor(0.)
    """
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    if labels is None:
        return kd
    return alpha * kd + (1.0 - alpha) * F.cross_entropy(student_logits, labels)
