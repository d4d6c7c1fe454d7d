"""What the benchmark scripts share when they report: the machine line, and writing a marked block of
benchmarks/RESULTS.md (`<!-- tag:begin -->` ... `<!-- tag:end -->`) atomically."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from src.atomic import write_bytes_atomic

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
    write_bytes_atomic(path, md.encode())


def machine(device: torch.device | str = "cpu") -> str:
    """The CPU model, its cores, torch and its thread count; the GPU first when `device` is CUDA."""
    device = torch.device(device)
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, torch threads: {torch.get_num_threads()}"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}; host {text}"
    return text
