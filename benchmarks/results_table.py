"""What the benchmarks share: the versions cell of a row, and appending rows to a section's table in RESULTS.md."""

from __future__ import annotations

from pathlib import Path


def versions() -> str:
    import diffusers
    import torch
    import transformers

    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"


def append_rows(path: Path, section: str, header: str, lines: list[str]) -> None:
    """Add ``lines`` at the end of the first table under ``section`` in ``path`` (the section and its ``header``
    created when missing); text and tables after it stay where they are."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n\n{header}\n|{' --- |' * (header.count(' | ') + 1)}\n"
    head, _, tail = text.partition(section)
    tail_lines = tail.split("\n")
    first = next(i for i, line in enumerate(tail_lines) if line.startswith("|"))  # the table's header
    end = next((i for i in range(first, len(tail_lines)) if not tail_lines[i].startswith("|")), len(tail_lines))
    path.write_text(head + section + "\n".join(tail_lines[:end] + lines + tail_lines[end:]))
