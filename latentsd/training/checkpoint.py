"""Resumable checkpoints: accelerate state written atomically, newest K kept.

A checkpoint is ``output_dir/checkpoints/step-0000100/`` holding accelerate's state (models, optimizer, LR
scheduler, RNG states, registered objects such as the step counter) plus the resolved ``config.yaml``.
It is first written to a hidden temp folder and renamed when complete, so a crash mid-save leaves the
previous checkpoint intact and ``resume=latest`` never picks up half a checkpoint.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from ..config import save_config

PATTERN = re.compile(r"^step-(\d+)$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    found = [p for p in root.iterdir() if PATTERN.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(PATTERN.match(p.name).group(1)))


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``none`` → None; ``latest`` → newest checkpoint or None (fresh start); a path → that folder."""
    if resume == "none":
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a checkpoint folder (no config.yaml inside); use "
                                f"resume=latest or a folder like {checkpoint_dir(output_dir)}/step-0000100")
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, config, keep: int,
                    extra: dict[str, dict] | None = None) -> Path:
    """Every process calls this (accelerate writes per-rank RNG files); only the main one renames/prunes.

    ``extra`` maps file names to dicts of tensors (e.g. EMA weights) saved as safetensors alongside.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(config, tmp / "config.yaml")
        for name, tensors in (extra or {}).items():
            if tensors:
                save_file(tensors, str(tmp / name))
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(output_dir: str | Path, keep: int) -> None:
    if keep > 0:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)


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


def save_pipeline_atomically(pipe, path: Path, dtype: torch.dtype) -> None:
    """``pipe.save_pretrained`` into a temp folder, cast if asked, then swapped in place of ``path``."""
    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp)
        if dtype != torch.float32:  # cast a copy on disk, never the weights being trained
            from ..pipeline import LatentDiffusionPipeline

            LatentDiffusionPipeline.from_pretrained(tmp, torch_dtype=dtype).save_pretrained(tmp)

    write_dir_atomically(Path(path), write)
