"""Telling a local path from a hub id, so that a mistyped local path is never looked up on the hub.

A string is taken as **local** when any of these holds, and then it must exist (the caller raises
``FileNotFoundError`` naming it, before any network call):

* it starts with ``./``, ``../``, ``/``, ``~`` or a Windows drive (``C:``), or contains a backslash;
* it exists on disk;
* it has more than one ``/`` (hub ids are ``name`` or ``org/name``), or is not a valid hub id at all
  (spaces, ``..``, ``--``: ``huggingface_hub``'s own check);
* its first component is an existing folder (``models/x`` while ``./models`` exists), or one of the hub's own
  top-level names, which no user or organisation can take (``models/``, ``datasets/``, ``spaces/``).

Everything else (``org/name``, ``name``) is a hub id. ``~`` is expanded wherever latentsd takes a path.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["expand", "looks_local"]

HUB_RESERVED = ("models", "datasets", "spaces")
LOCAL_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")


def expand(path: str | os.PathLike) -> str:
    """``path`` with a leading ``~`` expanded (a hub id or plain path comes back unchanged)."""
    return os.path.expanduser(os.fspath(path))


def looks_local(src: str | os.PathLike) -> bool:
    """True when ``src`` can only mean a local path (see the module docstring for the rule)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    text = os.fspath(src).strip()
    if text in (".", "..") or text.startswith(LOCAL_PREFIXES) or "\\" in text or (len(text) > 1 and text[1] == ":"):
        return True
    if Path(expand(text)).exists():
        return True
    first, _, rest = text.partition("/")
    if rest and (first in HUB_RESERVED or Path(first).is_dir()):
        return True
    try:
        validate_repo_id(text)
    except HFValidationError:
        return True
    return False
