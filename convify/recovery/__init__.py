"""Recovery for rewrites that are not exact: calibration batches, the
least-squares fit (``init="fit"``), block reconstruction, synthetic
calibration images and distillation. Recovery picks its sites through the
typed records of a report, never through a rewrite's name."""

#: ``calibration="synthetic"`` (``--calibration synthetic``): images synthesized from the
#: model's BatchNorm statistics instead of data (:mod:`convify.recovery.synthetic`).
SYNTHETIC = "synthetic"
