"""A contract type import-linter lacks: no import of a *submodule* of an outside package.

import-linter's graph squashes an outside package into its top level
(``torch.fx`` is ``torch``), so its forbidden contract can forbid ``onnx`` but
not ``torch.fx`` while allowing ``torch``. This one reads the import lines of
each module instead: ``import torch.fx``, ``from torch.fx import ...`` and
``from torch import fx`` all break it. Direct imports only: ``torch`` itself
imports ``torch.fx``, and convify's own modules are covered by the layers.
"""
from __future__ import annotations

import re

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain import fields
from importlinter.domain.contract import Contract, ContractCheck


def imports_submodule(line: str, dotted: str) -> bool:
    """Whether one import line imports ``dotted`` (``a.b``) or something inside it."""
    parent, _, child = dotted.rpartition(".")
    name = re.escape(dotted)
    if re.match(rf"\s*(import|from)\s+{name}(\.|\s|$|,)", line):
        return True
    imported = re.match(rf"\s*from\s+{re.escape(parent)}\s+import\s+\(?([^#]*)", line)
    return bool(imported) and child in {n.split(" as ")[0].strip(" ()") for n in imported.group(1).split(",")}


class ForbiddenSubmoduleContract(Contract):
    """``source_modules`` (and their descendants) import none of ``forbidden_modules`` (dotted submodules of
    outside packages, such as ``torch.fx``)."""

    type_name = "forbidden_submodules"

    source_modules = fields.ListField(subfield=fields.ModuleField())
    forbidden_modules = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        broken = []
        for source in self.source_modules:  # type: ignore[attr-defined]
            for module in sorted({source.name} | graph.find_descendants(source.name)):
                for forbidden in self.forbidden_modules:  # type: ignore[attr-defined]
                    top = forbidden.split(".")[0]
                    if top not in graph.modules:
                        continue
                    for found in graph.get_import_details(importer=module, imported=top):
                        if imports_submodule(found["line_contents"], forbidden):
                            broken.append({"module": module, "line": found["line_number"], "forbidden": forbidden,
                                           "text": found["line_contents"]})
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for b in check.metadata["broken"]:
            output.print_error(f"{b['module']} (l.{b['line']}) imports {b['forbidden']}: {b['text']}")
            output.new_line()
