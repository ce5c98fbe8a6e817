"""Atomic writes: the one file writer and the one folder writer (generation and training both use them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def write_file_atomically(final: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a hidden temp file beside ``final``, then rename it over ``final``.

    Readers see the old file or the complete new one, never half a file; a failed write leaves no temp file.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Write into a hidden temp folder, then rename over ``final``: readers never see half a folder."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():  # os.replace cannot overwrite a non-empty folder: move the old one aside first
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
