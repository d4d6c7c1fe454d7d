"""Replace a marked block of benchmarks/RESULTS.md (`<!-- tag:begin -->` ... `<!-- tag:end -->`), atomically."""

from __future__ import annotations

import os
import re
from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def write_block(tag: str, text: str, new_section: str = "", path: Path = RESULTS_MD) -> None:
    """Put `text` between the tag's markers; a file without them gets `new_section` and the block appended."""
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    md = path.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in md:
        md = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, md, flags=re.S)
    else:
        md = md.rstrip() + "\n\n" + new_section + block + "\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(md)
    os.replace(tmp, path)
