"""NaN/inf never destroys a run: non-finite steps are skipped (on every rank alike), counted and stop a diverging run
with a clear error; non-finite weights are never written; generated images with NaN pixels are reported."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentsd import LatentDiffusionPipeline
from latentsd.cli import main
from latentsd.config import load_config
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.training.checkpoint import TrainState, last_good_checkpoint, list_checkpoints, save_checkpoint
from latentsd.training.guards import NonFiniteError, StepGuard
from latentsd.training.logs import read_metrics
from latentsd.training.trainer import Trainer, train
from launched_trainer import inject_inf_loss

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs/train/tiny.yaml"


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_imagefolder(make_shapes_dataset(16, seed=1), tmp_path_factory.mktemp("shapes"))


def _overrides(out, data, *extra) -> list[str]:
    return [f"output_dir={out}", f"data.dataset={data}", "max_steps=4", "checkpoint_every=1",
            "checkpoints_total_limit=0", "optim.train_batch_size=2", *extra]


def _cfg(out, data, *extra):
    return load_config(TINY, _overrides(out, data, *extra))


def _unet_state(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.acc.unwrap_model(trainer.unet).state_dict().items()}


def _all_finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for f in folder.rglob("*.safetensors") for t in load_file(f).values())


# ---- a diverging run -----------------------------------------------------------------------------
DIVERGING = ["optim.learning_rate=1e6", "max_steps=20", "optim.max_nonfinite_steps=3"]  # NaN loss from step 2 on


def test_a_diverging_run_exits_2_naming_the_last_good_checkpoint_and_writes_no_nan(tmp_path, shapes_dir, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", str(TINY), *_overrides(out, shapes_dir, *DIVERGING, "checkpoints_total_limit=2")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    good = out / "checkpoints/step-0000001"
    assert "training stopped at step 4: 3 optimizer steps in a row had a non-finite loss" in err
    assert f"The last good checkpoint is {good}" in err
    metrics = read_metrics(out)
    assert sorted(metrics) == [1, 2, 3, 4]
    assert math.isfinite(metrics[1]["loss"]) and not any(math.isfinite(metrics[s]["loss"]) for s in (2, 3, 4))
    assert [metrics[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 3]
    # no checkpoint amid the non-finite steps, so the limit of 2 pruned nothing; nothing exported
    assert list_checkpoints(out) == [good] and _all_finite(out) and not (out / "model").exists()


def test_skipped_steps_leave_weights_optimizer_schedule_and_ema_untouched(tmp_path, shapes_dir):
    trainer = Trainer(_cfg(tmp_path / "run", shapes_dir, *DIVERGING, "ema.enabled=true", "ema.decay=0.5"))
    with pytest.raises(NonFiniteError, match="training stopped at step 4"):
        trainer.run()
    ckpt = tmp_path / "run/checkpoints/step-0000001"  # written after the one applied step
    saved, now = load_file(ckpt / "model.safetensors"), _unet_state(trainer)
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)
    opt_saved, opt_now = torch.load(ckpt / "optimizer.bin", weights_only=True), trainer.optimizer.state_dict()
    for i, s in opt_saved["state"].items():
        assert all(torch.equal(s[k], opt_now["state"][i][k]) for k in s)
    assert torch.load(ckpt / "scheduler.bin", weights_only=True)["last_epoch"] == \
        trainer.lr_schedule.state_dict()["last_epoch"] == 1
    ema = load_file(ckpt / "ema.safetensors")
    assert trainer.ema.updates == int(ema["updates"]) == 1
    assert all(torch.equal(ema[f"shadow.{i}"], t) for i, t in enumerate(trainer.ema.shadow))


def test_one_nonfinite_step_is_skipped_warned_with_its_captions_and_resumes_exactly(tmp_path, shapes_dir, caplog):
    full = tmp_path / "full"
    trainer = Trainer(_cfg(full, shapes_dir, "ema.enabled=true"))
    captions, snapshots = {}, {}
    compute_loss, at_step_end = trainer.compute_loss, trainer.at_step_end

    def recording_loss(batch, micro):
        captions[micro] = batch["caption"]
        return compute_loss(batch, micro)

    def snapshot(metrics):
        snapshots[trainer.state.step] = _unet_state(trainer)
        at_step_end(metrics)

    trainer.compute_loss, trainer.at_step_end = recording_loss, snapshot
    inject_inf_loss(trainer, 0, 1)  # step 2: the loss is inf, its gradients are finite
    summary = trainer.run()
    assert summary["skipped_steps"] == 1 and summary["steps"] == 4
    a = read_metrics(full)
    assert a[2]["loss"] == math.inf and [a[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert all(torch.equal(snapshots[2][k], snapshots[1][k]) for k in snapshots[1])  # the update was skipped
    assert any(not torch.equal(snapshots[3][k], snapshots[2][k]) for k in snapshots[2])  # the next one was not
    assert int(trainer.optimizer.state_dict()["state"][0]["step"]) == 3 and trainer.ema.updates == 3
    assert trainer.lr_schedule.state_dict()["last_epoch"] == 3
    warning = next(r.getMessage() for r in caplog.records if "update skipped" in r.getMessage())
    assert warning.startswith("step 2: non-finite loss") and all(c in warning for c in captions[1])
    assert [p.name for p in list_checkpoints(full)] == ["step-0000001", "step-0000003", "step-0000004"]
    assert _all_finite(full / "model")
    resumed = tmp_path / "resumed"  # the counters come back from train_state.json
    train(_cfg(resumed, shapes_dir, "ema.enabled=true", f"resume={full}/checkpoints/step-0000003"))
    b = read_metrics(resumed)
    assert sorted(b) == [4] and b[4]["loss"] == a[4]["loss"] and b[4]["skipped_steps"] == 1
    wa, wb = (load_file(p / "model/unet/diffusion_pytorch_model.safetensors") for p in (full, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the patch below
def test_weights_that_turn_nan_despite_finite_steps_are_never_checkpointed_or_exported(tmp_path, shapes_dir):
    out = tmp_path / "run"
    trainer = Trainer(_cfg(out, shapes_dir, "ema.enabled=true"))
    adamw_step = trainer.optimizer.optimizer.step

    def overflowing_step(*args, **kwargs):  # an update that overflows while loss and gradients are finite
        result = adamw_step(*args, **kwargs)
        if trainer.state.step == 2:
            trainer.params[0].data.view(-1)[0] = float("inf")
        return result

    trainer.optimizer.optimizer.step = overflowing_step
    with pytest.raises(NonFiniteError) as err:
        trainer.run()
    message = str(err.value)
    assert "step 2: NaN/inf values (1 in the trained weights, 1 in the EMA weights)" in message
    assert "Not writing checkpoint step-0000002" in message
    assert f"The last good checkpoint is {out / 'checkpoints/step-0000001'}" in message
    assert list_checkpoints(out) == [out / "checkpoints/step-0000001"] and _all_finite(out)
    assert not list((out / "checkpoints").glob(".*"))  # not even a temp folder
    with pytest.raises(NonFiniteError, match="Not writing the export"):
        trainer.export(tmp_path / "export")
    assert not (tmp_path / "export").exists()


class _FakeAccelerator:
    is_main_process = True

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        (Path(path) / "model.safetensors").write_bytes(b"weights")


def test_pruning_never_deletes_the_newest_good_checkpoint(tmp_path):
    cfg, acc = load_config(TINY), _FakeAccelerator()
    save_checkpoint(acc, tmp_path, 10, cfg, keep=1, state=TrainState(step=10).state_dict())
    for step in (20, 30):  # no train_state.json (an older latentsd, or not latentsd): not resumable, not good
        save_checkpoint(acc, tmp_path, step, cfg, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000010", "step-0000030"]
    assert last_good_checkpoint(tmp_path) == tmp_path / "checkpoints/step-0000010"
    save_checkpoint(acc, tmp_path, 40, cfg, keep=1, state=TrainState(step=40).state_dict())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000040"]
    assert json.loads((tmp_path / "checkpoints/step-0000040/train_state.json").read_text())["weights_finite"] is True


# ---- fp16: the GradScaler's own skip ---------------------------------------------------------------
class _OneProcess:
    """What StepGuard reads of an Accelerator: one CPU process (under a GradScaler, or None)."""

    device, process_index, num_processes, is_main_process = torch.device("cpu"), 0, 1, True

    def __init__(self, scaler=None):
        self.scaler = scaler

    def gather(self, t):
        return t


def _scaled_setup():
    p, scaler = torch.nn.Parameter(torch.ones(3)), torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scaler starts with the first scaled loss
    return p, torch.optim.AdamW([p], lr=0.1), scaler


def test_an_fp16_overflow_is_skipped_as_the_grad_scaler_skips_it_and_does_not_stop_the_run():
    (p, opt, scaler), (q, ref_opt, ref_scaler) = _scaled_setup(), _scaled_setup()
    state = TrainState()
    guard = StepGuard(_OneProcess(scaler), load_config(TINY), state)
    for grad in ([1.0, math.inf, 1.0], [512.0, 1024.0, 0.0]):  # an overflow, then a good step
        p.grad, q.grad = torch.tensor(grad), torch.tensor(grad)
        scaler.unscale_(opt)  # what accelerate's clip_grad_norm_ does first
        verdict = guard.check([torch.tensor(0.5)], torch.nn.utils.clip_grad_norm_([p], 1.0), ["a red circle"])
        if verdict.apply:
            scaler.step(opt)
            scaler.update()
        else:
            guard.skip_update()
        ref_scaler.unscale_(ref_opt)  # the reference: torch's own GradScaler skip
        torch.nn.utils.clip_grad_norm_([q], 1.0)
        ref_scaler.step(ref_opt)
        ref_scaler.update()
        assert scaler.get_scale() == ref_scaler.get_scale() and torch.equal(p, q)
        opt.zero_grad(), ref_opt.zero_grad()
    assert scaler.get_scale() == 512.0 and not torch.equal(p, torch.ones(3))  # backed off, then stepped
    assert state.skipped_steps == 1 and state.nonfinite_in_a_row == 0  # an overflow is no divergence
    verdict = guard.check([torch.tensor(math.nan)], torch.tensor(1.0), ["a red circle"])  # a NaN loss is one
    assert not verdict.apply and state.nonfinite_in_a_row == 1


def test_the_guard_reads_device_values_once_per_step(monkeypatch):
    """One tensor-to-Python conversion (what forces a host sync on a GPU) per optimizer step, skipped or not: the
    loss logging had one already, the check rides on it."""
    guard, conversions = StepGuard(_OneProcess(), load_config(TINY), TrainState()), []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            conversions.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for loss in (0.5, math.nan, math.inf):
        conversions.clear()
        verdict = guard.check([torch.tensor(loss), torch.tensor(0.25)], torch.tensor(2.0), ["a red circle"])
        assert conversions == ["tolist"] and verdict.apply == math.isfinite(loss)
    monkeypatch.undo()
    assert guard.state.skipped_steps == 2


# ---- two processes ---------------------------------------------------------------------------------
def test_two_processes_skip_the_same_step_when_only_rank_1_sees_an_inf_loss(tmp_path, shapes_dir):
    two, log = tmp_path / "two", tmp_path / "two.log"
    args = ["--inf-loss", "1:1", "--config", str(TINY),
            *_overrides(two, shapes_dir, "max_steps=3", "checkpoint_every=10")]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs/accelerate/2cpu.yaml"), "--num_processes", "2", str(ROOT / "tests/launched_trainer.py"),
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:  # a file, not a pipe: a full pipe would block one rank
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=180).returncode
    output = log.read_text()
    assert rc == 0, output[-4000:]
    ranks = [json.loads((two / f"rank{r}_after.json").read_text()) for r in (0, 1)]
    assert [r["skipped_steps"] for r in ranks] == [1, 1] and ranks[0]["weights"] == ranks[1]["weights"]
    assert "step 2: update skipped; the batch on rank 1 (non-finite loss) had captions" in output
    one = tmp_path / "one"  # 1 process x batch 4 holds both ranks' samples: its step 2 is skipped too
    ref = Trainer(_cfg(one, shapes_dir, "max_steps=3", "checkpoint_every=10", "optim.train_batch_size=4"))
    inject_inf_loss(ref, 0, 1)
    ref.run()
    a, b = read_metrics(two), read_metrics(one)
    assert a[2]["loss"] == b[2]["loss"] == math.inf and a[3]["skipped_steps"] == b[3]["skipped_steps"] == 1
    assert all(abs(a[s]["loss"] - b[s]["loss"]) < 1e-4 for s in (1, 3))
    wa, wb = (load_file(p / "model/unet/diffusion_pytorch_model.safetensors") for p in (two, one))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


# ---- generation ------------------------------------------------------------------------------------
def test_the_pipeline_names_images_with_nan_pixels(tiny, caplog):
    pipe = LatentDiffusionPipeline(**tiny.as_dict())
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    latents[1, 0, 0, 0] = math.nan  # one of two images goes NaN
    images = pipe(["a red circle", "a blue square"], latents=latents, num_inference_steps=2, output_type="np").images
    assert [i for i in range(2) if not np.isfinite(images[i]).all()] == [1] == pipe.nonfinite_images
    assert "image(s) [1] of 2 have NaN/inf pixels" in caplog.text
    pipe("a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert pipe.nonfinite_images == []


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")  # diffusers' NaN -> uint8
def test_generate_with_nan_weights_exits_2_and_saves_nothing(tmp_path, capsys):
    from latentsd.models import build_components

    parts = build_components("tiny", seed=0)
    with torch.no_grad():
        parts.unet.conv_out.bias.fill_(math.nan)  # what a diverged export held before
    LatentDiffusionPipeline(**parts.as_dict()).save_pretrained(tmp_path / "model")
    out = tmp_path / "out.png"
    code = main(["generate", "a red circle", "--model", str(tmp_path / "model"), "--steps", "2", "--device", "cpu",
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "1 of 1 images have NaN/inf pixels" in err and "the unet weights are NaN/inf" in err
    assert not out.exists()
