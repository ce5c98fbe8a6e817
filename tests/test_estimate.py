"""`latentsd estimate`: byte counts equal the real trainer's tensors; the traced activation peak equals what the CPU
allocator measures (torch.profiler) for the tiny and shapes models; checkpoint and export sizes bound the files
written; suggestions fit; bad sizes are clear errors."""

from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from latentsd.cli import main
from latentsd.config import load_config
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.training.estimate import EXTRA_FILES, FITS, VAE_ENCODE, estimate, parse_size, suggest
from latentsd.training.rng import GlobalDraw
from latentsd.training.trainer import Trainer, train

ROOT = Path(__file__).resolve().parent.parent
NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return write_imagefolder(make_shapes_dataset(16, seed=0), tmp_path_factory.mktemp("shapes"))


def _cfg(out, data, *extra):
    return load_config(ROOT / "configs/train/tiny.yaml", [f"output_dir={out}", f"data.dataset={data}", "max_steps=1",
                                                          "checkpoint_every=1", "optim.train_batch_size=2", *extra])


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("extra", [
    ["ema.enabled=true"],
    ["model.train_text_encoder=true", "mixed_precision='bf16'", "ema.enabled=true", "ema.offload_to_cpu=true"],
    ["lora.enabled=true", "lora.text_encoder=true", "mixed_precision='fp16'"],
    ["optim.optimizer=prodigy"], ["optim.optimizer=schedulefree_adamw"], ["optim.optimizer=lion"],
    ["optim.optimizer=adafactor"],
], ids=["full", "text-encoder-bf16-ema-cpu", "lora-fp16", "prodigy", "schedulefree", "lion", "adafactor"])
def test_weight_gradient_optimizer_and_ema_bytes_equal_the_trainers_tensors(tmp_path, shapes_dir, extra):
    cfg = _cfg(tmp_path, shapes_dir, *extra)
    optimizer = f"({cfg.optim.optimizer})"
    est = estimate(cfg)
    trainer = Trainer(cfg)
    weights = defaultdict(int)
    for module in (trainer.parts.vae, trainer.parts.text_encoder, trainer.parts.unet):
        for p in module.parameters():
            weights[f"weights {NAMES[p.dtype]}"] += p.numel() * p.element_size()
    assert {k: v for k, v in est.gpu.items() if k.startswith("weights")} == dict(weights)
    loss = trainer.compute_loss(next(iter(trainer.loader)), 0)
    trainer.acc.backward(loss)
    assert _nbytes(p.grad for p in trainer.params) == est.gpu["gradients (fp32)"]
    trainer.optimizer.step()
    states = [t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    expected = est.gpu[f"optimizer states {optimizer}"]
    if cfg.optim.optimizer == "prodigy":  # p0 is a scalar for a parameter that is all zeros (zero-initialised layers)
        assert _nbytes(states) <= expected <= 1.001 * _nbytes(states)
    else:
        assert _nbytes(states) == expected
    if cfg.ema.enabled:
        where = est.cpu if cfg.ema.offload_to_cpu else est.gpu
        assert _nbytes(trainer.ema.shadow) == where["EMA (fp32)"]


def _allocator_peak(fn) -> int:
    """Highest bytes live above the start while ``fn`` runs, from the CPU allocator's events (torch.profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
    return peak


@pytest.mark.parametrize("extra", [
    ["data.resolution=128", "optim.train_batch_size=4"],
    ["model.config=shapes", "optim.train_batch_size=8", "model.gradient_checkpointing=true"],
    ["model.config=shapes", "optim.train_batch_size=8", "mixed_precision='bf16'", "model.train_text_encoder=true"],
    ["model.config=shapes", "optim.train_batch_size=8", "lora.enabled=true", "model.gradient_checkpointing=true"],
], ids=["tiny-128px", "shapes-checkpointing", "shapes-bf16-text-encoder", "shapes-lora-checkpointing"])
def test_activation_peak_matches_the_cpu_allocator(tmp_path, shapes_dir, extra):
    cfg = _cfg(tmp_path, shapes_dir, "cache.latents=false", *extra)  # the VAE encodes every step
    est = estimate(cfg)
    trainer = Trainer(cfg)
    batch = next(iter(trainer.loader))
    latents = trainer.latents_of(batch, GlobalDraw(0, 0, 0, 1, "cpu"))
    encode = _allocator_peak(lambda: trainer.latents_of(batch, GlobalDraw(0, 0, 0, 1, "cpu")))
    trainer.latents_of = lambda *_: latents  # measure forward + backward alone

    def step():
        trainer.acc.backward(trainer.compute_loss(batch, 1))

    step()  # a first step, so that lazily created buffers are not counted
    trainer.optimizer.zero_grad(set_to_none=True)
    backward = _allocator_peak(step)
    assert 0.9 < est.backward / backward < 1.1, (est.backward, backward)
    assert 0.9 < est.gpu[VAE_ENCODE] / encode < 1.25, (est.gpu[VAE_ENCODE], encode)


@pytest.mark.parametrize("extra", [["ema.enabled=true"],
                                   ["lora.enabled=true", "lora.text_encoder=true"],
                                   ["model.train_text_encoder=true", "export.dtype=fp16", "export.single_file=true"]],
                         ids=["full-ema", "lora", "text-encoder-fp16-single-file"])
def test_checkpoint_and_export_sizes_bound_the_files_written(tmp_path, shapes_dir, extra):
    cfg = _cfg(tmp_path, shapes_dir, *extra)
    est = estimate(cfg, trace=False)
    train(cfg)

    def size(*paths):
        return sum(f.stat().st_size for p in paths if p.exists() for f in ([p] if p.is_file() else p.rglob("*"))
                   if f.is_file())

    checkpoint = size(tmp_path / "checkpoints/step-0000001")
    export = size(tmp_path / "model", tmp_path / "lora", tmp_path / "model.safetensors")
    # exact tensor bytes + EXTRA_FILES for headers, configs, tokenizer and small states
    assert checkpoint <= est.checkpoint_bytes <= checkpoint + EXTRA_FILES
    assert export <= est.export_bytes <= export + EXTRA_FILES


def test_suggestions_fit_and_are_what_they_claim(tmp_path):
    cfg = load_config(ROOT / "configs/train/tiny.yaml", [f"output_dir={tmp_path}", "model.config=shapes",
                                                         "optim.train_batch_size=16", "ema.enabled=true"])
    base = estimate(cfg)
    memory = int(base.peak / FITS * 0.97)  # just too small
    tips = suggest(cfg, memory)
    assert tips, "nothing suggested"
    for overrides, peak in tips:
        assert peak <= FITS * memory < base.peak
        assert estimate(load_config(cfg, overrides)).peak == peak
    ckpt = estimate(load_config(cfg, ["model.gradient_checkpointing=true"]))
    assert ckpt.gpu["activations kept for backward"] < base.gpu["activations kept for backward"] / 2
    eight_bit = estimate(load_config(cfg, ["optim.use_8bit_adam=true"]))
    assert eight_bit.gpu["optimizer states (adamw8bit)"] < base.gpu["optimizer states (adamw)"] / 3


def test_the_cli_prints_the_table_and_refuses_an_unreadable_size(capsys):
    assert main(["estimate", "--config", "tiny", "--memory", "1MiB"]) == 0
    out = capsys.readouterr().out
    assert "| **peak**" in out and "Does not fit in 1.0 MiB" in out and "Disk: one checkpoint" in out
    assert main(["estimate", "--config", "tiny", "--memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the memory size 'lots'" in err and "Traceback" not in err
    assert (parse_size("24GiB"), parse_size("80GB"), parse_size("1.5k")) == (24 * 2**30, 80 * 10**9, 1500)
