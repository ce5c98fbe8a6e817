"""Resumable checkpoints: accelerate state written atomically, newest K kept.

A checkpoint is ``output_dir/checkpoints/step-0000100/`` holding accelerate's state (models, optimizer, LR
scheduler, RNG states), the training counters as JSON (``train_state.json``, never accelerate's pickled custom
state) plus the resolved ``config.yaml``. It is first written to a hidden temp folder and renamed when complete, so
a crash mid-save leaves the previous checkpoint intact and ``resume=latest`` never picks up half a checkpoint.
Only finite weights are saved (the trainer checks first; ``train_state.json`` records it), and pruning never
deletes the newest such checkpoint. What a resume reads is checked first: :mod:`latentsd.training.safe_resume`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import shutil
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import save_file

from ..config import save_config
from ..io import cleanup_on_failure, fresh_temp_dir, replace_dir, write_dir_atomically, write_file_atomically

logger = logging.getLogger(__name__)
PATTERN = re.compile(r"^step-(\d+)$")
STATE_FILE = "train_state.json"


@dataclasses.dataclass
class TrainState:
    """The counters a checkpoint restores, saved as ``train_state.json``."""

    step: int = 0
    images_seen: int = 0
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss or gradient norm (guards.StepGuard)
    nonfinite_in_a_row: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load(self, folder: Path) -> None:
        """Restore from ``folder/train_state.json``: non-negative integers, or an error naming the file."""
        path = Path(folder) / STATE_FILE
        try:
            data = json.loads(path.read_text())
            values = {f.name: data.get(f.name, 0) for f in dataclasses.fields(self)}
            if "step" not in data or not all(type(v) is int and v >= 0 for v in values.values()):
                raise ValueError(f"expected non-negative integers {sorted(values)}, got {data}")
        except (OSError, ValueError, AttributeError) as err:
            raise ValueError(f"{path} is not a latentsd training state ({err}): resume from a checkpoint folder "
                             "this version wrote") from None
        for name, value in values.items():
            setattr(self, name, value)


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    found = [p for p in root.iterdir() if PATTERN.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def last_good_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint whose ``train_state.json`` records finite weights (any this version wrote), or None."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            if json.loads((path / STATE_FILE).read_text()).get("weights_finite") is True:
                return path
        except (OSError, ValueError, AttributeError):
            continue
    return None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``none`` → None; ``latest`` → newest checkpoint, or None (fresh start, with a warning naming the folder);
    ``latest_or_fail`` → newest checkpoint, or an error; a path → that folder."""
    if resume == "none":
        return None
    if resume in ("latest", "latest_or_fail"):
        found = list_checkpoints(output_dir)
        if found:
            return found[-1]
        where = checkpoint_dir(output_dir).resolve()
        if resume == "latest_or_fail":
            raise FileNotFoundError(f"resume=latest_or_fail: no checkpoint in {where}: check output_dir (a typo "
                                    "starts a new run), or use resume=latest to start fresh when there is none")
        logger.warning("resume=latest: no checkpoint in %s, starting from step 0 (check output_dir if you meant "
                       "to continue a run; resume=latest_or_fail makes this an error)", where)
        return None
    path = Path(resume).expanduser()
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a checkpoint folder (no config.yaml inside); use "
                                f"resume=latest or a folder like {checkpoint_dir(output_dir)}/step-0000100")
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, config, keep: int,
                    extra: dict[str, dict] | None = None, state: dict | None = None) -> Path:
    """Every process calls this (accelerate writes per-rank RNG files); only the main one renames/prunes.

    ``extra`` maps file names to dicts of tensors (e.g. EMA weights) saved as safetensors alongside. ``state``: the
    training counters, written as ``train_state.json`` with ``weights_finite: true`` (the caller has checked the
    weights: ``guards.StepGuard.check_weights``); a checkpoint without it is never resumed.
    """
    final = checkpoint_dir(output_dir) / f"step-{step:07d}"
    # one temp folder (the main process's; stale ones of killed runs removed) that every rank writes into
    tmp = Path(broadcast_object_list([str(fresh_temp_dir(final)) if accelerator.is_main_process else None])[0])
    accelerator.wait_for_everyone()
    with cleanup_on_failure(final, tmp if accelerator.is_main_process else None):  # disk full: a clear error
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_config(config, tmp / "config.yaml")
            if state is not None:
                (tmp / STATE_FILE).write_text(json.dumps({**state, "weights_finite": True}, indent=1) + "\n")
            for name, tensors in (extra or {}).items():
                if tensors:
                    save_file(tensors, str(tmp / name))
            replace_dir(tmp, final)  # a re-run of the same step after a resume replaces it
            _prune(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(output_dir: str | Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0: all), and always the newest good one (:func:`last_good_checkpoint`)."""
    if keep > 0:
        good = last_good_checkpoint(output_dir)
        for old in list_checkpoints(output_dir)[:-keep]:
            if old != good:
                shutil.rmtree(old)


def save_pipeline_atomically(pipe, path: Path, dtype: torch.dtype, extras: dict | None = None) -> None:
    """``pipe.save_pretrained`` (plus ``extras``) into a temp folder, every weight cast to ``dtype`` on disk, then
    swapped in place of ``path``.

    ``extras`` (from :func:`shipped_extras`) are components of the source folder the pipeline does not hold
    (SD-1.5's safety checker and feature extractor); they are saved beside the others and listed in
    ``model_index.json`` as the source listed them. Casting the written files, not the modules, leaves the
    weights being trained untouched and holds one file in memory at a time.
    """
    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp)
        if extras:
            _add_extras(tmp, extras)
        cast_saved_weights(tmp, dtype)

    write_dir_atomically(Path(path), write)


# ---- dtype of a written folder -----------------------------------------------------------------------
def cast_saved_weights(folder: Path, dtype: torch.dtype) -> None:
    """Every floating tensor of every ``*.safetensors`` file under ``folder`` in ``dtype`` (one file in memory at a
    time; integer tensors kept), and every transformers ``config.json`` loading in fp32 by default.

    diffusers loads its models in fp32 unless given ``torch_dtype``, whatever the file holds, while transformers 5
    loads a model in the dtype its ``config.json`` names. A config naming bf16 would thus make a plain
    ``StableDiffusionPipeline.from_pretrained(folder)`` mix an fp32 UNet with a bf16 text encoder (and fail), so
    the configs name fp32 like diffusers' own fp16 variants on the hub do: a load without ``torch_dtype`` is fp32
    throughout, ``torch_dtype=torch.bfloat16`` is bf16 throughout, in both libraries.
    """
    for file in sorted(Path(folder).rglob("*.safetensors")):
        _cast_file(file, dtype)
    for index in Path(folder).rglob("*.safetensors.index.json"):
        _update_index_size(index)
    for config in Path(folder).rglob("config.json"):
        data = json.loads(config.read_text())
        keys = [k for k in ("dtype", "torch_dtype") if k in data]  # transformers' configs (diffusers' have none)
        if keys:
            data.update(dict.fromkeys(keys, "float32"))
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _cast_file(file: Path, dtype: torch.dtype) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
        stored = {str(f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    if {d for d in stored if d.startswith(("F", "BF"))} <= {_SAFETENSORS_NAMES[dtype]}:
        return  # every floating tensor is already in dtype: no rewrite
    tensors = load_file(str(file))
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    del tensors
    write_file_atomically(file, lambda tmp: save_file(cast, str(tmp), metadata=metadata), fsync=False)


_SAFETENSORS_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _update_index_size(index: Path) -> None:
    """A sharded checkpoint's index records the total byte size, which a cast changes."""
    from safetensors import safe_open

    data = json.loads(index.read_text())
    total = 0
    for shard in set(data.get("weight_map", {}).values()):
        with safe_open(str(index.parent / shard), "pt") as f:
            for k in f.keys():  # noqa: SIM118 (not a dict)
                t = f.get_slice(k)
                total += _BYTES[str(t.get_dtype())] * math.prod(t.get_shape())
    data.setdefault("metadata", {})["total_size"] = total
    index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def export_scheduler(pretrained: str, revision: str | None, changes: dict, trained_with):
    """The sampler an export ships: the source folder's own class and config (SD-1.5: PNDM, SD-2: DDIM) with the
    training ``changes`` (prediction type, zero terminal SNR) applied; ``trained_with`` (our DDPM) for a model
    built from a config, or, with a warning, when that class cannot take a change (PNDM: zero terminal SNR)."""
    import inspect

    from ..models import load_scheduler

    if not pretrained:
        return trained_with
    shipped = load_scheduler(pretrained, revision=revision)
    unknown = sorted(set(changes) - set(inspect.signature(type(shipped).__init__).parameters))
    if unknown:
        logger.warning(f"the folder's {type(shipped).__name__} has no {unknown}: the export ships the training "
                       f"scheduler ({type(trained_with).__name__}) instead")
        return trained_with
    return type(shipped).from_config(shipped.config, **changes)


# ---- components a source folder ships beyond the five we train ---------------------------------------
def shipped_extras(pretrained: str, components, revision: str | None = None,
                   variant: str | None = None) -> dict:
    """``{name: (module, [library, class], pipeline_config)}`` for the non-empty entries of the source folder's
    ``model_index.json`` that ``components`` (our pipeline's) lacks or holds as None: SD-1.5's ``safety_checker`` and
    ``feature_extractor``. ``pipeline_config``: the index's plain keys (``requires_safety_checker``).

    diffusers' own fine-tuning scripts keep them (they re-save the whole source pipeline), so an export does too.
    A component that cannot be loaded is left out with a warning naming it, never a crash at the end of a run.
    """
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(pretrained, revision=revision)
    except (OSError, ValueError):  # no model_index.json (a bare component folder): nothing extra
        return {}
    plain = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, (list, tuple))}
    out = {}
    for name, entry in index.items():
        if name.startswith("_") or components.get(name) is not None or not isinstance(entry, (list, tuple)) \
                or entry[0] is None:
            continue
        try:
            module = _load_component(pretrained, name, *entry, revision=revision, variant=variant)
        except Exception as err:  # noqa: BLE001 (any loader error: the export goes on without this part)
            logger.warning(f"the export leaves out {name} ({entry[1]}) of {pretrained}: it could not be loaded "
                           f"({type(err).__name__}: {err})")
            continue
        out[name] = (module, list(entry), plain)
    return out


def _load_component(pretrained: str, name: str, library: str, class_name: str, revision=None, variant=None):
    """``[library, class]`` as diffusers writes them: a diffusers pipeline module ("stable_diffusion") or a package."""
    import importlib

    import diffusers.pipelines

    module = getattr(diffusers.pipelines, library, None) if library not in ("diffusers", "transformers") else None
    cls = getattr(module if module is not None else importlib.import_module(library), class_name)
    kwargs = {"subfolder": name, "revision": revision}
    if issubclass(cls, torch.nn.Module) and variant:
        kwargs["variant"] = variant
    return cls.from_pretrained(pretrained, **kwargs)


def _add_extras(folder: Path, extras: dict) -> None:
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    for name, (module, entry, plain) in extras.items():
        module.save_pretrained(folder / name)
        index[name] = entry
        index.update(plain)
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
