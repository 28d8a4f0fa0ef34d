"""Every MaxPool node case of ONNX's backend tests (``onnx.backend.test.case.node``, generated offline),
rewritten with mode="exact" in each form, grouped and ungrouped: where replaced, onnxruntime gives the case's
expected output; where skipped, for the right reason."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest

from convify.core.maxtree import TreeForm
from convify.core.rewrites.maxpool import MaxPoolOptions
from convify.onnx.engine import report_of, rewrite_onnx
from convify.onnx.files import to_proto

from onnx_models import rel, run


def _cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # other ops' generators overflow casts on purpose
        return {c.name: c for c in collect_testcases("MaxPool")}


CASES = _cases()

#: The cases whose site must stay, and why.
SKIPPED = {"test_maxpool_2d_uint8": "its input is UINT8",
           "test_maxpool_with_argmax_2d_precomputed_pads": "Indices output is used",
           "test_maxpool_with_argmax_2d_precomputed_strides": "Indices output is used"}


def test_the_cases_are_there():
    assert len(CASES) >= 19 and set(SKIPPED) <= set(CASES)
    assert {"test_maxpool_2d_same_lower", "test_maxpool_2d_ceil_output_size_reduce_by_one",
            "test_maxpool_3d_dilations_use_ref_impl_large"} <= set(CASES)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped", "ungrouped"])
@pytest.mark.parametrize("form", [f.value for f in TreeForm])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_backend_case_rewritten_exactly(name, form, grouped):
    case = CASES[name]
    new = to_proto(rewrite_onnx(case.model, MaxPoolOptions(mode="exact", exact_form=form, grouped=grouped)))
    onnx.checker.check_model(new, full_check=True)
    rep = report_of(new)
    if name in SKIPPED:
        assert not rep.replaced and SKIPPED[name] in rep.skipped[0].reason
        assert new.graph.node == case.model.graph.node
        return
    assert len(rep.replaced) == 1 and not rep.skipped, rep
    assert "MaxPool" not in {n.op_type for n in new.graph.node}
    for inputs, expected in case.data_sets:
        got = run(new, *inputs)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.dtype == e.dtype and rel(g, np.asarray(e)) <= 1e-5
