"""Checks before a training run loads anything: folders it will write, free disk, and (on a GPU) the memory estimate.

The trainer calls :func:`preflight` first, on every process, so a run that would fail at its first checkpoint or its
export fails in seconds with the reason and the fix:

* :func:`check_output_dir`: ``output_dir``, ``output_dir/checkpoints`` (and the cache folder when caching) are
  folders this process can write to, or can be created; a regular file in the way is named.
* :func:`check_disk`: the disk of ``output_dir`` has room for one checkpoint and the export, sized from the config's
  parameter counts without loading a weight (:mod:`latentsd.training.estimate`, models on the meta device).
* on a GPU, the estimated peak memory is logged, with settings that fit when it exceeds the GPU.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import TrainConfig
from ..errors import UserError
from .estimate import FITS, Estimate, estimate, format_estimate, human, suggest

logger = logging.getLogger(__name__)


class PreflightError(UserError):
    """The run cannot write its outputs (a file in the way, no permission, not enough disk)."""


def preflight(cfg: TrainConfig, main_process: bool = True, processes: int = 1) -> Estimate | None:
    """All checks (module doc); returns the estimate, or None when the model's configs could not be read (the
    model loader then reports why). ``processes``: the run's, for DDP's gradient buckets in the GPU estimate."""
    check_output_dir(cfg)
    on_gpu = torch.cuda.is_available()
    try:
        est = estimate(cfg, trace=on_gpu, processes=processes)
    except UserError as err:
        logger.warning("skipping the disk check: %s", err)
        return None
    check_disk(cfg, est)
    if on_gpu and main_process:
        log_gpu_estimate(cfg, est, processes)
    return est


def _folders(cfg: TrainConfig) -> list[tuple[str, Path]]:
    out = Path(cfg.output_dir)
    folders = [("output_dir", out), ("output_dir/checkpoints", out / "checkpoints")]
    if cfg.cache.latents or cfg.cache.text:
        from ..data.cache import resolve_cache_dir

        folders.append(("cache.dir", resolve_cache_dir(cfg)))
    return folders


def _existing_ancestor(path: Path) -> Path:
    """``path`` or its nearest existing parent (which may be a file: the caller checks)."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return candidate
    return Path(path.absolute().anchor)


def check_output_dir(cfg: TrainConfig) -> None:
    """Every folder the run writes is a folder (or can be one) and writable; else :class:`PreflightError`."""
    for what, folder in _folders(cfg):
        anchor = _existing_ancestor(folder)
        if not anchor.is_dir():
            raise PreflightError(f"{what} {folder} cannot be created: {anchor} is a file, not a folder. Move or "
                                 f"delete that file, or choose another output_dir")
        try:
            with tempfile.TemporaryFile(dir=anchor):  # a real write: permissions, read-only mounts, quotas
                pass
        except OSError as err:
            raise PreflightError(f"{what} {folder} is not writable: cannot create a file in {anchor} ({err}). "
                                 "Choose a folder you can write to (output_dir=...), or fix its permissions") from None


def check_disk(cfg: TrainConfig, est: Estimate) -> None:
    """Free space on the disk of ``output_dir`` ≥ one checkpoint + the export (sizes in ``est``)."""
    anchor = _existing_ancestor(Path(cfg.output_dir))
    free = shutil.disk_usage(anchor).free
    if free < est.disk_bytes:
        raise PreflightError(
            f"not enough free disk space for output_dir {cfg.output_dir}: {human(free)} free on the disk of {anchor}, "
            f"but one checkpoint (~{human(est.checkpoint_bytes)}) plus the export (~{human(est.export_bytes)}) need "
            f"~{human(est.disk_bytes)}. Free space, put output_dir on a larger disk, or write less "
            "(lora.enabled=true saves adapters only; export.dtype=fp16; export.every_checkpoint=false; "
            "ema.enabled=false; optim.use_8bit_adam=true)")


def log_gpu_estimate(cfg: TrainConfig, est: Estimate, processes: int = 1) -> None:
    """Log the estimate; warn, with settings that fit, when its peak exceeds this GPU."""
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    logger.info("estimated GPU memory (latentsd estimate):\n%s", format_estimate(est))
    if est.peak > FITS * total:
        tips = suggest(cfg, total, processes)
        logger.warning("the estimated peak %s exceeds %.0f%% of this GPU's %s%s", human(est.peak), 100 * FITS,
                       human(total), "; settings that fit: " + " | ".join(" ".join(ch) for ch, _ in tips)
                       if tips else "")
