"""Export to ONNX and verification in onnxruntime.

* :mod:`convify.export.onnx`: ``export_onnx`` and ``export``, one self-contained, checked ONNX file;
* :mod:`convify.export.quiet`: running an exporter without its prints and warnings;
* :mod:`convify.export.sessions`: onnxruntime sessions on a checked execution provider;
* :mod:`convify.export.census`: the ONNX op census and the checks each rewrite declares on it;
* :mod:`convify.export.comparison`: export fidelity and equivalence of outputs, and their tolerance;
* :mod:`convify.export.verify`: ``verify`` and its :class:`~convify.export.verify.Verification` table.

Nothing here imports :mod:`convify.dense` or :mod:`convify.demo`; they import this package.
"""
