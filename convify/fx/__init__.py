"""The torch.fx frontend: the core's rewrites applied to PyTorch modules.

Tracing (with a fallback for untraceable models), shape propagation, node and
submodule helpers, the op tables, example inputs, the engine that runs one
rewrite over a model, and under ``rewrites/`` one implementation per rewrite
of the core's registry.
"""
