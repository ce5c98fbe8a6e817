"""Checks of a dataset's text before training: errors that name the file and line, and rows without captions.

* :func:`check_text_files` reads a local dataset's text files (an imagefolder's ``metadata.jsonl`` /
  ``metadata.csv``, or a ``.jsonl`` / ``.json`` / ``.csv`` table) before ``datasets`` does, and raises a
  :class:`~latentsd.errors.UserError` naming the file, the first bad lines and the fix for bytes that are not
  UTF-8 and for JSON lines that do not parse (``datasets`` names neither the file nor the line).
* :func:`load_error` turns what ``datasets`` raises while reading local files into one line naming the files.
* :func:`missing_caption_rows` finds rows whose caption is null or an empty list (a JSON line without the
  field), for ``data.missing_caption``.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError

logger = logging.getLogger(__name__)

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")  # what datasets' imagefolder reads captions from
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
SHOWN = 5  # bad lines named in an error


def text_files(path: Path) -> list[Path]:
    """The local text files ``datasets`` will parse for ``path``: the file itself, or an imagefolder's metadata."""
    if path.is_file():
        return [path] if path.suffix.lower() in TEXT_SUFFIXES else []
    if not path.is_dir():
        return []
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root) / name for name in files if name in METADATA_NAMES]
    return sorted(found)


def check_text_files(path: Path) -> list[Path]:
    """Raise :class:`UserError` for a text file of ``path`` that is not UTF-8 or not JSON; returns the files."""
    files = text_files(path)
    for file in files:
        check_text_file(file)
    return files


def check_text_file(file: Path) -> None:
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(file, data) from None
    if file.suffix.lower() == ".jsonl" or (file.suffix.lower() == ".json" and not _whole_json(text)):
        _check_json_lines(file, data, text)


def _not_utf8(file: Path, data: bytes) -> UserError:
    bad = []
    for number, line in enumerate(data.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.append(f"{number} (byte {line[err.start:err.start + 1]!r} at column {err.start + 1})")
    return UserError(f"{file}: {len(bad)} line(s) are not UTF-8 text: line {_first(bad)}. Save the file as UTF-8 "
                     f"(for Windows/Latin-1 text: iconv -f cp1252 -t utf-8 {file.name} > fixed && mv fixed "
                     f"{file.name}), or fix those lines")


def _whole_json(text: str) -> bool:
    """A ``.json`` file holding one JSON document (an array of rows, or an object) rather than JSON lines."""
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _check_json_lines(file: Path, data: bytes, text: str) -> None:
    import pyarrow.json as pa_json

    try:  # fast path: the parser datasets uses
        pa_json.read_json(io.BytesIO(data))
        return
    except Exception:  # noqa: BLE001 - locate the line below; pyarrow's row numbers are per block
        pass
    bad = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            bad.append(f"{number} ({err.msg} at column {err.colno})")
            continue
        if not isinstance(row, dict):
            bad.append(f"{number} (a {type(row).__name__}, not an object)")
    if bad:
        raise UserError(f"{file}: {len(bad)} line(s) are not JSON objects: line {_first(bad)}. Each line must be one "
                        'object such as {"file_name": "0001.png", "text": "a caption"}')


def _first(items: Sequence[str]) -> str:
    shown = ", ".join(items[:SHOWN])
    return shown + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def load_error(src: str, files: Sequence[Path], err: BaseException) -> UserError:
    """What ``datasets`` raised while reading local ``files``, as one line naming them and the cause."""
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:  # DatasetGenerationError wraps the real one
        cause = cause.__cause__ or cause.__context__
    why = " ".join(str(cause).split()) or type(cause).__name__
    where = ", ".join(map(str, files[:3])) if files else src
    return UserError(f"data.dataset={src!r}: {where} could not be read ({type(cause).__name__}: {why}); fix the "
                     "file (every row needs the same columns; captions as strings), or see "
                     "https://huggingface.co/docs/datasets/image_dataset for the layout")


def is_missing(caption: Any) -> bool:
    """A caption cell that holds no caption: null, or an empty list (``""`` is a caption: the empty one)."""
    return caption is None or (isinstance(caption, (list, tuple)) and len(caption) == 0)


def missing_caption_rows(ds, column: str) -> list[int]:
    """Row indices (of a map-style ``datasets.Dataset``) whose caption is null or an empty list; one Arrow pass."""
    import pyarrow as pa
    import pyarrow.compute as pc

    values = ds.with_format("arrow")[column]
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    missing = pc.is_null(values)
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        missing = pc.or_(missing, pc.equal(pc.fill_null(pc.list_value_length(values), 0), 0))
    return pc.indices_nonzero(missing).to_pylist()


def missing_caption_error(source: str, rows: Sequence[int], names: Sequence[str], total: int) -> UserError:
    return UserError(f"data.dataset={source!r}: {len(rows)} of {total} rows have no caption: {_rows(rows, names)}. "
                     "Add their captions (or an empty string \"\" on purpose), or set data.missing_caption=empty to "
                     "train them unconditioned")


_warned: set[str] = set()  # sources already warned about in this process (a holdout view is not warned again)


def warn_missing_captions(source: str, rows: Sequence[int], names: Sequence[str], total: int) -> None:
    """One warning per process and ``data.dataset``; the count also goes to the run's summary."""
    if source in _warned:
        return
    _warned.add(source)
    logger.warning("data.dataset=%r: %d of %d rows have no caption (%s): they train with the empty caption '' "
                   "(unconditioned); set data.missing_caption=error to stop instead", source, len(rows), total,
                   _rows(rows, names))


def _rows(rows: Sequence[int], names: Sequence[str]) -> str:
    return _first([f"row {r}" + (f" ({n})" if n else "") for r, n in zip(rows, names)])


def unreadable_error(source: str, failed: Sequence[tuple[int, str, BaseException]], tried: int,
                     total: int) -> UserError:
    """Every one of ``tried`` images in a row failed (``failed``: the first of them as (row, name, error)): the
    whole dataset of ``total`` images, or a long run of it, is unreadable."""
    names = ", ".join(name for _, name, _ in failed[:SHOWN])
    err = failed[0][2]
    scope = f"none of the {total} images could be read" if tried >= total else \
        f"{tried} consecutive images from row {failed[0][0]} could not be read"
    return UserError(f"data.dataset={source!r}: {scope} (the first: {names}; {type(err).__name__}: "
                     f"{' '.join(str(err).split())[:160]}). Check that the files exist and are images (a few corrupt, "
                     "truncated, empty or missing files are skipped and counted; this many means the paths or the "
                     "files are wrong)")
