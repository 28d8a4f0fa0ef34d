"""The ONNX frontend: the core's rewrites applied to ONNX graphs, through onnx-ir.

A sibling of :mod:`convify.fx` (neither imports the other): it reads a model
(:mod:`.files`), reads its values (:mod:`.values`), proves signs
(:mod:`.nonnegative`) and applies each rewrite's ONNX implementation
(:mod:`.rewrites`), keeping every node it does not rewrite as it was.
"""
