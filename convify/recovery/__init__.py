"""Recovery for rewrites that are not exact. Recovery picks its sites through the typed records of a report
(``PoolRecord.conv``, ``HeadRecord``), never through a rewrite's name.

* ``calibration``: calibration batches, running one through a model, the pooling sites in forward order;
* ``fit``: ``init="fit"`` for the new pooling convolutions, and :func:`~convify.recovery.fit.calibrate_pass`;
* ``fit_heads``: ``init="fit"`` for the global-average heads;
* ``least_squares``: the ridge normal equations both fits solve;
* ``reconstruction``: ``convify.reconstruct``, block by block;
* ``blocks``: a reconstruction block, and running the model to its end;
* ``batchnorm_reestimation``: BatchNorm statistics for a drifted input;
* ``synthetic``: calibration images synthesized from BatchNorm statistics;
* ``distillation`` (a package): ``convify.distill``.
"""

#: ``calibration="synthetic"`` (``--calibration synthetic``): images synthesized from the
#: model's BatchNorm statistics instead of data (:mod:`convify.recovery.synthetic`).
SYNTHETIC = "synthetic"
