"""Validation images to every tracker accelerate offers, each through that tracker's own image API.

accelerate's ``log_images`` exists for only some trackers and takes different arguments in each (wandb's
passes its keyword arguments on to ``wandb.log``, so ``dataformats=`` crashes it), so each tracker gets its
own small writer here. A tracker without one (or whose writer fails) is skipped with one warning per tracker
name: validation images are never worth a crashed run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

KEY = "validation"
_warned: set[str] = set()


def _tensorboard(tracker, images, prompts, step):
    writer = tracker.tracker  # torch.utils.tensorboard.SummaryWriter
    writer.add_images(KEY, np.stack(images), global_step=step, dataformats="NHWC")
    writer.add_text(f"{KEY}/prompts", "\n\n".join(f"{i}: {p}" for i, p in enumerate(prompts)), global_step=step)
    writer.flush()


def _wandb(tracker, images, prompts, step):
    import wandb

    tracker.log({KEY: [wandb.Image(img, caption=p) for img, p in zip(images, prompts)]}, step=step)


def _swanlab(tracker, images, prompts, step):
    import swanlab

    tracker.log({KEY: [swanlab.Image(img, caption=p) for img, p in zip(images, prompts)]}, step=step)


def _trackio(tracker, images, prompts, step):
    import trackio

    tracker.log({KEY: [trackio.Image(img, caption=p) for img, p in zip(images, prompts)]}, step=step)


def _aim(tracker, images, prompts, step):
    import aim

    tracker.tracker.track([aim.Image(img, caption=p) for img, p in zip(images, prompts)], name=KEY, step=step)


def _comet_ml(tracker, images, prompts, step):
    for i, (img, p) in enumerate(zip(images, prompts)):
        tracker.tracker.log_image(img, name=f"{KEY}_{i:02d}", step=step, metadata={"prompt": p})


def _mlflow(tracker, images, prompts, step):
    import mlflow

    for i, img in enumerate(images):
        mlflow.log_image(img, key=f"{KEY}_{i:02d}", step=step)


def _clearml(tracker, images, prompts, step):
    report = tracker.tracker.get_logger().report_image
    for i, (img, p) in enumerate(zip(images, prompts)):
        report(title=KEY, series=f"{i:02d} {p}", iteration=step, image=img)


def _dvclive(tracker, images, prompts, step):
    for i, img in enumerate(images):
        tracker.tracker.log_image(f"{KEY}/{step:07d}_{i:02d}.png", img)


WRITERS: dict[str, Callable] = {
    "tensorboard": _tensorboard, "wandb": _wandb, "swanlab": _swanlab, "trackio": _trackio, "aim": _aim,
    "comet_ml": _comet_ml, "mlflow": _mlflow, "clearml": _clearml, "dvclive": _dvclive,
}


def log_validation_images(trackers, images: Sequence[np.ndarray], prompts: Sequence[str], step: int) -> None:
    """Log ``images`` (HWC uint8 arrays, ``prompts[i]`` made ``images[i]``) at ``step`` to each tracker.

    Call on the main process. Known trackers use their own API (captions where it has them); a custom
    tracker with accelerate's ``log_images`` gets ``{"validation": images}``; anything else, or a writer that
    raises, is skipped with a single warning naming the tracker.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} validation images for {len(prompts)} prompts: pass one prompt per image")
    for tracker in trackers:
        name = getattr(tracker, "name", type(tracker).__name__)
        write = WRITERS.get(name)
        if write is None and callable(getattr(tracker, "log_images", None)):
            write = _generic
        if write is None:
            _warn_once(name, "it has no image logging in latentsd or accelerate")
            continue
        try:
            write(tracker, list(images), list(prompts), step)
        except Exception as err:  # noqa: BLE001 (a tracker's failure must not end the training run)
            _warn_once(name, f"logging them failed ({type(err).__name__}: {err})")


def _generic(tracker, images, prompts, step):
    tracker.log_images({KEY: images}, step=step)


def _warn_once(name: str, why: str) -> None:
    if name not in _warned:
        _warned.add(name)
        logger.warning(f"validation images are not sent to the {name!r} tracker: {why}; they are still saved as "
                       "grids in <output_dir>/validation (this warning is shown once)")
