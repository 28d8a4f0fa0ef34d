"""Dense scanning: score maps of images of any size, in tiles whose stitched map equals the one-pass map.

* :mod:`convify.dense.scanning`: ``dense_map`` and ``scan`` (run the tiles, stitch the map), ``is_dense``;
* :mod:`convify.dense.tiles`: where the tiles start and end, and the memory budget that sizes them;
* :mod:`convify.dense.runners`: the PyTorch, onnxruntime and ``torchrun`` runners of the tiles;
* :mod:`convify.dense.stitching`: running a plan's tiles and stitching the outputs each owns;
* :mod:`convify.dense.onnx_scan`, :mod:`convify.dense.onnx_geometry`: a dense ONNX model scanned in an
  onnxruntime session, its geometry read from its graph (imported only when an ONNX model is given);
* :mod:`convify.dense.images`: reading an image file, turning pixels into model input;
* :mod:`convify.dense.heatmaps`: a score map drawn over its image;
* :mod:`convify.dense.geometry`: the receptive field (stride, size, offset) of a dense model's graph;
* :mod:`convify.dense.matmul`: the opt-in GEMM form of a dense head (``matmul_heads``).

>>> scores = convify.dense_map(dense, "slide.tiff", tile=1024)   # (1, K, H', W'), as dense(image[None])
"""
from __future__ import annotations

from convify.dense.heatmaps import HEATMAP_SIDE, class_colours, colormap, heatmap
from convify.dense.images import load_image
from convify.dense.scanning import Scan, dense_map, is_dense, scan
from convify.dense.tiles import (ACTIVATION_FACTOR, CPU_BUDGET_CAP, Span, Tile, TilePlan, bytes_per_pixel, default_tile,
                                 memory_budget, minimum_tile, output_size, plan_axis, plan_tiles, tile_plan)

__all__ = [
    "dense_map", "scan", "Scan", "is_dense", "load_image", "heatmap", "colormap", "class_colours", "HEATMAP_SIDE",
    "tile_plan", "plan_tiles", "plan_axis", "minimum_tile", "default_tile", "output_size", "bytes_per_pixel",
    "memory_budget", "Span", "Tile", "TilePlan", "CPU_BUDGET_CAP", "ACTIVATION_FACTOR",
]
