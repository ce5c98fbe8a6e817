"""Validation images reach the trackers through each tracker's own API; unsupported ones warn once, never crash."""

import io
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from latentsd.config import load_config
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.images import load_grid
from latentsd.training import trackers
from latentsd.training.trackers import log_validation_images
from latentsd.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["a red circle on the left", "a blue square"]


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_imagefolder(make_shapes_dataset(8, seed=0), tmp_path_factory.mktemp("shapes"))


def _train(out, data, report_to):
    """4 steps, validation (2 prompts, 2 DDIM steps) at steps 2 and 4."""
    train(load_config(ROOT / "configs/train/tiny.yaml", [
        f"output_dir={out}", f"data.dataset={data}", "max_steps=4", "checkpoint_every=100", "optim.train_batch_size=2",
        f"report_to={report_to}", "validation.every=2", f"validation.prompts=[{', '.join(PROMPTS)}]",
        "validation.steps=2", "log_every=1"]))


def _grid_cells(out, step):
    cells, prompts = load_grid(out / "validation" / f"step-{step:07d}.png")
    assert prompts == PROMPTS
    return [np.asarray(c) for c in cells]


def test_tensorboard_gets_the_validation_images_and_prompts(tmp_path, shapes_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    _train(out, shapes_dir, "tensorboard")
    events = sorted((out / "logs" / "latentsd").glob("events.out.tfevents.*"))  # (hparams go to a subfolder)
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    logged = acc.Images("validation")
    assert [e.step for e in logged] == [2, 4]
    for event in logged:
        assert (event.width, event.height) == (2 * 64, 64)  # the two 64 px images side by side
        pixels = np.asarray(PIL.Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        cells = _grid_cells(out, event.step)  # the same images as the grid PNG, pixel for pixel
        np.testing.assert_array_equal(pixels, np.concatenate(cells, axis=1))
    text = acc.Tensors("validation/prompts/text_summary")
    assert [e.step for e in text] == [2, 4]
    assert text[0].tensor_proto.string_val[0].decode() == "0: a red circle on the left\n\n1: a blue square"
    assert "loss" in acc.Tags()["scalars"]


def test_wandb_offline_gets_each_image_as_a_wandb_image(tmp_path, shapes_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    _train(out, shapes_dir, "wandb")  # used to raise TypeError at the first validation (dataformats= to wandb.log)
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = sorted((runs[0] / "files" / "media" / "images").glob("validation_*.png"))
    assert len(media) == 2 * len(PROMPTS)
    by_log = {}  # validation_<wandb history row>_<hash>.png: one row per validation, one file per image
    for path in media:
        by_log.setdefault(int(path.name.split("_")[1]), []).append(np.asarray(PIL.Image.open(path).convert("RGB")))
    assert len(by_log) == 2
    for (_, logged), step in zip(sorted(by_log.items()), (2, 4)):
        cells = _grid_cells(out, step)
        assert sorted(a.tobytes() for a in logged) == sorted(c.tobytes() for c in cells)


class _NoImages:
    name = "no_images_tracker"


class _Broken:
    name = "tensorboard"  # a known tracker whose writer fails: no SummaryWriter behind it

    @property
    def tracker(self):
        raise RuntimeError("writer is gone")


class _Custom:
    """A user tracker registered with accelerate, with accelerate's log_images."""

    name = "my_custom_tracker"

    def __init__(self):
        self.calls = []

    def log_images(self, values, step=None):
        self.calls.append((values, step))


def test_unsupported_or_failing_trackers_are_skipped_with_one_warning_each(caplog, monkeypatch):
    monkeypatch.setattr(trackers, "_warned", set())
    images = [np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 255, np.uint8)]
    custom = _Custom()
    with caplog.at_level(logging.WARNING, logger="latentsd.training.trackers"):
        for step in (1, 2):
            log_validation_images([_NoImages(), _Broken(), custom], images, ["a", "b"], step)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert "'no_images_tracker'" in warnings[0] and "no image logging" in warnings[0]
    assert "'tensorboard'" in warnings[1] and "writer is gone" in warnings[1]
    assert [step for _, step in custom.calls] == [1, 2] and len(custom.calls[0][0]["validation"]) == 2
    with pytest.raises(ValueError, match="one prompt per image"):
        log_validation_images([custom], images, ["a"], 3)
