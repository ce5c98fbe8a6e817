"""Train a latent diffusion model's VAE (a diffusers ``AutoencoderKL``) from scratch.

The VAE is trained first and frozen afterwards: the UNet learns in its latent space, so the latents
are rescaled to unit variance by ``scaling_factor``, which this trainer measures at the end and saves
in the VAE's config (diffusers' convention: ``latents = z * scaling_factor``).

Loss = L1 + MSE (both foreground-weighted) + ``kl_weight`` · KL. On mostly-white images (the built-in
shapes) an unweighted loss is dominated by the easy background and the decoder learns to blur the
shape; weighting non-background pixels 10× keeps colors, edges and positions (measured: ≈99-100 %
of reconstructions keep color/shape/position).

Every random draw is a function of the seed: model init of ``seed``, the data order of (seed, epoch),
the posterior noise of (seed, step). So a run resumed from a checkpoint ends bit-identical to an
uninterrupted one (same device and thread count).

Typical use (what ``latentsd train-vae --config FILE k=v ...`` runs)::

    cfg = load_vae_config("shapes_vae", ["max_steps=400"])   # latentsd/configs/train/shapes_vae.yaml, or a path
    vae_dir = train_vae(cfg)          # <output_dir>/vae, loadable with AutoencoderKL.from_pretrained
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config import load_config, opt, save_config
from ..models import load_model_config
from ..io import write_dir_atomically, write_json_atomically, write_text_atomically
from .checkpoint import checkpoint_dir, list_checkpoints, resolve_resume

__all__ = [
    "VAETrainConfig",
    "load_vae_config",
    "train_vae",
    "build_vae",
    "load_pixel_dataset",
    "foreground_weights",
    "weighted_recon_loss",
    "vae_loss",
    "measure_latent_stats",
    "reconstruction_report",
    "save_vae",
]

BACKGROUND_TOL = 2 / 127.5
"""A pixel is foreground when some channel is this far below white (2 uint8 levels), so anti-aliased
shape edges count as foreground (they carry the shape) while PNG-exact white does not."""


# --------------------------------------------------------------------------- config


@dataclass
class VAETrainConfig:
    """VAE training run (``latentsd train-vae``). Same loader and rules as the main training config."""

    output_dir: str = opt("outputs/vae", "run directory: checkpoints, metrics, summary and the final vae/ folder")
    seed: int = opt(0, "seed of model init, data order, posterior noise and the shapes data")
    model_config: str = opt("shapes", "model config: a name in latentsd/configs/models/ or a YAML path; its `vae` is built")
    dataset: str = opt("shapes:16000", "'shapes:N' (N generated shapes images) or a local imagefolder / dataset path")
    shapes: list = opt(["circle", "square", "triangle", "star"],
                       "shapes drawn for a shapes:N dataset (the VAE is the general image model: it sees every shape)")
    image_column: Optional[str] = opt(None, "image column of a non-shapes dataset; null = auto-detect")
    resolution: int = opt(64, "square training resolution (multiple of 8); images are resized + center-cropped")
    max_steps: int = opt(800, "total optimizer steps")
    batch_size: int = opt(16, "images per step")
    learning_rate: float = opt(1e-3, "AdamW peak learning rate")
    lr_min_ratio: float = opt(1.0, "cosine decay to this fraction of the peak by max_steps; 1 = constant")
    max_grad_norm: Optional[float] = opt(None, "clip the gradient norm (steadies late loss spikes); null = off")
    weight_decay: float = opt(1e-2, "AdamW decoupled weight decay")
    kl_weight: float = opt(1e-5, "weight of the KL term (per-image sum over latent elements)")
    foreground_weight: float = opt(10.0, "loss weight of pixels that differ from the white background (1 = off)")
    checkpoint_every: int = opt(200, "save a resumable checkpoint every N steps (and at the end)")
    checkpoints_total_limit: int = opt(2, "keep only the last K checkpoints; 0 = keep all")
    resume: str = opt("none", "'none', 'latest' (newest checkpoint in output_dir) or a checkpoint path")
    log_every: int = opt(10, "append loss terms to <output_dir>/metrics.jsonl every N steps")
    num_workers: int = opt(0, "DataLoader worker processes")
    device: str = opt("auto", "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    num_threads: Optional[int] = opt(None, "torch threads during this run (restored after); null = leave torch's setting alone")
    scale_samples: int = opt(512, "training images whose sampled latents give std -> scaling_factor = 1/std")
    eval_samples: int = opt(300, "fresh shapes images for the final reconstruction report (shapes data only); 0 = skip")

    def check(self):
        if not self.dataset.strip():
            yield "dataset", "is empty: use shapes:N or a local imagefolder path"
        elif self.dataset.startswith("shapes:") and not _shapes_count_ok(self.dataset):
            yield "dataset", f"expected shapes:N with N >= 1, got {self.dataset!r}"
        if self.resolution < 8 or self.resolution % 8:
            yield "resolution", f"must be a positive multiple of 8, got {self.resolution}"
        for name in ("max_steps", "batch_size", "checkpoint_every", "log_every", "scale_samples"):
            if getattr(self, name) < 1:
                yield name, f"must be >= 1, got {getattr(self, name)}"
        if self.learning_rate <= 0:
            yield "learning_rate", f"must be > 0, got {self.learning_rate}"
        for name in ("weight_decay", "kl_weight", "checkpoints_total_limit", "num_workers", "eval_samples"):
            if getattr(self, name) < 0:
                yield name, f"must be >= 0, got {getattr(self, name)}"
        if self.foreground_weight < 1:
            yield "foreground_weight", f"must be >= 1 (1 = uniform), got {self.foreground_weight}"
        if self.num_threads is not None and self.num_threads < 1:
            yield "num_threads", f"must be >= 1 or null, got {self.num_threads}"
        if not self.output_dir.strip():
            yield "output_dir", "is empty: set a run directory, e.g. output_dir=outputs/shapes_vae"
        if not self.resume.strip():
            yield "resume", "is empty: use 'none', 'latest' or a checkpoint directory path"


def _shapes_count_ok(spec: str) -> bool:
    n = spec.split(":", 1)[1]
    return n.isdigit() and int(n) >= 1


def load_vae_config(path=None, overrides=()) -> VAETrainConfig:
    """``load_config(path, overrides, cls=VAETrainConfig)``: unknown keys raise ConfigError naming them."""
    return load_config(path, overrides, cls=VAETrainConfig)


# --------------------------------------------------------------------------- data


class PixelDataset(torch.utils.data.Dataset):
    """Images of a HF dataset as ``FloatTensor[3, res, res]`` in [-1, 1] (resize + center crop, no augmentation)."""

    def __init__(self, hf_dataset, image_column: str, resolution: int):
        from ..data.transforms import ImageTransform

        self.ds, self.column = hf_dataset, image_column
        self.transform = ImageTransform(resolution, center_crop=True)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> torch.Tensor:
        from ..data.datasets import open_image

        return self.transform(open_image(self.ds[int(index)][self.column]))[0]


def load_pixel_dataset(cfg: VAETrainConfig) -> PixelDataset:
    """``shapes:N`` → N generated images (seed ``cfg.seed``); anything else → latentsd's dataset loader."""
    if cfg.dataset.startswith("shapes:"):
        from ..data.shapes import all_specs, make_shapes_dataset

        n = int(cfg.dataset.split(":", 1)[1])
        data = make_shapes_dataset(n, seed=cfg.seed, size=cfg.resolution, specs=all_specs(shapes=cfg.shapes))
        return PixelDataset(data, "image", cfg.resolution)
    from ..config import DataConfig
    from ..data.datasets import load_caption_dataset

    ds = load_caption_dataset(DataConfig(dataset=cfg.dataset, resolution=cfg.resolution))
    return PixelDataset(ds, cfg.image_column or _image_column(ds), cfg.resolution)


def _image_column(ds) -> str:
    """The column with an Image feature, else one named like an image column (captions are not needed here)."""
    import datasets

    from ..data.datasets import IMAGE_COLUMN_NAMES

    cols = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    cols = cols or [c for c in ds.column_names if c.lower() in IMAGE_COLUMN_NAMES]
    if len(cols) != 1:
        raise ValueError(f"cannot tell the image column of {list(ds.column_names)} (candidates {cols}); set image_column=NAME")
    return cols[0]


class StepBatches(torch.utils.data.Sampler):
    """Index lists for steps ``start..max_steps-1``: position p of the sample stream is item
    ``perm(seed, epoch)[p % n]`` with epoch ``p // n``, so a resumed run sees exactly the same batches."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, max_steps: int):
        self.n, self.bs, self.seed, self.start, self.stop = n, batch_size, seed, start, max_steps

    def _perm(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self):
        perm, epoch = None, -1
        for step in range(self.start, self.stop):
            batch = []
            for p in range(step * self.bs, (step + 1) * self.bs):
                if p // self.n != epoch:
                    epoch = p // self.n
                    perm = self._perm(epoch)
                batch.append(perm[p % self.n])
            yield batch

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


# --------------------------------------------------------------------------- model and loss


def build_vae(model_config: str | dict, seed: int = 0):
    """Random-init ``AutoencoderKL`` from a model config's ``vae`` section; the global RNG is left untouched."""
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**load_model_config(model_config)["vae"])


def foreground_weights(pixels: torch.Tensor, weight: float) -> torch.Tensor:
    """``[B, 1, H, W]``: ``weight`` where a pixel (in [-1, 1]) is not white, else 1."""
    fg = (pixels < 1 - BACKGROUND_TOL).any(dim=1, keepdim=True)
    return 1 + (weight - 1) * fg.to(pixels.dtype)


def weighted_recon_loss(recon: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted mean L1, weighted mean MSE); a plain mean of ``weights * error``, so weight 10 counts 10×."""
    diff = recon.float() - target.float()
    return (weights * diff.abs()).mean(), (weights * diff.square()).mean()


def vae_loss(vae, pixels: torch.Tensor, generator: torch.Generator, kl_weight: float,
             foreground_weight: float) -> tuple[torch.Tensor, dict]:
    """Total loss and its terms for one batch; the posterior sample draws from ``generator``."""
    posterior = vae.encode(pixels).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    l1, mse = weighted_recon_loss(recon, pixels, foreground_weights(pixels, foreground_weight))
    kl = posterior.kl().mean()  # per-image sum over latent elements, averaged over the batch
    loss = l1 + mse + kl_weight * kl
    return loss, {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- atomic folders and checkpoints


def save_vae_checkpoint(cfg: VAETrainConfig, vae, optimizer, step: int) -> Path:
    """``checkpoints/step-NNNNNNN/``: model.safetensors, optimizer.pt, state.json, config.yaml; prunes old ones."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        save_config(cfg, tmp / "config.yaml")

    path = write_dir_atomically(checkpoint_dir(cfg.output_dir) / f"step-{step:07d}", write)
    if cfg.checkpoints_total_limit > 0:
        for old in list_checkpoints(cfg.output_dir)[:-cfg.checkpoints_total_limit]:
            shutil.rmtree(old)
    return path


def load_vae_checkpoint(path: Path, vae, optimizer) -> int:
    """Restore weights and optimizer state in place; returns the step the checkpoint was taken at."""
    from safetensors.torch import load_file

    device = next(vae.parameters()).device
    vae.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    return int(json.loads((path / "state.json").read_text())["step"])


def save_vae(vae, path: str | Path) -> Path:
    """``vae.save_pretrained(path, safe_serialization=True)``, atomically."""
    return write_dir_atomically(Path(path), lambda tmp: vae.save_pretrained(tmp, safe_serialization=True))


# --------------------------------------------------------------------------- measuring


@torch.no_grad()
def measure_latent_stats(vae, pixels: torch.Tensor, seed: int = 0, batch_size: int = 64) -> dict:
    """Mean/std of *sampled* latents (what the UNet trainer encodes) and reconstruction error (posterior mode)."""
    gen = torch.Generator().manual_seed(seed)
    zs, l1, sq = [], 0.0, 0.0
    device = next(vae.parameters()).device
    for batch in pixels.split(batch_size):
        batch = batch.to(device)
        posterior = vae.encode(batch).latent_dist
        zs.append(posterior.sample(gen).float().cpu())
        recon = vae.decode(posterior.mode()).sample.clamp(-1, 1)
        l1 += (recon - batch).abs().sum().item()
        sq += (recon - batch).square().sum().item()
    z, n = torch.cat(zs), pixels.numel()
    mse01 = sq / n / 4  # [-1, 1] -> [0, 1] units
    return {"latent_mean": z.mean().item(), "latent_std": z.std().item(), "recon_l1": l1 / n,
            "recon_psnr": 10 * math.log10(1 / max(mse01, 1e-12))}


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


@torch.no_grad()
def reconstruction_report(vae, n: int = 300, seed: int = 1_000_003, batch_size: int = 50,
                          size: int | None = None, shapes=None) -> dict:
    """Scorer accuracy (color / shape / position / all) on reconstructions (posterior mode) of ``n`` fresh
    ``size``-pixel shapes images (default: the VAE's sample_size); ``seed`` picks a sample stream unlike
    any training seed. Also the PSNR."""
    from ..data.shapes import all_specs, make_shapes_dataset, score
    from ..data.transforms import pil_to_tensor

    ds = make_shapes_dataset(n, seed=seed, size=size or vae.config.sample_size, specs=all_specs(shapes=shapes))
    pixels = torch.stack([pil_to_tensor(row["image"].convert("RGB")) for row in ds])
    device = next(vae.parameters()).device
    recons = [vae.decode(vae.encode(b.to(device)).latent_dist.mode()).sample.cpu() for b in pixels.split(batch_size)]
    recon = torch.cat(recons).clamp(-1, 1)
    result = score(_to_pil(recon), ds["text"])
    mse01 = (recon - pixels).square().mean().item() / 4
    return {k: result[k] for k in ("n", "color", "shape", "position", "all")} | {
        "psnr": 10 * math.log10(1 / max(mse01, 1e-12))}


# --------------------------------------------------------------------------- training


def _start(cfg: VAETrainConfig, vae, optimizer) -> int:
    """Step to start from: 0, or the resumed checkpoint's step (weights and optimizer restored)."""
    path = resolve_resume(cfg.resume, cfg.output_dir)
    if path is None:
        return 0
    step = load_vae_checkpoint(path, vae, optimizer)
    _trim_metrics(Path(cfg.output_dir) / "metrics.jsonl", step)
    tqdm.write(f"resumed from {path} (step {step})")
    return step


def _trim_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint: the resumed run logs those steps again."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        write_text_atomically(path, "".join(ln + "\n" for ln in lines))


def _log(cfg: VAETrainConfig, step: int, terms: dict, started: float, start_step: int) -> None:
    rate = (step - start_step) / max(time.perf_counter() - started, 1e-9)
    line = json.dumps({"step": step, **{k: round(v, 6) for k, v in terms.items()}, "steps_per_s": round(rate, 3)})
    with open(Path(cfg.output_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(line + "\n")


def cosine_lr(peak: float, min_ratio: float, step: int, max_steps: int) -> float:
    """Cosine from ``peak`` at step 1 to ``peak * min_ratio`` at ``max_steps``."""
    progress = (step - 1) / max(max_steps - 1, 1)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _train_loop(cfg: VAETrainConfig, vae, optimizer, data: PixelDataset, device, start: int) -> dict:
    """Steps ``start..max_steps``; returns the last step's loss terms."""
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=StepBatches(len(data), cfg.batch_size, cfg.seed, start, cfg.max_steps),
        num_workers=cfg.num_workers)
    bar = tqdm(total=cfg.max_steps, initial=start, desc="vae", unit="step", mininterval=2.0)
    started, terms, vae = time.perf_counter(), {}, vae.train()
    for step, pixels in enumerate(loader, start=start + 1):
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # posterior noise of this step
        loss, terms = vae_loss(vae, pixels.to(device), gen, cfg.kl_weight, cfg.foreground_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.max_grad_norm)
        for group in optimizer.param_groups:  # a pure function of the step: resume needs no schedule state
            group["lr"] = cosine_lr(cfg.learning_rate, cfg.lr_min_ratio, step, cfg.max_steps)
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{terms['loss']:.4f}", refresh=False)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            _log(cfg, step, terms, started, start)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save_vae_checkpoint(cfg, vae, optimizer, step)
    bar.close()
    return terms


def _finish(cfg: VAETrainConfig, vae, data: PixelDataset) -> dict:
    """Measure the latent std on ``scale_samples`` training images, set scaling_factor = 1/std, save vae/."""
    vae.eval()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))
    pixels = torch.stack([data[int(i)] for i in order[: cfg.scale_samples]])
    stats = measure_latent_stats(vae, pixels, seed=cfg.seed)
    vae.register_to_config(scaling_factor=1.0 / stats["latent_std"])
    stats["scaling_factor"] = vae.config.scaling_factor
    save_vae(vae, Path(cfg.output_dir) / "vae")
    return stats


def train_vae(cfg: VAETrainConfig) -> Path:
    """Train, checkpoint (resumable), measure the scaling factor and save ``<output_dir>/vae``; returns that path.

    Also writes ``config.yaml``, ``metrics.jsonl`` and ``summary.json`` to ``output_dir`` and prints the summary.
    """
    if cfg.num_threads is None:
        return _train_vae(cfg)
    before = torch.get_num_threads()  # scoped: a caller (a test session, a notebook) keeps its own setting
    torch.set_num_threads(cfg.num_threads)
    try:
        return _train_vae(cfg)
    finally:
        torch.set_num_threads(before)


def _train_vae(cfg: VAETrainConfig) -> Path:
    began = time.perf_counter()
    out, device = Path(cfg.output_dir), _device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    data = load_pixel_dataset(cfg)
    vae = build_vae(cfg.model_config, cfg.seed).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    start = _start(cfg, vae, optimizer)
    started = time.perf_counter()
    last = _train_loop(cfg, vae, optimizer, data, device, start)
    train_s = time.perf_counter() - started
    summary = {"steps": cfg.max_steps, "steps_this_run": cfg.max_steps - start, "train_seconds": round(train_s, 1),
               "steps_per_s": round((cfg.max_steps - start) / max(train_s, 1e-9), 3), "last_loss": last.get("loss"),
               **_finish(cfg, vae, data)}
    if cfg.eval_samples and cfg.dataset.startswith("shapes:"):
        summary["reconstruction"] = reconstruction_report(vae, cfg.eval_samples, size=cfg.resolution, shapes=cfg.shapes)
    summary["wall_seconds"] = round(time.perf_counter() - began, 1)  # data generation and measuring included
    summary["vae_dir"] = str(out / "vae")
    write_json_atomically(out / "summary.json", summary, indent=2)
    _print_summary(summary)
    return out / "vae"


def _print_summary(s: dict) -> None:
    rec = s.get("reconstruction")
    acc = (f"; scorer on {rec['n']} fresh images: color {rec['color']:.1%}, shape {rec['shape']:.1%}, "
           f"position {rec['position']:.1%}, all {rec['all']:.1%}") if rec else ""
    print(f"VAE: {s['steps']} steps ({s['steps_this_run']} this run in {s['train_seconds']} s, {s['steps_per_s']} steps/s; "
          f"{s['wall_seconds']} s in all); "
          f"recon L1 {s['recon_l1']:.4f}, PSNR {s['recon_psnr']:.1f} dB{acc}; latent std {s['latent_std']:.4f} "
          f"-> scaling_factor {s['scaling_factor']:.4f}; saved {s['vae_dir']}", flush=True)
