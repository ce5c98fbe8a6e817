"""Atomic writes: the one way latentsd writes a file or a folder (checkpoints, exports, cache shards and indexes,
LoRA files, grids and their sidecars, configs, reports). Generation and training both use it.

Everything is first written under a hidden temp name beside its target, ``.tmp-<name>-<host>-<pid>``, and then
renamed over the target, so a reader (or ``resume=latest``) sees the old version or the complete new one,
never half of one. A write that fails (disk full, an exception) removes its temp and leaves the old version
untouched. A killed process cannot clean up: every writer first removes the temps that dead processes of this
host left in the folder it writes to (temps of other hosts on a shared filesystem are theirs to clean).
Folders are swapped in two renames (old aside as ``.old-<name>-<host>-<pid>``, new in place); a kill between
them leaves no folder at ``<name>``, and the next writer there moves the old one back.

Append-only logs (``metrics.jsonl``) are appended to in place: a line is either written or not, and a resume
trims what it repeats.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from .errors import UserError


HOST = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"
_STALE = re.compile(rf"^\.(tmp|old)-(.+)-{HOST}-(\d+)$")
# what a full disk (or quota, or a file-size limit) says: as an OSError, or inside a C/Rust library's message
_NO_ROOM_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NO_ROOM_TEXT = re.compile(r"No space left on device|Disk quota exceeded|File too large|os error (28|122|27)\b")


class DiskFullError(UserError, OSError):
    """A write ran out of room; the previous version of the target is intact (an OSError too, as the original)."""


def temp_path(final: str | Path, kind: str = "tmp") -> Path:
    """The hidden name this process writes ``final`` under before renaming it into place."""
    final = Path(final)
    return final.parent / f".{kind}-{final.name}-{HOST}-{os.getpid()}"


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temps that dead processes of this host left in ``folder`` (a folder whose swap a kill interrupted
    gets its old version back); returns what was removed or restored."""
    folder = Path(folder)
    done = []
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name.startswith(".tmp-"))  # .old- first: restore
    except (FileNotFoundError, NotADirectoryError):
        return done
    for entry in entries:
        match = _STALE.match(entry.name)
        if not match or _alive(int(match.group(3))):
            continue
        kind, name = match.group(1), match.group(2)
        if kind == "old" and not (folder / name).exists():
            os.replace(entry, folder / name)  # killed between the two renames of a folder swap
        else:
            _remove(entry)
        done.append(entry)
    return done


def _alive(pid: int) -> bool:
    if pid == os.getpid():  # ours: maybe in progress (another thread); a new write of the same target replaces it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _prepare(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(final.parent)
    tmp = temp_path(final)
    _remove(tmp)
    return tmp


def _free(where: Path) -> int | None:
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def no_room(err: BaseException, target: str | Path) -> DiskFullError | None:
    """A :class:`DiskFullError` with the fix when ``err`` means the disk (quota, file-size limit) is full, else None.

    torch.save's zip writer reports a full disk without the reason: that counts when under 64 MiB are left."""
    where = Path(target).parent
    free = _free(where)
    said = (isinstance(err, OSError) and err.errno in _NO_ROOM_ERRNOS) or _NO_ROOM_TEXT.search(str(err))
    torch_writer = "inline_container" in str(err) or "PytorchStreamWriter" in str(err)
    if not (said or (torch_writer and free is not None and free < 64 * 2**20)):
        return None
    free = "free space unknown" if free is None else f"{free / 2**30:.2f} GiB free there now"
    return DiskFullError(f"no room left while writing {target} ({err}; {free}): nothing was replaced, the previous "
                         f"version (if any) is intact. Free some space in {where} or write somewhere else "
                         "(e.g. output_dir=/a/bigger/disk), then run again (resume=latest continues a training run)")


@contextmanager
def cleanup_on_failure(final: str | Path, tmp: str | Path | None):
    """Around a write of ``final`` through ``tmp``: if it fails, remove ``tmp`` (when given) and turn an out-of-room
    error into a :class:`DiskFullError` with the fix; any other error propagates unchanged."""
    try:
        yield
    except BaseException as err:  # KeyboardInterrupt too: no temp left behind
        if tmp is not None:
            _remove(Path(tmp))
        full = no_room(err, final) if isinstance(err, Exception) else None
        if full is not None:
            raise full from err
        raise


def write_file_atomically(final: str | Path, write: Callable[[Path], None], fsync: bool = True) -> Path:
    """``write(tmp)`` into a hidden temp file beside ``final``, flush it to disk, then rename it over ``final``.

    Readers see the old file or the complete new one, never half a file; a failed write leaves no temp file.
    """
    final = Path(final)
    tmp = _prepare(final)
    with cleanup_on_failure(final, tmp):
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    return final


def write_dir_atomically(final: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` into a hidden temp folder (``tmp`` does not exist yet), then swap it in place of ``final``:
    readers never see half a folder; a failed write leaves ``final`` as it was and no temp folder."""
    final = Path(final)
    tmp = _prepare(final)
    with cleanup_on_failure(final, tmp):
        write(tmp)
        replace_dir(tmp, final)
    return final


def fresh_temp_dir(final: str | Path) -> Path:
    """An empty temp folder for ``final`` (stale temps cleaned), for writes shared by several processes that
    :func:`replace_dir` then moves into place (the trainer's checkpoints: every rank writes its part)."""
    tmp = _prepare(Path(final))
    tmp.mkdir()
    return tmp


def replace_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move the complete folder ``tmp`` to ``final``, replacing what is there (two renames; see the module doc)."""
    tmp, final = Path(tmp), Path(final)
    old = temp_path(final, "old")
    _remove(old)
    if final.exists():  # os.replace cannot overwrite a non-empty folder: move the old one aside first
        os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)
    return final


def write_bytes_atomically(final: str | Path, data: bytes) -> Path:
    return write_file_atomically(final, lambda tmp: tmp.write_bytes(data))


def write_text_atomically(final: str | Path, text: str) -> Path:
    return write_file_atomically(final, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomically(final: str | Path, data: Any, **dump_args) -> Path:
    """``json.dumps(data, **dump_args)`` plus a final newline, atomically."""
    return write_text_atomically(final, json.dumps(data, **dump_args) + "\n")
