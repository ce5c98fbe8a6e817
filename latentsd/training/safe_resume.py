"""What ``resume=PATH`` reads must be plain data: a crafted checkpoint folder from elsewhere must not run code.

accelerate's ``load_state`` reads pickles: the optimizer, LR schedule, RNG and GradScaler states (``torch.load``
with ``weights_only=True``, numpy arrays allowed: plain data), registered custom objects (``custom_checkpoint_N.pkl``
with ``weights_only=False``: any code), and under FSDP torch's distributed-checkpoint folders (their ``.metadata``
with a plain ``pickle.load``, non-tensor entries such as the optimizer's param groups with
``weights_only=False``). latentsd therefore registers no custom object (its counters are ``train_state.json``), and
:func:`check_resumable`, run on every rank before ``load_state``, refuses with a message naming the file:

* a ``custom_checkpoint_N.pkl`` (older latentsd versions wrote the step counter there) or any other pickle-type
  file (``.pkl .pickle .bin .pt .pth .ckpt``) that accelerate does not write for latentsd;
* one of accelerate's own files that is not a ``torch.save`` archive holding plain data: it is loaded here the way
  accelerate will load it (``weights_only=True``, accelerate's numpy allowances, memory-mapped so nothing large is
  read), so an RNG file that would fail is an error too (accelerate would skip it silently);
* a distributed-checkpoint folder whose ``.metadata`` holds anything but torch's checkpoint metadata classes
  (read with a restricted unpickler), or whose non-tensor entries are not plain data (``weights_only=True``);
* a folder without ``train_state.json``.

Model and EMA weights are safetensors; exports inside a checkpoint (``model/``, ``lora/``) are not read on resume.
Not covered: DeepSpeed's own checkpoint folder (``pytorch_model/``), which DeepSpeed loads itself (untested here:
deepspeed is not installed).
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from pathlib import Path

import torch

from .checkpoint import STATE_FILE

PICKLE_SUFFIXES = {".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt"}
# what accelerate's save_state writes (per model/optimizer index, per rank, FSDP's full or per-rank state dicts)
ACCELERATE_FILES = re.compile(r"^(?:(?:optimizer|scheduler|sampler|dl_state_dict|pytorch_model_fsdp)(?:_\d+)?"
                              r"(?:_rank\d+)?\.bin|random_states_\d+\.pkl|scaler\.pt)$")
CUSTOM_STATE = re.compile(r"^custom_checkpoint_\d+\.pkl$")
DCP_FOLDERS = re.compile(r"^(?:pytorch_model_fsdp|optimizer)_\d+$")  # FSDP's SHARDED_STATE_DICT checkpoints


class UnsafeCheckpointError(ValueError):
    """A checkpoint folder holds something that resuming would unpickle beyond plain data."""


def check_resumable(folder: str | Path) -> None:
    """Raise :class:`UnsafeCheckpointError` unless everything ``load_state`` will read in ``folder`` is plain data."""
    folder = Path(folder)
    for entry in sorted(folder.iterdir()):
        if entry.is_dir():
            if DCP_FOLDERS.match(entry.name):
                check_dcp_folder(entry)
        elif CUSTOM_STATE.match(entry.name):
            _refuse(entry, "is an accelerate custom-state pickle, which accelerate loads with weights_only=False "
                           "(a crafted one runs any code). latentsd keeps its counters in train_state.json; "
                           "checkpoints of latentsd versions before that, or from elsewhere, cannot be resumed "
                           "safely: start from their exported model (model.pretrained) instead")
        elif entry.suffix.lower() in PICKLE_SUFFIXES:
            if not ACCELERATE_FILES.match(entry.name):
                _refuse(entry, "is a pickle-type file a latentsd checkpoint never holds: remove it if you know "
                               "where it comes from")
            check_torch_file(entry)
    if not (folder / STATE_FILE).is_file():
        _refuse(folder / STATE_FILE, "is missing: this folder was not written by this latentsd version (or is "
                                     "incomplete); resume from a checkpoint folder it wrote")


def check_torch_file(path: Path) -> None:
    """``path`` loads as accelerate will load it: a ``torch.save`` archive of plain data (``weights_only=True``)."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS  # the numpy pieces of RNG states accelerate allows

    if not zipfile.is_zipfile(path):
        _refuse(path, "is not a torch.save archive (accelerate writes only those): a bare pickle can run code")
    try:
        with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        _refuse(path, f"holds more than tensors and plain values ({_reason(err)}): unpickling it could run code")
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        _refuse(path, f"cannot be read ({type(err).__name__}: {_reason(err)}): the checkpoint is damaged")


def check_dcp_folder(folder: Path) -> None:
    """A torch distributed-checkpoint folder: its ``.metadata`` is checkpoint metadata only, and every non-tensor
    entry (which DCP loads with ``weights_only=False``) is plain data."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata

    path = folder / ".metadata"
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as err:
        _refuse(path, f"is not plain distributed-checkpoint metadata ({_reason(err)}): unpickling it could run code")
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        _refuse(path, f"holds a {type(metadata).__name__}, not distributed-checkpoint metadata")
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue  # a tensor: DCP reads it with weights_only=True
        where = f"{folder / info.relative_path} (entry {index.fqn})"
        if info.transform_descriptors:
            _refuse(folder, f"stores {where} through DCP extensions {list(info.transform_descriptors)}, which "
                            "latentsd cannot check")
        with (folder / info.relative_path).open("rb") as f:
            f.seek(info.offset)
            data = f.read(info.length)
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
            _refuse(folder, f"holds {where}, which is not plain data ({_reason(err)}): DCP would unpickle it with "
                            "weights_only=False")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch's distributed-checkpoint ``Metadata`` and nothing else (the classes, dtypes, paths it holds)."""

    ALLOWED = {
        "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "TensorStorageMetadata",
                                                  "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                                  "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch.serialization": {"_get_layout"},
        "torch": {"Size"},
        "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
        "collections": {"OrderedDict"},
    }

    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or name in self.ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported global {module}.{name}")


def _reason(err: Exception) -> str:
    """The telling line of an unpickling error (torch's weights_only message is many lines long)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    telling = [line for line in lines if "global" in line.lower()]
    return (telling or lines or [type(err).__name__])[0][:300]


def _refuse(path: Path, why: str):
    raise UnsafeCheckpointError(f"refusing to resume from {path.parent}: {path.name} {why}")
