"""benchmarks/RESULTS.md holds one section per benchmark script; each script
replaces only its own section (between ``<!-- name -->`` markers), so the
file stays one document and no run erases another's measurements."""
from __future__ import annotations

import re
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")
_HEADER = ("# Benchmark results\n\nMeasured by the scripts in this folder, side by side in one process; each "
           "section says how and under what load. Rerun a script with `--write` to replace its section.\n")


def write_section(name: str, markdown: str, path: Path = RESULTS) -> Path:
    """Put ``markdown`` in ``path`` as the section ``name`` (replacing an older one)."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}\n"
    text = path.read_text() if path.exists() else _HEADER
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
    return path
