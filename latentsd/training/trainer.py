"""The training loop: Accelerate-driven, one process or many, exactly resumable.

Every random draw is a pure function of (seed, step, sample index): the data order of an epoch, each
sample's crop/flip/caption, and each sample's noise and timestep. So a resumed run repeats an
uninterrupted one bit for bit, and 1 process × batch 2b sees the same samples, noise and timesteps as
2 processes × batch b.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, ProjectConfiguration
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ..config import TrainConfig, save_config
from ..latents import encode, latent_shape
from ..models import Components, build_components, load_components
from ..text import PromptEncoder
from .checkpoint import resolve_resume, save_checkpoint
from .losses import loss_target, per_sample_mse

logger = logging.getLogger(__name__)


class EpochSampler(Sampler):
    """A permutation per epoch drawn from (seed, epoch): the order does not depend on any RNG state."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


@dataclass
class TrainState:
    """The counters a checkpoint must restore (registered with accelerate)."""

    step: int = 0
    images_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.images_seen = state["step"], state["images_seen"]


class GlobalDraw:
    """Random numbers for the *global* batch of one micro-step, of which this rank keeps its slice.

    Drawing for all ranks and slicing makes the numbers independent of how the batch is split.
    """

    def __init__(self, seed: int, micro_step: int, rank: int, world: int, device):
        self.gen = torch.Generator(device).manual_seed(seed * 1_000_003 + micro_step + 1)
        self.rank, self.world, self.device = rank, world, device

    def _slice(self, x: torch.Tensor, local: int) -> torch.Tensor:
        return x[self.rank * local:(self.rank + 1) * local]

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        full = torch.randn((shape[0] * self.world, *shape[1:]), generator=self.gen, device=self.device)
        return self._slice(full, shape[0])

    def randint(self, high: int, n: int) -> torch.Tensor:
        full = torch.randint(0, high, (n * self.world,), generator=self.gen, device=self.device)
        return self._slice(full, n)


def load_model(cfg: TrainConfig) -> Components:
    if cfg.model.pretrained:
        return load_components(cfg.model.pretrained, revision=cfg.model.revision, variant=cfg.model.variant)
    return build_components(cfg.model.config, seed=cfg.seed)


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    from accelerate.state import AcceleratorState

    # A second run in the same process (the demo, tests) may ask for another precision; keep the
    # process group (PartialState), forget the previous run's settings.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Several processes but no GPU (`accelerate launch --multi_gpu` on a CPU box): gloo CPU ranks.
    cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=cpu_ranks,
        mixed_precision=cfg.mixed_precision,
        # sync_with_dataloader=False: accumulation runs across epoch ends, so step k is always
        # micro-batches [k·accum, (k+1)·accum) and a resume knows exactly where it is.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.optim.gradient_accumulation_steps, sync_with_dataloader=False),
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=str(Path(cfg.output_dir) / "logs")),
        # each rank reads its own batches (also for streams: batches hold caption strings)
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False, dispatch_batches=False),
    )


def make_optimizer(params, cfg: TrainConfig, num_processes: int):
    """AdamW (fused when on CUDA; 8-bit with bitsandbytes when asked) and a diffusers LR schedule."""
    from diffusers.optimization import get_scheduler

    o = cfg.optim
    lr = o.learning_rate * (o.train_batch_size * o.gradient_accumulation_steps * num_processes if o.scale_lr else 1)
    kwargs = dict(lr=lr, betas=(o.adam_beta1, o.adam_beta2), weight_decay=o.adam_weight_decay, eps=o.adam_epsilon)
    params = list(params)
    if o.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ValueError("optim.use_8bit_adam=true needs bitsandbytes: pip install bitsandbytes "
                             "(CUDA only), or set optim.use_8bit_adam=false") from err
        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        fused = all(p.is_cuda for p in params)
        optimizer = torch.optim.AdamW(params, fused=fused or None, **kwargs)
    # accelerate steps the schedule once per process per optimizer step (like diffusers' scripts)
    schedule = get_scheduler(o.lr_scheduler, optimizer, num_warmup_steps=o.lr_warmup_steps * num_processes,
                             num_training_steps=cfg.max_steps * num_processes)
    return optimizer, schedule


class Trainer:
    """Fine-tune (or train from scratch) the UNet, optionally the text encoder, of a latent diffusion model."""

    def __init__(self, cfg: TrainConfig):
        from ..data.datasets import build_train_dataset, collate

        self.cfg = cfg
        self.acc = acc = make_accelerator(cfg)
        self.weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        self.parts = parts = load_model(cfg)
        self.trainable = self._set_up_models()

        self.dataset = build_train_dataset(cfg.data, seed=cfg.seed)
        sized = not cfg.data.streaming  # a stream shuffles itself (buffer) and has no length
        sampler = EpochSampler(len(self.dataset), cfg.seed, cfg.data.shuffle) if sized else None
        loader = DataLoader(self.dataset, batch_size=cfg.optim.train_batch_size, sampler=sampler,
                            collate_fn=collate, num_workers=cfg.data.num_workers, drop_last=True)
        optimizer, schedule = make_optimizer((p for m in self.trainable for p in m.parameters()), cfg,
                                             acc.num_processes)
        *self.trainable, self.optimizer, self.loader, self.lr_schedule = acc.prepare(
            *self.trainable, optimizer, loader, schedule)
        if sized and len(self.loader) < 1:
            raise ValueError(f"the dataset has {len(self.dataset)} samples, fewer than one global batch "
                             f"({cfg.optim.train_batch_size} x {acc.num_processes} processes): lower "
                             "optim.train_batch_size or add data")
        self.state, self.skipped = TrainState(), 0
        acc.register_for_checkpointing(self.state)
        self.prompts = PromptEncoder(parts.tokenizer, parts.text_encoder, max_chunks=1)
        self.scheduler = parts.scheduler

    def _set_up_models(self) -> list[torch.nn.Module]:
        """Freeze what is not trained (cast to the compute dtype); keep trained weights in fp32."""
        p, m, device = self.parts, self.cfg.model, self.acc.device
        trained = [p.unet] + ([p.text_encoder] if m.train_text_encoder else [])
        for module in (p.vae, p.text_encoder, p.unet):
            is_trained = module in trained
            module.requires_grad_(is_trained).train(is_trained)
            dtype = torch.float32 if is_trained else self.weight_dtype
            module.to(device) if module.dtype == dtype else module.to(device, dtype=dtype)
        if m.gradient_checkpointing:
            for module in trained:
                module.gradient_checkpointing_enable() if hasattr(module, "gradient_checkpointing_enable") \
                    else module.enable_gradient_checkpointing()
        if m.attention == "xformers":
            p.unet.enable_xformers_memory_efficient_attention()
        return trained

    @property
    def unet(self):
        return self.trainable[0]

    def compute_loss(self, batch: dict, micro_step: int) -> torch.Tensor:
        """One micro-batch: encode, noise, predict, per-sample MSE averaged (what the loop backpropagates)."""
        acc, p = self.acc, self.parts
        draw = GlobalDraw(self.cfg.seed, micro_step, acc.process_index, acc.num_processes, acc.device)
        pixels = batch["pixel_values"].to(acc.device, self.weight_dtype)
        with torch.no_grad():
            latents = encode(p.vae, pixels, noise=draw.randn(latent_shape(p.vae, pixels.shape))).float()
        with torch.set_grad_enabled(self.cfg.model.train_text_encoder):
            embeds = self.prompts(batch["caption"])
        noise, timesteps = draw.randn(latents.shape), draw.randint(len(self.scheduler), latents.shape[0])
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        target = loss_target(self.scheduler, latents, noise, timesteps, self.cfg.model.prediction_type)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=embeds.to(latents.dtype), return_dict=False)[0]
        return per_sample_mse(pred, target).mean()

    # ---- the loop ---------------------------------------------------------------------------------
    def resume(self) -> None:
        path = resolve_resume(self.cfg.resume, self.cfg.output_dir)
        if path is not None:
            self.acc.load_state(str(path))
            self.acc.print(f"resumed from {path} at step {self.state.step}")

    def batches(self):
        """Micro-batches from where the state says we are, epoch after epoch, forever."""
        micro = self.state.step * self.cfg.optim.gradient_accumulation_steps
        stream = self.cfg.data.streaming
        epoch, skip = (0, micro) if stream else divmod(micro, len(self.loader))
        while True:
            self.loader.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            loader = self.acc.skip_first_batches(self.loader, skip) if skip and not stream else self.loader
            produced = False
            for batch in loader:
                produced = True
                if stream and skip:  # a stream cannot seek: replay it and drop what was trained on
                    skip -= 1
                    continue
                yield micro, batch
                micro += 1
            if not produced:
                raise ValueError("the dataset yielded no full batch: lower optim.train_batch_size or add data")
            epoch, skip = epoch + 1, skip if stream else 0

    def optimizer_step(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss)
        if self.acc.sync_gradients:
            self.acc.clip_grad_norm_([p for m in self.trainable for p in m.parameters()], self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self) -> dict:
        """Train to ``max_steps`` (resuming if asked), checkpoint, export; returns a summary."""
        cfg, acc, state = self.cfg, self.acc, self.state
        self.resume()
        if acc.is_main_process:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        if cfg.report_to != "none":
            acc.init_trackers("latentsd", config=_flat(cfg))
        log = MetricsLog(Path(cfg.output_dir) / "logs" / "metrics.jsonl", acc.is_main_process)
        bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", disable=not acc.is_local_main_process)
        started, start_step, window = time.perf_counter(), state.step, []
        for micro, batch in self.batches():
            if state.step >= cfg.max_steps:
                break
            with acc.accumulate(*self.trainable):
                loss = self.compute_loss(batch, micro)
                self.optimizer_step(loss)
            window.append(loss.detach())
            self.skipped += int(batch["num_skipped"])
            if not acc.sync_gradients:
                continue
            state.step += 1
            state.images_seen += cfg.optim.train_batch_size * acc.num_processes * len(window)
            mean_loss = acc.gather(torch.stack(window).mean()[None]).mean().item()  # once per step, for logs
            window = []
            metrics = {"loss": mean_loss, "lr": self.lr_schedule.get_last_lr()[0],
                       "images_per_s": (state.step - start_step) * self.global_batch / (time.perf_counter() - started)}
            log.write(state.step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{metrics['lr']:.2e}", img_s=f"{metrics['images_per_s']:.1f}")
            if state.step % cfg.log_every == 0 and cfg.report_to != "none":
                acc.log(metrics, step=state.step)
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps:
                self.checkpoint()
        bar.close()
        model_dir = self.export(Path(cfg.output_dir) / "model")
        acc.end_training()
        return self.summary(started, start_step, model_dir)

    @property
    def global_batch(self) -> int:
        return self.cfg.optim.train_batch_size * self.acc.num_processes * self.cfg.optim.gradient_accumulation_steps

    def checkpoint(self) -> None:
        path = save_checkpoint(self.acc, self.cfg.output_dir, self.state.step, self.cfg,
                               self.cfg.checkpoints_total_limit)
        if self.cfg.export.every_checkpoint:
            self.export(path / "model")

    def export(self, path: Path) -> Path:
        """A diffusers-layout pipeline folder (our scheduler config), written by the main process only."""
        from ..pipeline import LatentDiffusionPipeline

        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.cfg.export.dtype]
            p = self.parts
            unet = self.acc.unwrap_model(self.unet)
            text_encoder = self.acc.unwrap_model(self.trainable[1]) if self.cfg.model.train_text_encoder else p.text_encoder
            pipe = LatentDiffusionPipeline(vae=p.vae, text_encoder=text_encoder, tokenizer=p.tokenizer, unet=unet,
                                           scheduler=p.scheduler)
            _save_atomically(pipe, path, dtype)
        self.acc.wait_for_everyone()
        return path

    def summary(self, started: float, start_step: int, model_dir: Path) -> dict:
        seconds = time.perf_counter() - started
        out = {"steps": self.state.step, "steps_this_run": self.state.step - start_step, "seconds": round(seconds, 1),
               "images_seen": self.state.images_seen, "skipped_samples": self.skipped,
               "output_dir": str(self.cfg.output_dir), "model": str(model_dir)}
        self.acc.print(f"trained {out['steps_this_run']} steps (to step {out['steps']}) in {seconds:.1f}s; "
                       f"checkpoints in {self.cfg.output_dir}/checkpoints, model in {model_dir}"
                       + (f"; skipped {out['skipped_samples']} unreadable samples" if out["skipped_samples"] else ""))
        return out


class MetricsLog:
    """One JSON line per optimizer step (main process): survives crashes, easy to diff across runs."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, metrics: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")


def read_metrics(output_dir: str | Path) -> dict[int, dict]:
    """Metrics by step; after a resume, the last line written for a step wins."""
    lines = (Path(output_dir) / "logs" / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec for rec in map(json.loads, lines)}


def _save_atomically(pipe, path: Path, dtype: torch.dtype) -> None:
    import shutil

    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    if dtype != torch.float32:  # cast a copy on disk, never the weights being trained
        from ..pipeline import LatentDiffusionPipeline

        LatentDiffusionPipeline.from_pretrained(tmp, torch_dtype=dtype).save_pretrained(tmp)
    old = path.with_name(f".old-{path.name}")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def _flat(cfg: TrainConfig) -> dict:
    from ..config import config_to_dict

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v if isinstance(v, (int, float, str, bool)) else str(v)
    return dict(walk(config_to_dict(cfg)))


def train(cfg: TrainConfig) -> dict:
    """Build a :class:`Trainer` from a config and run it."""
    return Trainer(cfg).run()
