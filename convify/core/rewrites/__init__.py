"""One file per built-in rewrite, each declaring its ``SPEC`` (options,
keyword, order, ONNX ops) and the typed records its sites leave. No graph
type appears here; :mod:`convify.core.registry` registers them all."""
