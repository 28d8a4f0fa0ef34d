"""Knowledge distillation of a rewritten model toward the original (``convify.distill``).

The rewrite replaces max pooling (non-linear) by strided convolution (linear),
so a trained model loses some accuracy; ``distill`` trains the rewritten
*student* to reproduce the original *teacher*'s softened outputs (Hinton et
al., 2015), plus the labels when the data has them. Runs unchanged under
``torchrun``. The modules:

* ``api``: :func:`distill`, its arguments checked;
* ``run``: one run (``_Run``): epochs, steps, schedule, evaluation;
* ``loss``: :func:`distillation_loss` and the logits it reads;
* ``speed``: ``precision=`` (:data:`PRECISIONS`), ``channels_last=``, ``workers=``, ``compile=``;
* ``distributed``: the ranks under ``torchrun``;
* ``data``: loaders and batches; ``images``: a folder of images as a Dataset (:func:`image_folder`);
* ``checkpoint``: saving, resuming, :func:`load_checkpoint`; ``history``: :class:`History`.
"""
from __future__ import annotations

from convify.recovery.distillation.api import distill
from convify.recovery.distillation.checkpoint import CHECKPOINT_NAME, load_checkpoint
from convify.recovery.distillation.history import History
from convify.recovery.distillation.images import ImageFiles, image_folder, image_transform
from convify.recovery.distillation.loss import distillation_loss
from convify.recovery.distillation.run import SCHEDULES, _Run
from convify.recovery.distillation.speed import PRECISIONS, _autocasts

__all__ = ["History", "distill", "distillation_loss", "load_checkpoint", "CHECKPOINT_NAME", "SCHEDULES", "PRECISIONS",
           "ImageFiles", "image_folder", "image_transform"]
# Reached here by the tests and the command line's tests: they patch ``_Run.check_every_step`` and ask
# ``_autocasts`` which precisions this machine runs.
__all__ += ["_Run", "_autocasts"]
