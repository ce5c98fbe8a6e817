"""Append-only safetensors shards with an atomic JSON index, safe for several writing processes."""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from ..io import write_file_atomically, write_json_atomically
from .fingerprints import CACHE_FORMAT, _hash_file, _local_path, image_digest

logger = logging.getLogger(__name__)


class CacheMissingError(RuntimeError):
    """The cache lacks entries the dataset needs (precompute did not run on every process, or no barrier)."""


# =========================================================================== storage


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


class ShardStore:
    """Cache entries of one kind (``latents`` or ``text``): tensors named by key in safetensors shards.

    Reads are lazy (``safe_open`` memory-maps a shard; :meth:`get` copies one tensor out). Handles are
    opened per process and per shard, a bounded number at a time, so the store can be pickled into
    DataLoader workers.
    """

    max_open = 64

    def __init__(self, folder: str | os.PathLike, prefix: str):
        self.folder, self.prefix = Path(folder), prefix
        self.folder.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, str] = {}
        self._listing: dict[str, dict] = {}
        self._index_stale = False
        self._handles: OrderedDict = OrderedDict()
        self._pid = os.getpid()
        self.reload()

    @property
    def index_path(self) -> Path:
        return self.folder / "index.json"

    def shard_files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.prefix}-*.safetensors"))

    def reload(self) -> None:
        """Re-list the shards (the truth) using index.json to skip reading known shards' headers."""
        from safetensors import safe_open

        index = (_read_json(self.index_path) or {}).get("shards", {})
        listing, where = {}, {}
        for path in self.shard_files():
            try:
                size = path.stat().st_size
            except OSError:
                continue
            rec = index.get(path.name)
            if isinstance(rec, dict) and rec.get("size") == size and isinstance(rec.get("keys"), list):
                keys = rec["keys"]
            else:
                try:
                    with safe_open(str(path), framework="pt") as f:
                        keys = list(f.keys())
                except Exception as err:  # a foreign or damaged file: ignore it, its entries get re-encoded
                    logger.warning("ignoring unreadable cache shard %s (%s: %s)", path, type(err).__name__, err)
                    continue
            listing[path.name] = {"size": size, "keys": keys}
            for k in keys:
                where.setdefault(k, path.name)  # a key written twice (two ranks, same image): first shard wins
        self._listing, self._where = listing, where
        self._index_stale = listing != index
        self._handles.clear()

    def write_index(self) -> bool:
        """Write index.json (atomically) if it differs from the shards on disk; True if written."""
        if not self._index_stale:
            return False
        write_json_atomically(self.index_path, {"format": CACHE_FORMAT, "shards": self._listing},
                              separators=(",", ":"))
        self._index_stale = False
        return True

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def keys(self) -> Iterable[str]:
        return self._where.keys()

    def shard_of(self, key: str) -> str:
        return self._where[key]

    @property
    def listing(self) -> dict[str, list[str]]:
        """Shard file name → the keys it holds."""
        return {name: rec["keys"] for name, rec in self._listing.items()}

    def _handle(self, name: str):
        from safetensors import safe_open

        if self._pid != os.getpid():  # forked into a worker: don't share the parent's handles
            self._handles, self._pid = OrderedDict(), os.getpid()
        handle = self._handles.get(name)
        if handle is None:
            handle = safe_open(str(self.folder / name), framework="pt", device="cpu")
            self._handles[name] = handle
            while len(self._handles) > self.max_open:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(name)
        return handle

    def get(self, key: str) -> torch.Tensor:
        try:
            name = self._where[key]
        except KeyError:
            raise CacheMissingError(f"{self.prefix} entry {key[:16]}… is not in the cache at {self.folder}") from None
        return self._handle(name).get_tensor(key)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._pid = os.getpid()


class _ShardWriter:
    """Buffers entries and writes a shard every ``shard_size`` of them, named so no two writers collide."""

    def __init__(self, store: ShardStore, shard_size: int, rank: int, store_dtype: torch.dtype):
        self.store, self.shard_size, self.rank, self.dtype = store, int(shard_size), int(rank), store_dtype
        self.token = uuid.uuid4().hex[:12]
        self.seq, self.buffer, self.written = 0, {}, []

    def add(self, key: str, tensor: torch.Tensor) -> None:
        # clone: rows of one batch share storage, which safetensors refuses
        self.buffer[key] = tensor.detach().to("cpu", self.dtype).contiguous().clone()
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buffer:
            return
        name = f"{self.store.prefix}-r{self.rank:05d}-{self.token}-{self.seq:05d}.safetensors"
        metadata = {"format": f"latentsd-cache-{CACHE_FORMAT}", "kind": self.store.prefix}
        write_file_atomically(self.store.folder / name,
                              lambda tmp: save_file(self.buffer, str(tmp), metadata=metadata))
        self.written.append(name)
        self.seq, self.buffer = self.seq + 1, {}


class _FileDigests:
    """Image file hashes remembered by ``(path, size, mtime_ns, ctime_ns, inode)``, plus image contents that
    failed to decode. Each process appends its own ``files/digests-r{rank}-{token}.json`` (never rewritten);
    loading reads them all."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.known: dict[str, dict[tuple, str]] = {}
        self.undecodable: set[str] = set()
        self._new: dict[str, list] = {}
        self._new_bad: set[str] = set()
        self.hashed = 0  # files read and hashed by this object (memo misses)
        for path in sorted(self.folder.glob("digests-*.json")):
            data = _read_json(path) or {}
            for p, recs in data.get("files", {}).items():
                for rec in recs:
                    self.known.setdefault(p, {})[tuple(rec[:4])] = rec[4]
            self.undecodable.update(data.get("undecodable", []))

    def digest(self, cell: Any) -> Optional[str]:
        """The cell's :func:`image_digest`, or None if its bytes cannot be read."""
        path = _local_path(cell)
        if path is None:
            try:
                return image_digest(cell)
            except Exception:
                return None
        try:
            st = os.stat(path)
            sig = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            hit = self.known.get(path, {}).get(sig)
            if hit is not None:
                return hit
            digest = _hash_file(path)
            st = os.stat(path)
        except OSError:
            return None
        self.hashed += 1
        if (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == sig:  # unchanged while we read it
            self.known.setdefault(path, {})[sig] = digest
            self._new.setdefault(path, []).append([*sig, digest])
        return digest

    def mark_undecodable(self, digest: str) -> None:
        if digest not in self.undecodable:
            self.undecodable.add(digest)
            self._new_bad.add(digest)

    def save(self, rank: int) -> None:
        if self._new or self._new_bad:
            name = f"digests-r{rank:05d}-{uuid.uuid4().hex[:12]}.json"
            write_json_atomically(self.folder / name, {"files": self._new, "undecodable": sorted(self._new_bad)},
                                  separators=(",", ":"))
            self._new, self._new_bad = {}, set()


