"""The training loop: Accelerate-driven, one process or many, exactly resumable.

Every random draw is a pure function of (seed, step, sample index): the data order of an epoch, each
sample's crop/flip/caption, and each sample's noise and timestep. So a resumed run repeats an
uninterrupted one bit for bit, and 1 process × batch 2b sees the same samples, noise and timesteps as
2 processes × batch b.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..config import TrainConfig, save_config
from ..data.cache import latents_from_params
from ..data.masks import latent_mask_weights
from ..latents import encode, latent_shape
from .checkpoint import TrainState, resolve_resume, save_checkpoint, save_pipeline_atomically
from .distributed import check_start, even_shares, full_weight_module, trained_parameters
from .dreambooth import make_dreambooth, prior_loss_weights
from .ema import make_ema
from .guards import StepGuard
from .logs import MetricsLog, flat_config
from .preflight import preflight
from .rng import EpochSampler, GlobalDraw
from .setup import TORCH_DTYPES, scheduler_changes, load_model, make_accelerator, make_optimizer, set_attention, \
    speed_up, uncompiled, align_optimizer_state
from .losses import huber_c, loss_target, make_noise, perturb_input_noise, sample_timesteps, snr_weights, weighted_loss
from .optimizers import EvalWeights
from .textual_inversion import make_textual_inversion

logger = logging.getLogger(__name__)


class Trainer:
    """Fine-tune (or train from scratch) the UNet, optionally the text encoder, of a latent diffusion model."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.acc = acc = make_accelerator(cfg)
        preflight(cfg, acc.is_main_process, acc.num_processes)  # writable output_dir, free disk, GPU estimate
        check_start(acc, cfg)  # shared output_dir, DeepSpeed settings, FSDP: fail on every rank before loading
        self.weight_dtype = TORCH_DTYPES[cfg.mixed_precision]
        self.parts = parts = load_model(cfg)
        self.dreambooth = make_dreambooth(cfg, parts, acc)  # class images from the untouched base model (cached)
        self.ti = make_textual_inversion(cfg.ti, parts.tokenizer)  # new tokens in the tokenizer
        self.scheduler = parts.scheduler
        self.prediction_type = parts.scheduler.config.prediction_type
        self.text_encoder_trained = cfg.text_encoder_trained()
        modules, params = self._set_up_models()

        self.dataset, loader, self.holdout = self._make_data()
        optimizer, schedule = make_optimizer(params, cfg, acc.num_processes)
        *self.trainable, self.optimizer, self.loader, self.lr_schedule = acc.prepare(*modules, optimizer, loader, schedule)
        # FSDP swaps the parameters for sharded ones in prepare: clip and average those
        self.params = trained_parameters(self.trainable)
        self.unet_dtype = parts.unet.dtype  # its inputs' dtype (diffusers' .dtype walks every module: once, not a step)
        self.ema = make_ema(self.params, cfg.ema)
        self.eval_weights = EvalWeights(self.optimizer)  # schedule-free: train mode; eval weights to validate, export
        self.state, self.skipped = TrainState(), 0  # saved as JSON by checkpoint(), not pickled by accelerate
        self.guard = StepGuard(acc, cfg, self.state)
        # a trained text encoder is called through its DDP wrapper, so its gradients are synchronised
        text_encoder = self.trainable[1] if self.text_encoder_trained else parts.text_encoder
        self.prompts = self.ti.prompt_encoder(parts.tokenizer, text_encoder, max_chunks=1)  # multi-vector tokens

    def _make_data(self):
        """The training loader (held-out samples excluded) and the held-out loader for the validation loss."""
        from ..data.datasets import collate

        cfg = self.cfg
        dataset = self.dreambooth.instance_dataset(cfg.data, cfg.seed)
        if cfg.data.streaming:  # a stream shuffles itself (buffer) and has no length
            if cfg.validation.holdout or cfg.data.buckets:
                raise ValueError("validation.holdout and data.buckets need a map-style dataset: "
                                 "set data.streaming=false")
            return dataset, DataLoader(dataset, batch_size=cfg.optim.train_batch_size, collate_fn=collate,
                                       num_workers=cfg.data.num_workers, drop_last=True), None
        n, hold = len(dataset), cfg.validation.holdout
        if n - hold < cfg.optim.train_batch_size * self.acc.num_processes:
            raise ValueError(f"the dataset has {n} samples ({hold} held out), fewer than one global batch "
                             f"({cfg.optim.train_batch_size} x {self.acc.num_processes} processes): lower "
                             "optim.train_batch_size or validation.holdout, or add data")
        loader_args = dict(collate_fn=collate, num_workers=cfg.data.num_workers)
        buckets = self._bucket_sampler(dataset, range(hold, n)) if cfg.data.buckets else None  # before the cache:
        dataset = self._maybe_cached(dataset, loader_args)  # it encodes each image at its bucket's size
        dataset = self.dreambooth.add_class_images(dataset, loader_args, self._maybe_cached)  # prior preservation
        if buckets is not None:  # batches of one aspect bucket each, images resized to cover it, not square-cropped
            loader = DataLoader(dataset, batch_sampler=buckets, **loader_args)
        else:
            sampler = EpochSampler(range(hold, n), cfg.seed, cfg.data.shuffle)
            loader = DataLoader(dataset, batch_size=cfg.optim.train_batch_size, sampler=sampler, drop_last=True,
                                **loader_args)
        return dataset, loader, (self._holdout_batches(hold) if hold else None)

    def _maybe_cached(self, dataset, loader_args: dict):
        """Serve precomputed VAE posteriors / text embeddings when the cache config asks (all ranks share the work)."""
        from ..data.cache import build_cached_dataset, cache_modes, collate_cached, resolve_cache_dir

        latents, text = cache_modes(self.cfg)
        if not (latents or text):
            return dataset
        p = self.parts
        loader_args["collate_fn"] = collate_cached
        return build_cached_dataset(
            dataset, resolve_cache_dir(self.cfg), vae=p.vae if latents else None,
            tokenizer=p.tokenizer if text else None, text_encoder=p.text_encoder if text else None,
            shard_size=self.cfg.cache.shard_size, batch_size=self.cfg.optim.train_batch_size, accelerator=self.acc)

    def _bucket_sampler(self, dataset, indices):
        from ..data.buckets import make_bucket_sampler

        cfg = self.cfg
        sampler = make_bucket_sampler(dataset, cfg.data, cfg.optim.train_batch_size, cfg.seed, indices=indices,
                                      progress=None if self.acc.is_local_main_process else False)
        if len(sampler) < self.acc.num_processes:
            raise ValueError("no aspect bucket holds a full global batch: lower optim.train_batch_size, raise "
                             "data.bucket_step, or add data")
        self.acc.print(f"aspect buckets (h x w: images): {sampler.histogram}")
        return sampler

    def _holdout_batches(self, hold: int) -> list[dict]:
        """Held-out samples without augmentation or caption dropout, this rank's share, loaded once.

        Every rank gets the same number of batches (padding repeats a sample, ``weight`` 0 masks it out of the
        loss): each forward of an FSDP or DDP module is a collective, so unequal counts would hang.
        """
        import dataclasses

        from ..data.datasets import build_train_dataset, collate

        plain = dataclasses.replace(self.cfg.data, caption_dropout=0.0, random_flip=False, center_crop=True,
                                    shuffle_tags=False, tag_dropout=0.0, max_samples=hold)
        dataset = build_train_dataset(plain, seed=self.cfg.seed)
        shares = even_shares(hold, self.acc.process_index, self.acc.num_processes, self.cfg.optim.train_batch_size)
        return [{**collate([dataset[i] for i in ids]), "weight": torch.tensor(real, dtype=torch.float32)}
                for ids, real in shares]

    def _set_up_models(self) -> tuple[list[torch.nn.Module], list[torch.nn.Parameter]]:
        """Freeze what is not trained (cast to the compute dtype); trained weights stay fp32."""
        p, m, device = self.parts, self.cfg.model, self.acc.device
        modules = [p.unet] + ([p.text_encoder] if self.text_encoder_trained else [])
        full = [] if self.cfg.lora.enabled or self.ti.enabled else modules
        for module in (p.vae, p.text_encoder, p.unet):
            module.requires_grad_(module in full).train(module in modules)
            dtype = torch.float32 if module in full else self.weight_dtype
            module.to(device) if module.dtype == dtype else module.to(device, dtype=dtype)
        if self.cfg.lora.enabled:
            from .adapter_checkpoints import register_adapter_checkpoints
            from .lora import add_lora

            params = add_lora(p.unet, p.text_encoder if self.cfg.lora.text_encoder else None, self.cfg.lora)
            register_adapter_checkpoints(self.acc)  # checkpoints hold the adapters, not the frozen base weights
        else:
            params = [q for module in full for q in module.parameters()]
        params += self.ti.add_rows(p.text_encoder)  # textual inversion: the new tokens' vectors
        if m.gradient_checkpointing:
            for module in modules:
                module.gradient_checkpointing_enable() if hasattr(module, "gradient_checkpointing_enable") \
                    else module.enable_gradient_checkpointing()
        set_attention(p.unet, m.attention)
        speed_up(p.unet, self.cfg.optim)  # optim.channels_last, optim.compile
        p.vae.to(memory_format=torch.channels_last)  # frozen: encodes faster (shapes VAE, CPU, batch 32: 65 -> 57 ms)
        return modules, params

    @property
    def unet(self):
        return self.trainable[0]

    def compute_loss(self, batch: dict, micro_step: int) -> torch.Tensor:
        """One micro-batch: latents, conditioning, noise, prediction, weighted loss (what the loop backpropagates)."""
        acc, lc = self.acc, self.cfg.loss
        draw = GlobalDraw(self.cfg.seed, micro_step, acc.process_index, acc.num_processes, acc.device)
        latents = self.latents_of(batch, draw)
        embeds = self.embeds_of(batch)
        noise = make_noise(draw, tuple(latents.shape), lc.noise_offset)
        timesteps = sample_timesteps(draw, latents.shape[0], len(self.scheduler), lc)
        noisy = self.scheduler.add_noise(latents, perturb_input_noise(draw, noise, lc.input_perturbation), timesteps)
        target = loss_target(self.scheduler, latents, noise, timesteps, self.prediction_type)
        # inputs in the UNet's own dtype (fp16/bf16 base weights under LoRA; autocast covers the rest)
        dtype = self.unet_dtype
        pred = self.unet(noisy.to(dtype), timesteps, encoder_hidden_states=embeds.to(dtype), return_dict=False)[0]
        snr = self.scheduler.snr(timesteps)
        weights = snr_weights(snr, self.prediction_type, lc.snr_gamma, lc.inverse_snr_max, lc.debiased_estimation)
        weights = weights * prior_loss_weights(batch, weights)  # DreamBooth: instance + w x class halves
        masks = latent_mask_weights(batch.get("loss_mask"), latents.shape[-2:], lc.unmasked_weight)  # None: no mask
        return weighted_loss(pred, target, weights, lc.type, huber_c(lc, timesteps, snr, len(self.scheduler)), masks)

    def latents_of(self, batch: dict, draw: GlobalDraw) -> torch.Tensor:
        """Scaled latents: a fresh posterior sample, from pixels (or from cached posterior parameters)."""
        vae = self.parts.vae
        if "latent_params" in batch:  # cached posterior: same sample as encoding, for the same noise
            params = batch["latent_params"].to(self.acc.device, self.weight_dtype)
            b, c2, h, w = params.shape
            return latents_from_params(vae, params, draw.randn((b, c2 // 2, h, w))).float()
        pixels = batch["pixel_values"].to(self.acc.device, self.weight_dtype)
        with torch.no_grad():
            return encode(vae, pixels, noise=draw.randn(latent_shape(vae, pixels.shape))).float()

    def embeds_of(self, batch: dict) -> torch.Tensor:
        if "prompt_embeds" in batch:  # cached (frozen text encoder)
            return batch["prompt_embeds"].to(self.acc.device)
        with torch.set_grad_enabled(self.text_encoder_trained):
            return self.prompts(batch["caption"])

    # ---- the loop ---------------------------------------------------------------------------------
    def resume(self) -> None:
        path = resolve_resume(self.cfg.resume, self.cfg.output_dir)
        if path is not None:
            from .safe_resume import check_resumable

            check_resumable(path)  # nothing load_state unpickles may be more than plain data
            self.acc.load_state(str(path))
            align_optimizer_state(self.optimizer)  # a run with another optim.channels_last wrote these
            self.state.load(path)
            self.ema.load(path / "ema.safetensors")
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

    def optimizer_step(self, window: list[torch.Tensor], captions: list[str]) -> dict:
        """Clip, then the step's one host sync (:class:`StepGuard`): apply the update, or skip a non-finite one on
        every rank alike (no optimizer, LR-schedule or EMA step); returns the step's metrics."""
        norm = self.acc.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        verdict = self.guard.check(window, norm, captions)
        if verdict.apply:
            self.optimizer.step()
            self.lr_schedule.step()
            self.ema.maybe_update(self.state.step)
        else:
            self.guard.skip_update()
        self.optimizer.zero_grad(set_to_none=True)
        return self.step_metrics(verdict)

    def run(self) -> dict:
        """Train to ``max_steps`` (resuming if asked), validate, checkpoint, export; returns a summary."""
        cfg, acc, state = self.cfg, self.acc, self.state
        self.resume()
        if acc.is_main_process:
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            save_config(cfg, Path(cfg.output_dir) / "config.yaml")
        if cfg.report_to != "none":
            acc.init_trackers("latentsd", config=flat_config(cfg))
        self.log = MetricsLog(Path(cfg.output_dir) / "logs" / "metrics.jsonl", acc.is_main_process)
        bar = tqdm(total=cfg.max_steps, initial=state.step, desc="train", disable=not acc.is_local_main_process)
        self.clock, window, captions = (time.perf_counter(), state.step), [], []
        for micro, batch in self.batches():
            if state.step >= cfg.max_steps:
                break
            with acc.accumulate(*self.trainable):
                loss = self.compute_loss(batch, micro)
                acc.backward(loss)
            window.append(loss.detach())
            captions += batch["caption"]
            self.skipped += int(batch["num_skipped"])
            if not acc.sync_gradients:
                continue
            state.step += 1
            state.images_seen += cfg.optim.train_batch_size * acc.num_processes * len(window)
            metrics = self.optimizer_step(window, captions)
            window, captions = [], []
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", img_s=f"{metrics['images_per_s']:.1f}")
            self.at_step_end(metrics)
            self.guard.stop_if_diverging()
        bar.close()
        model_dir = self.export(Path(cfg.output_dir) / "model")
        acc.end_training()
        return self.summary(model_dir)

    def step_metrics(self, verdict) -> dict:
        """Loss averaged over micro-batches and ranks, gradient norm (both from the guard's sync), lr, throughput."""
        seconds = time.perf_counter() - self.clock[0]
        return {"loss": verdict.loss, "grad_norm": verdict.grad_norm, "lr": self.lr_schedule.get_last_lr()[0],
                "images_per_s": (self.state.step - self.clock[1]) * self.global_batch / max(seconds, 1e-9),
                "skipped_steps": self.state.skipped_steps}

    def at_step_end(self, metrics: dict) -> None:
        """Logging, validation and checkpoints, each on its own schedule (and all at the last step)."""
        cfg, step = self.cfg, self.state.step
        last = step == cfg.max_steps
        if cfg.validation.every and (step % cfg.validation.every == 0 or last):
            metrics.update(self.validate())
        self.log.write(step, metrics)
        if cfg.report_to != "none" and (step % cfg.log_every == 0 or last):
            self.acc.log(metrics, step=step)
        if step % cfg.checkpoint_every == 0 or last:
            self.checkpoint()

    @property
    def global_batch(self) -> int:
        return self.cfg.optim.train_batch_size * self.acc.num_processes * self.cfg.optim.gradient_accumulation_steps

    def pipeline(self):
        """The model being trained as a ``LatentDiffusionPipeline``: unwrapped modules sharing the trained weights,
        or under FSDP full-weight copies gathered from the shards (then every rank must call it)."""
        from ..pipeline import LatentDiffusionPipeline

        p = self.parts
        unet = full_weight_module(self.acc, self.unet)
        text_encoder = full_weight_module(self.acc, self.trainable[1]) if self.text_encoder_trained else p.text_encoder
        pipe = LatentDiffusionPipeline(vae=p.vae, text_encoder=text_encoder, tokenizer=p.tokenizer, unet=unet,
                                       scheduler=p.scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def validate(self) -> dict:
        """Grid of validation images (all ranks share the prompts) and the held-out loss, with EMA weights."""
        from ..schedulers import DDIMScheduler
        from .trackers import log_validation_images
        from .validation import save_validation_grid, validation_images, validation_loss

        cfg, out = self.cfg, {}
        modules = [self.acc.unwrap_model(m) for m in self.trainable]
        with self.eval_weights(), self.ema.swapped_in(), _eval_mode(modules), uncompiled():
            if self.holdout:
                out["val_loss"] = validation_loss(self, self.holdout)
            if cfg.validation.prompts:
                pipe = self.pipeline()
                pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
                images = validation_images(self.acc, pipe, cfg)
                if self.acc.is_main_process:
                    grid = save_validation_grid(images, cfg, self.state.step)
                    prompts = [p for p in cfg.validation.prompts for _ in range(cfg.validation.num_images_per_prompt)]
                    log_validation_images(self.acc.trackers, images, prompts, self.state.step)
                    self.acc.print(f"step {self.state.step}: validation grid {grid}")
        return out

    def checkpoint(self) -> None:
        if not self.guard.may_checkpoint():  # mid-divergence: keep the checkpoints from before it
            return
        self.guard.check_weights(self.params, self.ema, f"checkpoint step-{self.state.step:07d}")  # never NaN on disk
        path = save_checkpoint(self.acc, self.cfg.output_dir, self.state.step, self.cfg,
                               self.cfg.checkpoints_total_limit, extra={"ema.safetensors": self.ema.state_dict()},
                               state=self.state.state_dict())
        if self.cfg.export.every_checkpoint:
            self.export(path / "model")

    def export(self, path: Path) -> Path:
        """A diffusers-layout pipeline folder, main process only: EMA weights when enabled, every tensor in
        ``export.dtype`` (whatever dtype each part was trained or frozen in), the source folder's sampler and
        extra components (SD-1.5's PNDM, safety checker and feature extractor)."""
        from .checkpoint import export_scheduler, shipped_extras

        self.guard.check_weights(self.params, self.ema, f"the export {path}")
        with self.eval_weights(), self.ema.swapped_in():
            pipe = self.pipeline()  # on every rank: under FSDP it gathers the full weights
            if self.acc.is_main_process:
                m, dtype = self.cfg.model, TORCH_DTYPES[self.cfg.export.dtype]
                pipe.scheduler = export_scheduler(m.pretrained, m.revision, scheduler_changes(self.cfg),
                                                  self.scheduler)
                # frozen parts were cast to the compute dtype: export (and merge LoRA into) the source's weights
                source = load_model(self.cfg) if self.weight_dtype != torch.float32 else None
                if source is not None:
                    pipe.vae = source.vae
                    pipe.text_encoder = pipe.text_encoder if self.text_encoder_trained else source.text_encoder
                if self.cfg.lora.enabled:
                    self._export_lora(pipe, path, dtype, source)
                self.ti.export(pipe, path, dtype, source)  # embedding files; the new rows into the text encoder
                del source  # the source parts the export does not use (its UNet, for a full fine-tune)
                extras = shipped_extras(m.pretrained, pipe.components, m.revision, m.variant) if m.pretrained else {}
                save_pipeline_atomically(pipe, path, dtype, extras)
                if self.cfg.export.single_file:  # the same weights as one A1111 / ComfyUI file beside the folder
                    from ..single_file import save_single_file

                    save_single_file(path, path.with_suffix(".safetensors"), dtype)
        self.acc.wait_for_everyone()
        return path

    def _export_lora(self, pipe, path: Path, dtype: torch.dtype, source=None) -> None:
        """Adapters in both formats (``lora/``, in ``dtype``) and, in ``pipe``, the adapted models merged in fp32 on
        the CPU for the full model folder: into the ``source`` weights when given (the base was cast for compute),
        so that folder equals the source model plus the exported adapters."""
        from .lora import LORA_DIR_NAME, export_lora, merge_into, merged_copy

        adapted = {"unet": pipe.unet, **({"text_encoder": pipe.text_encoder} if self.cfg.lora.text_encoder else {})}
        export_lora(path.parent / LORA_DIR_NAME, adapted["unet"], adapted.get("text_encoder"), dtype)
        for name, model in adapted.items():
            setattr(pipe, name, merged_copy(model) if source is None else merge_into(getattr(source, name), model))

    def summary(self, model_dir: Path) -> dict:
        from ..data.datasets import data_issues, describe_data_issues

        seconds = time.perf_counter() - self.clock[0]
        issues = data_issues(self.dataset, self.skipped)  # by reason: unreadable_image, missing_caption
        out = {"steps": self.state.step, "steps_this_run": self.state.step - self.clock[1], "seconds": round(seconds, 1),
               "images_seen": self.state.images_seen, "skipped_samples": self.skipped, "data_issues": issues,
               "skipped_steps": self.state.skipped_steps, "output_dir": str(self.cfg.output_dir),
               "model": str(model_dir)}
        self.acc.print(f"trained {out['steps_this_run']} steps (to step {out['steps']}) in {seconds:.1f}s; "
                       f"checkpoints in {self.cfg.output_dir}/checkpoints, model in {model_dir}"
                       + (f"; {describe_data_issues(issues)}" if issues else "")
                       + (f"; skipped {out['skipped_steps']} non-finite steps" if out["skipped_steps"] else ""))
        return out


@contextmanager
def _eval_mode(modules):
    """Eval mode for validation (no dropout), then back to training mode."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def train(cfg: TrainConfig) -> dict:
    """Build a :class:`Trainer` from a config and run it."""
    return Trainer(cfg).run()
