"""DreamBooth with prior preservation: class images are the base model's own (our pipeline), generated once and
cached by model/prompt/settings; batches hold the instance half then the class half; the loss is the closed form
instance MSE + w x class MSE; resume is exact."""

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from latentsd import DDIMScheduler, LatentDiffusionPipeline
from latentsd.config import ConfigError, load_config
from latentsd.data.datasets import collate
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.training.dreambooth import (PairCollate, PriorPairs, class_image_name, class_image_seed,
                                          ensure_class_images, make_dreambooth, prior_loss_weights)
from latentsd.training.logs import read_metrics
from latentsd.training.losses import weighted_loss
from latentsd.training.setup import load_model
from latentsd.training.trainer import Trainer, train

from shapes_adherence import adherence

ROOT = Path(__file__).resolve().parent.parent
CLASS_PROMPTS = ["a red circle on the left", "a blue square at the top"]


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    ds = make_shapes_dataset(6, seed=3)
    return write_imagefolder(ds.map(lambda r: {"text": r["text"].replace("a ", "a sks ", 1)}),
                             tmp_path_factory.mktemp("instances"))


def _cfg(out, data, model, classes, *extra):
    return load_config(ROOT / "configs/train/tiny.yaml", [
        f"output_dir={out}", f"data.dataset={data}", f"model.pretrained={model}", "max_steps=4", "checkpoint_every=2",
        "checkpoints_total_limit=0", "optim.train_batch_size=2", "data.random_flip=true", "data.center_crop=false",
        "data.caption_dropout=0.2", "dreambooth.enabled=true", f"dreambooth.class_prompt={CLASS_PROMPTS}",
        "dreambooth.num_class_images=3", "dreambooth.class_steps=2", "dreambooth.class_guidance=2.0",
        "dreambooth.class_batch_size=2", f"dreambooth.class_data_dir={classes}", *extra])


def _pixels(path):
    return np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.int16)


def test_class_images_are_the_base_models_generated_once_per_model_prompt_and_settings(tmp_path, tiny_model_dir,
                                                                                       instance_dir):
    cfg = _cfg(tmp_path / "run", instance_dir, tiny_model_dir, tmp_path / "classes")
    db, root = cfg.dreambooth, tmp_path / "classes"
    folder, made = ensure_class_images(load_model(cfg), db, 64, root)
    assert made == 3 and sorted(p.name for p in folder.glob("*.png")) == [class_image_name(i) for i in range(3)]
    # each is what our pipeline makes from the folder with DDIM and image i's own seed
    ref = LatentDiffusionPipeline.from_pretrained(tiny_model_dir)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    for i in range(3):
        image = ref(CLASS_PROMPTS[i % 2], num_inference_steps=2, guidance_scale=2.0,
                    generator=torch.Generator().manual_seed(class_image_seed(db.class_seed, i))).images[0]
        assert np.abs(_pixels(folder / class_image_name(i)) - np.asarray(image, dtype=np.int16)).max() <= 1
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    again, made = ensure_class_images(load_model(cfg), db, 64, root)  # a second run: nothing generated
    assert (again, made) == (folder, 0) and stamps == {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    more = load_config(cfg, ["dreambooth.num_class_images=5"])  # more images: only the new ones
    assert ensure_class_images(load_model(more), more.dreambooth, 64, root) == (folder, 2)
    other = load_config(cfg, ["dreambooth.class_prompt=a green triangle in the center"])  # another prompt
    other_folder, made = ensure_class_images(load_model(other), other.dreambooth, 64, root)
    assert other_folder != folder and made == 3
    changed = load_model(cfg)  # another base model (one weight changed)
    with torch.no_grad():
        next(changed.unet.parameters()).add_(1e-3)
    changed_folder, made = ensure_class_images(changed, db, 64, root)
    assert changed_folder not in (folder, other_folder) and made == 3
    slower = load_config(cfg, ["dreambooth.class_steps=3"])  # other settings
    assert ensure_class_images(load_model(slower), slower.dreambooth, 64, root)[0] not in (folder, other_folder)


def test_a_batch_is_the_instance_half_then_the_class_half_and_the_loss_weighs_them(tmp_path, tiny_model_dir,
                                                                                  instance_dir):
    trainer = Trainer(_cfg(tmp_path / "run", instance_dir, tiny_model_dir, tmp_path / "classes",
                           "data.caption_dropout=0", "data.random_flip=false", "data.center_crop=true",
                           "data.shuffle=false", "cache.latents=false"))  # pixels, to compare with the images
    assert trainer.dreambooth.generated == 3
    loader = iter(trainer.loader)
    for step in range(3):  # instance samples 2s, 2s+1; class samples follow them, cycling through the 3 images
        batch = next(loader)
        instance, klass = [2 * step, 2 * step + 1], [(2 * step) % 3, (2 * step + 1) % 3]
        assert batch["index"].tolist() == instance + klass
        assert batch["caption"][2:] == [CLASS_PROMPTS[i % 2] for i in klass]
        assert all(c.startswith("a sks ") for c in batch["caption"][:2])
        for row, i in zip(batch["pixel_values"][2:], klass):
            image = _pixels(trainer.dreambooth.class_dir / class_image_name(i))
            np.testing.assert_allclose(((row.permute(1, 2, 0).numpy() + 1) * 127.5), image, atol=0.51)
        assert batch["loss_weight"].tolist() == [2.0, 2.0, 2.0, 2.0]
    # with w = 1 the loss is instance MSE + class MSE = twice the plain mean over the 4 samples
    plain = {k: v for k, v in batch.items() if k != "loss_weight"}
    with torch.no_grad():
        assert torch.allclose(trainer.compute_loss(batch, 0), 2 * trainer.compute_loss(plain, 0), rtol=1e-6)


@pytest.mark.parametrize("w", [0.0, 0.5, 3.0])
def test_prior_preservation_loss_is_instance_mse_plus_w_class_mse(w):
    samples = [{"pixel_values": torch.zeros(3, 8, 8), "caption": str(i), "original_size": (8, 8),
                "crop_top_left": (0, 0), "index": i, "num_skipped": 0} for i in range(6)]
    batch = PairCollate(collate, w)(list(zip(samples[:3], samples[3:])))
    assert batch["caption"] == [str(i) for i in range(6)]
    pred, target = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    snr_weights = torch.rand(6) + 0.5
    loss = weighted_loss(pred, target, snr_weights * prior_loss_weights(batch, snr_weights))
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3)) * snr_weights
    torch.testing.assert_close(loss, per_sample[:3].mean() + w * per_sample[3:].mean())
    assert torch.equal(prior_loss_weights({}, snr_weights), torch.ones(6))  # other batches: unweighted


def test_every_class_image_is_used_over_the_epochs():
    class Fake(list):
        def set_epoch(self, epoch):
            pass

    pairs = PriorPairs(Fake(range(3)), Fake(range(5)))
    used = set()
    for epoch in range(5):
        pairs.set_epoch(epoch)
        used |= {pairs[i][1] for i in range(3)}
    assert used == set(range(5))


def test_resume_with_dreambooth_is_bit_identical_and_reuses_the_class_images(tmp_path, tiny_model_dir, instance_dir):
    classes = tmp_path / "classes"
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(_cfg(full, instance_dir, tiny_model_dir, classes))
    cfg = _cfg(resumed, instance_dir, tiny_model_dir, classes, f"resume={full}/checkpoints/step-0000002")
    trainer = Trainer(cfg)
    assert trainer.dreambooth.generated == 0
    trainer.run()
    a, b = read_metrics(full), read_metrics(resumed)
    assert sorted(b) == [3, 4] and all(a[s]["loss"] == b[s]["loss"] for s in b)
    from safetensors.torch import load_file

    wa, wb = (load_file(run / "model/unet/diffusion_pytorch_model.safetensors") for run in (full, resumed))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_instance_prompt_captions_a_folder_of_images_without_captions(tmp_path, tiny_model_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        PIL.Image.new("RGB", (80, 64), (40 * i, 0, 0)).save(folder / f"photo{i}.png")
    cfg = _cfg(tmp_path / "run", folder, tiny_model_dir, tmp_path / "classes", "dreambooth.instance_prompt=a sks dog",
               "dreambooth.prior_loss_weight=0")
    dreambooth = make_dreambooth(cfg, load_model(cfg))
    assert dreambooth.class_dir is None  # no prior preservation: nothing generated
    dataset = dreambooth.instance_dataset(cfg.data, cfg.seed)
    assert len(dataset) == 3 and {dataset[i]["caption"] for i in range(3)} <= {"a sks dog", ""}


@pytest.mark.parametrize("extra,message", [
    (["validation.holdout=2"], "validation.holdout=0"),
    (["data.streaming=true"], "data.streaming=false"),
    (["data.buckets=true"], "data.buckets=false"),
    (["dreambooth.class_prompt=[a, '']"], "non-empty strings"),
    (["dreambooth.prior_loss_weight=-1"], "prior_loss_weight"),
    (["dreambooth.num_class_images=0"], "num_class_images"),
])
def test_bad_dreambooth_settings_are_config_errors(tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, tmp_path, tmp_path, tmp_path, *extra)


# ---- shown to learn on the shapes world (slow: minutes of CPU; numbers in the README) ------------------
def dreambooth_on_shapes(tmp_path, prior_loss_weight: float, steps: int = 200) -> dict:
    """20 stars captioned 'a {color} sks circle {where}' teach the identifier 'sks circle' = star; the class images
    are the base model's own 30 circle prompts (60 images). Returns the scorer's results for the identifier
    prompts (judged as stars) and the class prompts (judged as circles), before and after."""
    from latentsd.data.shapes import all_specs
    from latentsd.demo import BASE_MODEL

    circles = [s.caption for s in all_specs(shapes=["circle"])]
    identifier = [c.replace("circle", "sks circle") for c in circles]
    stars = [c.replace("circle", "star") for c in circles]
    ds = make_shapes_dataset(20, seed=5, specs=all_specs(shapes=["star"]), balanced=False)
    data = write_imagefolder(ds.map(lambda r: {"text": r["text"].replace("star", "sks circle")}), tmp_path / "data")
    summary = train(load_config(ROOT / "configs/train/demo_star.yaml", [
        f"output_dir={tmp_path / 'run'}", f"data.dataset={data}", f"max_steps={steps}", f"checkpoint_every={steps}",
        "optim.train_batch_size=16", "optim.lr_warmup_steps=10", "dreambooth.enabled=true",
        f"dreambooth.class_prompt={circles}", "dreambooth.num_class_images=60",
        f"dreambooth.prior_loss_weight={prior_loss_weight}", "dreambooth.class_guidance=2.0",
        f"cache.dir={tmp_path / 'cache'}"]))
    return {when: {"identifier": adherence(model, identifier, stars), "class": adherence(model, circles, circles)}
            for when, model in (("before", BASE_MODEL), ("after", summary["model"]))}


@pytest.mark.slow
def test_dreambooth_learns_the_identifier_and_prior_preservation_keeps_the_class(tmp_path):
    with_prior = dreambooth_on_shapes(tmp_path / "prior", 1.0)
    without = dreambooth_on_shapes(tmp_path / "no_prior", 0.0)
    print({"with prior": with_prior, "without": without})
    assert with_prior["before"]["identifier"]["shape"] <= 0.1  # the base model draws circles for "sks circle"
    for run in (with_prior, without):
        assert run["after"]["identifier"]["shape"] >= 0.9  # both learned: "sks circle" is a star
    base_class = with_prior["before"]["class"]["all"]
    assert with_prior["after"]["class"]["all"] >= base_class - 0.05  # the class prompts kept their adherence
    assert without["after"]["class"]["all"] < with_prior["after"]["class"]["all"]  # without the prior they drift
