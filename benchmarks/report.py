"""Write a benchmark's tables into its own section of a docs/ file.

Each benchmark owns one section, delimited by HTML comments, so several benchmarks can
rewrite docs/RESULTS.md or docs/BENCHMARKS.md without clobbering each other.
"""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"


def machine() -> str:
    """One line naming where the figures were measured."""
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {'cuda' if torch.cuda.is_available() else 'cpu'}"
    )


def write_section(doc: str, name: str, markdown: str) -> Path:
    """Replace (or append) the section `name` of docs/<doc> with `markdown`."""
    path = DOCS / doc
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    title = "# Results" if doc == "RESULTS.md" else "# Benchmarks"
    text = path.read_text() if path.exists() else f"{title}\n\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text + f"\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def fmt(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
