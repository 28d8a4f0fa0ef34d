"""The frontend-neutral core: what a rewrite is, what it records, its weight math.

Nothing here knows a graph type (import-linter checks that ``core`` imports
neither ``torch.fx`` nor an ONNX package):

* :mod:`.options`: a rewrite's options, declared once as a checked dataclass;
* :mod:`.spec` and :mod:`.registry`: a rewrite's declaration
  (:class:`~.spec.RewriteSpec`: name, options, keyword, order, ONNX ops) and
  the one registry of them;
* :mod:`.rewrites`: one file per built-in rewrite, each with its ``SPEC`` and
  the typed records its sites leave (``PoolParams``, ``PoolRecord`` and the
  pooling modes; ``HeadRecord``);
* :mod:`.weights`: the pure weight math; :mod:`.metrics`: top-1 agreement;
* :mod:`.report`: the typed rows of a report.

A frontend (``convify.fx`` for PyTorch modules) implements these rewrites on
its own graphs and reuses the records and the math.
"""
