"""Report rows, tables and JSON."""
from __future__ import annotations

import json

import torch
import torch.nn as nn

import convify
from convify.core.report import Pass, Replaced, Report, Skipped, Untraced, format_table


def test_table_and_dict_cover_every_row():
    rep = Report((Pass("maxpool", {"mode": "conv"},
                       replaced=(Replaced("maxpool", "features.2", "MaxPool2d(k=2, s=2)", "Conv2d(8, 8, k=2, s=2)",
                                          (1, 8, 4, 4), (1, 8, 2, 2), False, "features.2"),),
                       skipped=(Skipped("maxpool", "pool", "MaxPool2d", "indices are used"),),
                       untraced=(Untraced("", "TraceError: control flow"),),
                       notes=("a note",)),))
    text = str(rep)
    for needle in ["1 replaced, 1 skipped", "features.2", "1x8x4x4", "indices are used", "<model>",
                   "control flow", "note: a note"]:
        assert needle in text
    data = json.loads(json.dumps(rep.to_dict()))
    assert data["passes"][0]["replaced"][0]["in_shape"] == [1, 8, 4, 4]
    assert data["passes"][0]["skipped"][0]["reason"] == "indices are used"
    assert data["exact"] is False


def test_report_of_plain_model_is_empty_and_passes_accumulate():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)).eval()
    assert convify.report(model).passes == ()
    once = convify.replace_maxpool(model, torch.randn(1, 3, 8, 8))
    twice = convify.replace_maxpool(once, torch.randn(1, 3, 8, 8))
    assert [p.rewrite for p in convify.report(twice).passes] == ["maxpool", "maxpool"]
    assert len(convify.report(twice).replaced) == 1
    assert "nothing to rewrite" in str(convify.report(twice))


def test_format_table_aligns_columns():
    table = format_table(["a", "bb"], [["xxx", "y"], ["z", "wwww"]])
    lines = table.splitlines()
    assert lines[0].index("bb") == lines[2].index("y") == lines[3].index("wwww")


def test_report_travels_with_deepcopy_and_pickle_of_a_graph_module():
    import copy
    import pickle

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)).eval()
    rewritten = convify.replace_maxpool(model, torch.randn(1, 3, 8, 8))
    assert isinstance(rewritten, torch.fx.GraphModule)
    for twin in (copy.deepcopy(rewritten), pickle.loads(pickle.dumps(rewritten))):
        assert [r.name for r in convify.report(twin).replaced] == ["1"]


def test_a_pickled_report_is_plain_data_that_reads_back_typed():
    import pickle
    import pickletools

    from convify.core.report import attach
    from convify.core.rewrites.head import HeadRecord
    from convify.core.rewrites.maxpool import PoolRecord

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(36, 5)).eval()
    rep = convify.report(convify.convify(model, torch.randn(1, 3, 8, 8)))
    holder = nn.Module()  # a model that carries the report as convify.attach sets it
    attach(holder, rep)
    dumped = pickle.dumps(holder)
    named = {arg for op, arg, _ in pickletools.genops(dumped) if isinstance(arg, str)}
    assert not any(n.startswith("convify") for n in named)  # no convify module, class or enum
    loaded = pickle.loads(dumped)
    assert isinstance(loaded._convify_report, dict)
    back = convify.report(loaded)
    assert back == rep
    assert isinstance(back.replaced[0].detail, PoolRecord) and isinstance(back.replaced[1].detail, HeadRecord)
    assert Report.from_dict(json.loads(json.dumps(rep.to_dict()))) == rep
