"""The trainer on tiny models: loss goes down, exact resume (incl. SIGKILL), exports load in both libraries."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentsd import LatentDiffusionPipeline
from latentsd.cli import main
from latentsd.config import load_config
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.training.checkpoint import list_checkpoints, save_checkpoint
from latentsd.training.logs import read_metrics
from latentsd.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_imagefolder(make_shapes_dataset(24, seed=0), tmp_path_factory.mktemp("shapes"))


def _cfg(out, data, *extra):
    base = [f"output_dir={out}", f"data.dataset={data}", "max_steps=4", "checkpoint_every=2",
            "checkpoints_total_limit=0", "optim.train_batch_size=2", "data.caption_dropout=0.2",
            "data.random_flip=true", "data.center_crop=false"]
    return load_config(ROOT / "configs/train/tiny.yaml", base + list(extra))


def _unet(out):
    return load_file(Path(out) / "model/unet/diffusion_pytorch_model.safetensors")


def test_finetune_lowers_loss_and_exports_a_folder_both_libraries_load(tmp_path, shapes_dir, tiny_model_dir):
    out = tmp_path / "run"
    summary = train(_cfg(out, shapes_dir, f"model.pretrained={tiny_model_dir}", "max_steps=12",
                         "checkpoint_every=6", "optim.train_batch_size=4"))
    losses = [m["loss"] for m in read_metrics(out).values()]
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert summary["steps"] == 12 and (out / "config.yaml").is_file()
    assert (out / "checkpoints/step-0000006/config.yaml").is_file()
    ours = LatentDiffusionPipeline.from_pretrained(out / "model")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(out / "model")
    for pipe in (ours, ref):
        pipe.set_progress_bar_config(disable=True)
    a, b = (p("a red circle", num_inference_steps=3, output_type="np",
              generator=torch.Generator().manual_seed(0)).images for p in (ours, ref))
    np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_from_a_checkpoint_is_bit_identical(tmp_path, shapes_dir, accum):
    full = tmp_path / "full"
    train(_cfg(full, shapes_dir, f"optim.gradient_accumulation_steps={accum}"))
    resumed = tmp_path / "resumed"
    train(_cfg(resumed, shapes_dir, f"optim.gradient_accumulation_steps={accum}",
               f"resume={full}/checkpoints/step-0000002"))
    a, b = read_metrics(full), read_metrics(resumed)
    assert sorted(b) == [3, 4] and all(a[s]["loss"] == b[s]["loss"] for s in b)
    wa, wb = _unet(full), _unet(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_latest_after_sigkill_matches_an_uninterrupted_run(tmp_path, shapes_dir):
    ref = tmp_path / "ref"
    train(_cfg(ref, shapes_dir, "max_steps=6"))
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "latentsd.cli", "train", "--config", str(ROOT / "configs/train/tiny.yaml"),
            *[a for a in _overrides(out, shapes_dir)], "max_steps=6"]
    # same thread count as this process (conftest): float reductions then run in the same order
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not (out / "checkpoints/step-0000002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list_checkpoints(out), "the run was killed before its first checkpoint"
    assert main(["train", "--config", str(ROOT / "configs/train/tiny.yaml"), *_overrides(out, shapes_dir),
                 "max_steps=6", "resume=latest"]) == 0
    a, b = read_metrics(ref), read_metrics(out)
    assert sorted(b) == list(range(1, 7)) and all(a[s]["loss"] == b[s]["loss"] for s in a)
    wa, wb = _unet(ref), _unet(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _overrides(out, data):
    return [f"output_dir={out}", f"data.dataset={data}", "max_steps=4", "checkpoint_every=2",
            "checkpoints_total_limit=0", "optim.train_batch_size=2", "data.caption_dropout=0.2",
            "data.random_flip=true", "data.center_crop=false"]


class _FakeAccelerator:
    is_main_process = True

    def __init__(self, fail=False):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        (Path(path) / "model.safetensors").write_bytes(b"partial")
        if self.fail:
            raise KeyboardInterrupt("crash mid-save")


def test_a_crash_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    cfg = load_config(ROOT / "configs/train/tiny.yaml")
    save_checkpoint(_FakeAccelerator(), tmp_path, 10, cfg, keep=2)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(_FakeAccelerator(fail=True), tmp_path, 20, cfg, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000010"]
    for step in (20, 30, 40):
        save_checkpoint(_FakeAccelerator(), tmp_path, step, cfg, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000030", "step-0000040"]


def test_text_encoder_training_bf16_and_gradient_checkpointing(tmp_path, shapes_dir):
    out = tmp_path / "te"
    train(_cfg(out, shapes_dir, "max_steps=2", "model.train_text_encoder=true", "mixed_precision=bf16",
               "model.gradient_checkpointing=true"))
    from latentsd.models import build_components

    before = build_components("tiny", seed=0).text_encoder.state_dict()
    after = load_file(out / "model/text_encoder/model.safetensors")
    assert all(v.dtype == torch.float32 for v in after.values())  # trained weights stayed fp32 under bf16
    changed = [k for k, v in before.items() if k in after and not torch.equal(v, after[k])]
    assert changed, "the text encoder did not change"


@pytest.mark.parametrize("override,message", [
    ("optim.learnig_rate=1", "learning_rate"),
    ("max_steps=zero", "max_steps"),
    ("data.dataset=./no/such/folder", "no/such/folder"),
])
def test_bad_config_is_a_clear_error(tmp_path, override, message, capsys):
    code = main(["train", "--config", str(ROOT / "configs/train/tiny.yaml"), f"output_dir={tmp_path}", override])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
