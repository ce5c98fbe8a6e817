"""Masked loss: masks from a column or the alpha channel follow the image's crop/flip, the loss weights latent
pixels in closed form (nothing learned from the unmasked region), through the trainer, resumably."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentsd.config import ConfigError, load_config
from latentsd.data.buckets import make_bucket_sampler
from latentsd.data.cache import cache_modes
from latentsd.data.datasets import DatasetColumnError, build_train_dataset
from latentsd.data.masks import latent_mask_weights
from latentsd.training.logs import read_metrics
from latentsd.training.losses import weighted_loss
from latentsd.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent
SIZES = [(80, 64), (64, 96), (64, 64), (100, 60)]  # (w, h) per image


def _pattern(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth grayscale pattern that is not mirror-symmetric (so a missed flip or crop shows)."""
    y, x = np.mgrid[0:h, 0:w]
    return (127 + 120 * np.sin(x / (3 + seed) + y / 7.0) * np.cos(y / 5.0 + seed)).astype(np.uint8)


@pytest.fixture(scope="module")
def masked_folder(tmp_path_factory) -> Path:
    """Images whose gray level equals their mask (mask files), and the same mask as the alpha of an RGBA copy."""
    top = tmp_path_factory.mktemp("masked")
    root = top / "file"  # an imagefolder reads sub-folders too: the RGBA copy goes beside it
    (root / "masks").mkdir(parents=True)
    (top / "rgba").mkdir()
    rows, rgba_rows = [], []
    for i, (w, h) in enumerate(SIZES):
        gray = _pattern(w, h, i)
        Image.fromarray(np.stack([gray] * 3, -1)).save(root / f"{i}.png")
        Image.fromarray(gray, "L").save(root / "masks" / f"{i}.png")
        rgba = np.stack([np.full_like(gray, 40 * i), np.full_like(gray, 90), np.full_like(gray, 200), gray], -1)
        Image.fromarray(rgba, "RGBA").save(top / "rgba" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "mask_file_name": f"masks/{i}.png", "text": f"picture {i}"})
        rgba_rows.append({"file_name": f"{i}.png", "text": f"picture {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (top / "rgba" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rgba_rows))
    return root


def _cfg(data, *extra, out="unused"):
    return load_config(ROOT / "configs/train/tiny.yaml", [f"output_dir={out}", f"data.dataset={data}", *extra])


# --------------------------------------------------------------------------- masks in the dataset


@pytest.mark.parametrize("buckets", [False, True])
def test_masks_get_the_images_crop_flip_and_bucket(masked_folder, buckets):
    aug = ["data.resolution=48", "data.center_crop=false", "data.random_flip=true", "seed=3"]
    if buckets:
        aug += ["data.buckets=true", "data.bucket_step=16"]
    column = _cfg(masked_folder, *aug, "data.mask_column=mask")
    from_file = build_train_dataset(column.data, seed=3)
    from_alpha = build_train_dataset(_cfg(masked_folder.parent / "rgba", *aug, "data.mask_from_alpha=true").data, seed=3)
    unflipped = build_train_dataset(_cfg(masked_folder, *aug, "data.random_flip=false").data, seed=3)
    if buckets:
        for d in (from_file, from_alpha, unflipped):
            make_bucket_sampler(d, column.data, 1, seed=3)
    flips = 0
    for epoch in range(3):
        for d in (from_file, from_alpha, unflipped):
            d.set_epoch(epoch)
        for i in range(len(SIZES)):
            a, b = from_file[i], from_alpha[i]
            # the image is its own mask in gray: the transformed mask is its transformed pixels, in [0, 1]
            gray = (a["pixel_values"][:1] + 1) / 2
            assert a["loss_mask"].shape == gray.shape == b["loss_mask"].shape
            torch.testing.assert_close(a["loss_mask"], gray, atol=1.5 / 255, rtol=0)
            torch.testing.assert_close(b["loss_mask"], a["loss_mask"], atol=1.5 / 255, rtol=0)  # alpha: same mask
            assert a["crop_top_left"] == b["crop_top_left"]
            flips += not torch.equal(a["pixel_values"], unflipped[i]["pixel_values"])
    assert 0 < flips < 3 * len(SIZES)  # some samples were mirrored, some not: the masks followed both
    if buckets:
        assert {tuple(from_file[i]["loss_mask"].shape[1:]) for i in range(4)} == {(48, 48), (32, 64), (64, 32)}


def test_bad_mask_settings_are_clear_errors(masked_folder, tmp_path):
    with pytest.raises(DatasetColumnError, match="data.mask_column='masks' is not a column.*Did you mean 'mask'"):
        build_train_dataset(_cfg(masked_folder, "data.mask_column=masks").data)
    with pytest.raises(ConfigError, match="data.mask_column: and data.mask_from_alpha are both set"):
        _cfg(masked_folder, "data.mask_column=mask", "data.mask_from_alpha=true")
    with pytest.raises(ConfigError, match=r"loss.unmasked_weight: must be in \[0, 1\]"):
        _cfg(masked_folder, "loss.unmasked_weight=2")
    small = tmp_path / "small"
    (small / "masks").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(small / "0.png")
    Image.new("L", (32, 32)).save(small / "masks/0.png")
    (small / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "mask_file_name": "masks/0.png",
                                                      "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="the mask is 32x32 pixels but its image is 64x64"):
        build_train_dataset(_cfg(small, "data.mask_column=mask").data)[0]
    cfg = _cfg(masked_folder, "data.mask_column=mask", "cache.latents=true", "cache.text=true")
    assert cache_modes(cfg) == (False, True)  # masks are read with the pixels: latents on the fly


# --------------------------------------------------------------------------- the loss


def test_mask_weights_are_the_area_mean_over_each_latent_pixel():
    mask = (torch.rand(2, 1, 32, 48, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    blocks = mask.reshape(2, 1, 4, 8, 6, 8).mean(dim=(3, 5))  # the mean of each 8x8 patch
    torch.testing.assert_close(latent_mask_weights(mask, (4, 6)), blocks)
    torch.testing.assert_close(latent_mask_weights(mask, (4, 6), 0.25), 0.25 + 0.75 * blocks)
    assert latent_mask_weights(None, (4, 6)) is None


def test_masked_loss_closed_form_and_no_gradient_from_the_unmasked_region(tiny):
    unet = tiny.unet
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    timesteps = torch.tensor([10, 700])
    weights = torch.tensor([1.0, 0.5])
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, :, :24] = 1.0  # latent columns 0-2 (8 pixels each) fully in
    mask[:, :, :, 24:28] = 1.0  # and half of latent column 3
    pixel = latent_mask_weights(mask, (8, 8))
    assert torch.equal(pixel[0, 0, 0], torch.tensor([1, 1, 1, 0.5, 0, 0, 0, 0]))

    def loss_and_grads(fn):
        for p in unet.parameters():
            p.grad = None
        target.grad = None
        pred = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        fn(pred).backward()
        return target.grad.clone(), [p.grad.clone() for p in unet.parameters() if p.grad is not None]

    t_grad, p_grad = loss_and_grads(lambda pred: weighted_loss(pred, target, weights, pixel_weights=pixel))
    # closed form: mean over samples of weight * sum(m * (pred - target)^2) / (C * h * w)
    ref_t, ref_p = loss_and_grads(lambda pred: ((pixel * (pred - target) ** 2).sum(dim=(1, 2, 3)) / 256 * weights).mean())
    torch.testing.assert_close(t_grad, ref_t, rtol=1e-5, atol=1e-9)
    for a, b in zip(p_grad, ref_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    assert torch.all(t_grad[..., 4:] == 0) and torch.all(t_grad[..., :3] != 0)  # unmasked targets teach nothing
    with torch.no_grad():
        pred = unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        ones = torch.ones_like(pixel)
        assert torch.equal(weighted_loss(pred, target, weights, pixel_weights=ones), weighted_loss(pred, target, weights))
        half = latent_mask_weights(mask, (8, 8), 0.25)
        expected = ((half * (pred - target) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
        torch.testing.assert_close(weighted_loss(pred, target, weights, pixel_weights=half), expected)
        huber = weighted_loss(pred, target, weights, "huber", torch.full((2,), 0.1), pixel)
        elementwise = 0.2 * (torch.sqrt((pred - target) ** 2 + 0.01) - 0.1)
        torch.testing.assert_close(huber, ((pixel * elementwise).mean(dim=(1, 2, 3)) * weights).mean())


# --------------------------------------------------------------------------- through the trainer


@pytest.fixture(scope="module")
def solid_masks(tmp_path_factory) -> Path:
    """8 images with three mask columns: all white, all black, and the left half."""
    root = tmp_path_factory.mktemp("solid")
    (root / "m").mkdir()
    for name, box in (("white", (0, 0, 64, 64)), ("black", (0, 0, 0, 0)), ("half", (0, 0, 32, 64))):
        m = Image.new("L", (64, 64), 0)
        m.paste(255, box)
        m.save(root / "m" / f"{name}.png")
    rows = []
    for i in range(8):
        Image.fromarray(np.stack([_pattern(64, 64, i)] * 3, -1)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "white_file_name": "m/white.png", "black_file_name": "m/black.png",
                     "half_file_name": "m/half.png", "text": f"picture {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_trainer_masked_losses_white_black_and_exact_resume(tmp_path, solid_masks):
    run = ["max_steps=4", "checkpoint_every=2", "checkpoints_total_limit=0", "optim.train_batch_size=2",
           "data.random_flip=true", "data.caption_dropout=0.2", "data.image_column=image",
           "cache.latents=false"]  # every run encodes on the fly (masked ones must): equal inputs
    losses = {}
    for name, extra in (("plain", []), ("white", ["data.mask_column=white"]), ("black", ["data.mask_column=black"]),
                        ("half", ["data.mask_column=half"]), ("half_u", ["data.mask_column=half", "loss.unmasked_weight=0.5"])):
        train(_cfg(solid_masks, *run, *extra, out=tmp_path / name))
        losses[name] = [m["loss"] for m in read_metrics(tmp_path / name).values()]
    assert losses["white"] == losses["plain"]  # an all-white mask is no mask
    assert losses["black"] == [0.0] * 4  # nothing is trained from an all-black mask
    assert all(0 < h < p for h, p in zip(losses["half"], losses["plain"]))
    assert all(h < u < p for h, u, p in zip(losses["half"], losses["half_u"], losses["plain"]))
    resumed = tmp_path / "resumed"
    train(_cfg(solid_masks, *run, "data.mask_column=half", f"resume={tmp_path}/half/checkpoints/step-0000002", out=resumed))
    b = read_metrics(resumed)
    assert sorted(b) == [3, 4] and [b[s]["loss"] for s in (3, 4)] == losses["half"][2:]


# --------------------------------------------------------------------------- shown to learn (slow)

CORNERS = [(slice(y, y + 14), slice(x, x + 14)) for y in (2, 48) for x in (2, 48)]  # clear of every shape position


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)  # shapes never touch the border: no wrap-around
    return out


def write_marked_concept_data(out: Path, n_new: int = 600, n_old: int = 600, seed: int = 0) -> Path:
    """The demo's data (stars in every color and position, plus known shapes), each image with a 14x14 square of
    a random color in a random corner that the captions never mention, and a mask covering only the shape (2 px
    beyond its anti-aliased edge).

    (A tinted background would be the obvious unmasked content, but the shipped VAE, trained on white
    backgrounds only, decodes pale tints as white, and squares much smaller than its shapes in arbitrary colors:
    squares of its colors and about its shapes' size it reconstructs faithfully.)"""
    from latentsd.data.shapes import COLORS, HELD_OUT, SHAPES, all_specs, sample

    (out / "masks").mkdir(parents=True, exist_ok=True)
    new = all_specs(shapes=["star"])
    old = [s for s in all_specs(shapes=list(SHAPES)) if s.caption not in HELD_OUT]
    rng, colors, rows = np.random.default_rng(seed), list(COLORS.values()), []
    for i in range(n_new + n_old):
        img, spec = sample(i, seed, 64, new) if i < n_new else sample(i, seed + 1, 64, old)
        a = np.asarray(img).copy()
        shape = np.abs(a.astype(np.float32) - 255).max(-1) > 2  # the shape and its anti-aliased edge
        a[CORNERS[rng.integers(4)]] = colors[rng.integers(len(colors))]
        Image.fromarray(a).save(out / f"{i:04d}.png")
        Image.fromarray(_dilate(shape, 2).astype(np.uint8) * 255, "L").save(out / "masks" / f"{i:04d}.png")
        rows.append({"file_name": f"{i:04d}.png", "mask_file_name": f"masks/{i:04d}.png", "text": spec.caption})
    order = rng.permutation(len(rows))
    (out / "metadata.jsonl").write_text("".join(json.dumps(rows[k]) + "\n" for k in order))
    return out


def mark_rate(images) -> float:
    """Fraction of images with a corner mark: ink (RGB distance > 60 from white, the scorer's threshold) on at
    least a quarter of one corner square's pixels. 1 for the training images, 0 for clean ones."""
    hits = []
    for img in images:
        a = np.asarray(img, np.float32)
        hits.append(float(any((np.linalg.norm(a[c] - 255, axis=-1) > 60).mean() >= 0.25 for c in CORNERS)))
    return float(np.mean(hits))


def blank_corners(img) -> Image.Image:
    """The image with its corner squares painted white (so the scorer reads the shape, not a mark)."""
    a = np.asarray(img).copy()
    for corner in CORNERS:
        a[corner] = 255
    return Image.fromarray(a)


def masked_learning_run(out: Path, steps: int = 300, *extra: str) -> dict:
    """Fine-tune the shipped base model (the demo recipe) on stars with corner marks, with and without the shape
    masks; score 30 star and 30 known-shape prompts (corners blanked) and count the corner marks."""
    from latentsd.data.shapes import SHAPES, score
    from latentsd.demo import BASE_MODEL, prompts_for
    from latentsd.generate import load_pipeline
    from latentsd.images import save_images
    from latentsd.resources import shipped_config

    data = write_marked_concept_data(out / "data")
    prompts = prompts_for(["star"]) + prompts_for(list(SHAPES))[::3]  # 30 star and 30 known-shape prompts
    results = {"training images": {"mark_rate": mark_rate(Image.open(p) for p in sorted(data.glob("*.png"))[:60])}}
    for name, mask in (("masked", ["data.mask_column=mask"]), ("unmasked", []), ("base", None)):
        model, seconds = BASE_MODEL, None
        if mask is not None:
            summary = train(load_config(shipped_config("train", "demo_star"), [
                f"output_dir={out / name}", f"model.pretrained={BASE_MODEL}", f"data.dataset={data}",
                f"max_steps={steps}", f"checkpoint_every={steps}", *mask, *extra]))
            model, seconds = summary["model"], summary["seconds"]
        pipe = load_pipeline(str(model), scheduler="ddim")
        pipe.set_progress_bar_config(disable=True)
        images = pipe(prompts, num_inference_steps=25, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0)).images
        save_images(images, prompts, out / f"{name}.png", cols=5)
        results[name] = {"train_seconds": seconds}
        for group, part in (("star", slice(0, 30)), ("old", slice(30, 60))):
            scores = score([blank_corners(im) for im in images[part]], prompts[part])
            results[name][group] = {"shape": scores["shape"], "all": scores["all"], "mark_rate": mark_rate(images[part])}
    return results


@pytest.mark.slow
def test_a_masked_finetune_learns_the_shape_but_not_what_lies_outside_the_mask(tmp_path):
    """Measured 2026-12-01 (2 shared CPU cores, 300 steps): masked star shape 97 %, known shapes 100 %, corner marks
    0 % / 0 %; unmasked marks 80 % / 63 %. Color adherence falls in both runs (72 % / 70 % all three): the randomly
    colored marks are in both (the demo recipe on unmarked data keeps 100 %)."""
    results = masked_learning_run(tmp_path)
    print(json.dumps(results, indent=1))
    masked, unmasked, base = results["masked"], results["unmasked"], results["base"]
    assert results["training images"]["mark_rate"] == 1.0
    assert masked["star"]["shape"] >= 0.8 and masked["old"]["shape"] >= 0.9  # the shape is learned, none forgotten
    assert unmasked["star"]["mark_rate"] >= 0.5  # the reference: without masks the corner marks are learned
    assert masked["star"]["mark_rate"] <= 0.1 and masked["old"]["mark_rate"] <= 0.1  # with masks: not
    assert base["star"]["mark_rate"] == base["old"]["mark_rate"] == 0.0
