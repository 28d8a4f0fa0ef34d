"""The ONNX op census: op-type counts of an exported file, and what each rewrite's census must show.

A rewrite declares the ONNX op types it removes (``spec.onnx_ops``); after it
replaced sites, those op types must drop by as many as its sites removed: no
``MaxPool`` left after ``replace_maxpool``, no ``Gemm``/``MatMul`` left from a
converted head; and the op types it declares it never adds (``spec.onnx_ops_not_added``:
``Max``, ``ReduceMax``, ``TopK``, ``ArgMax`` for max pooling) must not grow.
``verify`` reports one :class:`CensusCheck` per such expectation.

>>> census_checks(convify.report(rewritten), op_census("original.onnx"), op_census("rewritten.onnx"))
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from convify.core.report import Report
from convify.wording import counted


def op_census(path: str | os.PathLike) -> dict[str, int]:
    """Op-type counts of an ONNX file, subgraphs and local functions included.

    >>> op_census("model.onnx")["Conv"]
    20
    """
    from convify.onnx.files import read_skeleton  # noqa: PLC0415  (the graph only: the weights stay in the file)

    proto = read_skeleton(path)
    counts: dict[str, int] = {}
    functions = {(f.domain, f.name): f for f in proto.functions}

    def visit(nodes: Sequence[Any]) -> None:
        for node in nodes:
            fn = functions.get((node.domain, node.op_type))
            if fn is not None:  # dynamo may keep modules as local functions: count what they contain
                visit(fn.node)
                continue
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    visit(attr.g.node)
                for g in attr.graphs:
                    visit(g.node)

    visit(proto.graph.node)
    return dict(sorted(counts.items()))


@dataclass(frozen=True)
class CensusCheck:
    """One expectation on the op counts of the exported graphs."""

    ops: tuple[str, ...]
    original: int | None
    rewritten: int
    at_most: int
    why: str

    @property
    def passed(self) -> bool:
        return self.rewritten <= self.at_most


def census_checks(rep: Report, before: Mapping[str, int] | None, after: Mapping[str, int]) -> list[CensusCheck]:
    """One check per rewrite that replaced something: the ONNX op types it
    declares it removes must drop by as many as its sites removed."""
    from convify.core.registry import in_order  # noqa: PLC0415

    checks = []
    for spec in in_order():
        rows = [r for r in rep.replaced if r.rewrite == spec.name]
        if not rows or not spec.onnx_ops:
            continue
        removed = sum(spec.onnx_ops_removed(r) for r in rows)
        checks.append(_expect_fewer(spec.onnx_ops, before, after, removed,
                                    f"{counted(len(rows), f'{spec.name} site')} replaced, "
                                    f"{counted(removed, 'op')} removed"))
        if spec.onnx_ops_not_added:
            checks.append(_expect_fewer(spec.onnx_ops_not_added, before, after, 0,
                                        f"the {spec.name} sites add none of them"))
    return checks


def _expect_fewer(ops: tuple[str, ...], before: Mapping[str, int] | None, after: Mapping[str, int],
                  removed: int, why: str) -> CensusCheck:
    now = sum(after.get(op, 0) for op in ops)
    if before is None:
        return CensusCheck(ops, None, now, now, why + "; original census missing, not checked")
    was = sum(before.get(op, 0) for op in ops)
    return CensusCheck(ops, was, now, max(0, was - removed), why)
