"""The frontend-neutral core: what a rewrite is, what it records, its weight math.

Nothing here knows a graph type. ``core`` declares the rewrites (their
names, options, keywords and order: :mod:`convify.core.registry`), the typed
records a rewritten site leaves (:mod:`convify.core.pooling`,
:mod:`convify.core.head`), the pure weight math (:mod:`convify.core.weights`)
and the report (:mod:`convify.core.report`). A frontend (``convify.fx`` for
PyTorch modules) applies these rewrites to its own graphs and reuses the
records and the math; import-linter checks that ``core`` imports neither
``torch.fx`` nor ``onnx``.
"""
