"""Write a benchmark's markdown table into the README between its markers.

The README holds ``<!-- bench:KEY -->`` … ``<!-- /bench:KEY -->``; ``--readme`` on a benchmark
replaces what is between them, so the figures there are always a script's output.
"""
from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def machine() -> str:
    """Where the figures came from, in words."""
    import os

    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__.split('+')[0]}"


def update_readme(key: str, markdown: str) -> None:
    text = README.read_text()
    pattern = re.compile(rf"(<!-- bench:{key} -->\n).*?(<!-- /bench:{key} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- bench:{key} --> section")
    README.write_text(pattern.sub(lambda m: m.group(1) + markdown.rstrip() + "\n" + m.group(2), text))
