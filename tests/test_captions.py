"""Caption recipes: tag shuffling with keep_tokens, per-tag dropout, templates with the instance token; all a
function of (seed, epoch, index), independent of the crop/flip stream, cached where deterministic, resumable."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from latentsd.config import ConfigError, load_config
from latentsd.data.cache import FeatureCache, cache_modes, distinct_captions
from latentsd.data.captions import TAG_STREAM, CaptionRecipe, split_tags
from latentsd.data.datasets import build_train_dataset, sample_generator
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.text import PromptEncoder
from latentsd.training.logs import read_metrics
from latentsd.training.trainer import train

ROOT = Path(__file__).resolve().parent.parent
TAGS = "sks, red, circle, left, small, shiny"


def _draw(recipe: CaptionRecipe, caption, i: int, epoch: int = 0, seed: int = 0) -> str:
    return recipe(caption, sample_generator(seed, epoch, i), sample_generator(seed, epoch, i, TAG_STREAM))


@pytest.fixture(scope="module")
def tag_folder(tmp_path_factory) -> Path:
    """12 shapes images whose captions are tag lists: 'a{i}, <color>, <shape>, <where>'."""
    root = write_imagefolder(make_shapes_dataset(12, seed=2), tmp_path_factory.mktemp("tags"))
    meta = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    with open(root / "metadata.jsonl", "w") as f:
        for i, m in enumerate(meta):
            words = m["text"].split()  # "a red circle on the left"
            f.write(json.dumps({"file_name": m["file_name"], "text": f"a{i}, {words[1]}, {words[2]}, {words[-1]}"}) + "\n")
    return root


def _cfg(data, *extra, out="unused"):
    return load_config(ROOT / "configs/train/tiny.yaml", [f"output_dir={out}", f"data.dataset={data}", *extra])


# --------------------------------------------------------------------------- the recipe


def test_shuffle_keeps_the_first_tags_and_permutes_the_rest_uniformly():
    recipe = CaptionRecipe(shuffle_tags=True, keep_tokens=1)
    n, rest = 3000, split_tags(TAGS)[1:]
    positions = Counter()
    for i in range(n):
        tags = split_tags(_draw(recipe, TAGS, i))
        assert tags[0] == "sks" and sorted(tags[1:]) == sorted(rest)  # a permutation; the kept tag first
        positions.update((tag, k) for k, tag in enumerate(tags[1:]))
    # every tag lands in every one of the 5 places about n/5 times (binomial sd ~ 22: 6 sd margin)
    assert all(abs(positions[(tag, k)] - n / 5) < 130 for tag in rest for k in range(5))
    assert _draw(recipe, TAGS, 7) == _draw(recipe, TAGS, 7)  # a function of (seed, epoch, index)
    assert len({_draw(recipe, TAGS, 7, epoch=e) for e in range(20)}) > 10  # a new order each epoch


def test_tag_dropout_rate_spares_the_kept_tags_and_never_touches_a_dropped_caption():
    recipe = CaptionRecipe(tag_dropout=0.3, keep_tokens=2)
    n, kept = 2000, 0
    for i in range(n):
        tags = split_tags(_draw(recipe, TAGS, i))
        assert tags[:2] == ["sks", "red"] and tags[2:] == [t for t in split_tags(TAGS)[2:] if t in tags]  # order kept
        kept += len(tags) - 2
    assert abs(kept / (4 * n) - 0.7) < 0.02  # 8000 Bernoulli(0.7) draws: sd 0.005
    dropped = CaptionRecipe(dropout=1.0, shuffle_tags=True, template="a photo of {caption}")
    assert {_draw(dropped, TAGS, i) for i in range(50)} == {""}  # caption dropout: exactly the unconditional prompt


def test_templates_with_the_instance_token():
    recipe = CaptionRecipe(template="a photo of {instance} {caption}", instance="sks")
    assert _draw(recipe, "a red circle on the left", 0) == "a photo of sks a red circle on the left"
    assert _draw(recipe, ["", ""], 1) == "a photo of sks"  # an empty caption: the template alone, stripped
    assert _draw(CaptionRecipe(), " spaced  caption ", 0) == " spaced  caption "  # the default: untouched
    tags = CaptionRecipe(shuffle_tags=True, keep_tokens=1, separator="|", template="{caption}, photo")
    out = _draw(tags, "sks|b|c", 3)
    assert out.startswith("sks| ") and out.endswith(", photo") and sorted(out[:-7].split("| ")) == ["b", "c", "sks"]


@pytest.mark.parametrize("override, message", [
    ("data.caption_template=a {subject}", "data.caption_template: .*the fields are {caption} and {instance}"),
    ('data.caption_template="{instance} {caption}"', "data.caption_template: .*data.instance_token is empty"),
    ("data.caption_template={caption}", "data.caption_template: expected str.*quote it"),  # YAML read a mapping
    ("data.caption_template=a {caption", "data.caption_template: .*literal braces"),
    ("data.caption_template=a {caption!r}", "data.caption_template: .*plainly"),
    ("data.tag_dropout=1.5", r"data.tag_dropout: must be in \[0, 1\]"),
    ("data.keep_tokens=-1", "data.keep_tokens: must be >= 0"),
    ('data.tag_separator=""', "data.tag_separator: is empty"),
])
def test_bad_caption_settings_are_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        _cfg("somewhere", override)


# --------------------------------------------------------------------------- in the dataset and the cache


def test_dataset_captions_are_per_sample_draws_that_leave_crops_and_flips_alone(tag_folder):
    aug = ["data.resolution=48", "data.center_crop=false", "data.random_flip=true", "seed=4"]
    tagged = _cfg(tag_folder, *aug, "data.shuffle_tags=true", "data.keep_tokens=1", "data.tag_dropout=0.25")
    plain, again = (build_train_dataset(c.data, seed=4) for c in (_cfg(tag_folder, *aug), tagged))
    other = build_train_dataset(tagged.data, seed=4)
    recipe = CaptionRecipe(shuffle_tags=True, keep_tokens=1, tag_dropout=0.25)
    orders = set()
    for epoch in (0, 3):
        for d in (plain, again, other):
            d.set_epoch(epoch)
        for i in range(len(plain)):
            a, b, c = plain[i], again[i], other[i]
            assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["crop_top_left"] == b["crop_top_left"]
            assert b["caption"] == c["caption"] == _draw(recipe, a["caption"], i, epoch, seed=4)
            assert split_tags(b["caption"])[0] == f"a{i}"
            orders.add(b["caption"])
    assert len(orders) > len(plain) + 4  # different orders / drops across samples and epochs


def test_text_cache_holds_templated_captions_and_refuses_shuffled_tags(tiny, tag_folder, tmp_path, caplog):
    templ = _cfg(tag_folder, "data.resolution=32", "data.caption_template=a photo of {instance}, {caption}",
                 "data.instance_token=sks", "data.caption_dropout=0.3")
    base = build_train_dataset(templ.data, seed=0)
    assert distinct_captions(base)[:2] == ["", "a photo of sks, " + base.ds[0]["text"]]
    cache = FeatureCache(tmp_path / "cache", tokenizer=tiny.tokenizer, text_encoder=tiny.text_encoder)
    cache.precompute(base)
    wrapped, prompts = cache.wrap(base), PromptEncoder(tiny.tokenizer, tiny.text_encoder, max_chunks=1)
    got = [wrapped[i] for i in range(len(base))]
    want = [base[i]["caption"] for i in range(len(base))]
    assert [g["caption"] for g in got] == want and all(w == "" or w.startswith("a photo of sks, a") for w in want)
    with torch.no_grad():
        torch.testing.assert_close(torch.stack([g["prompt_embeds"] for g in got]), prompts(want), atol=1e-5, rtol=1e-5)

    shuffled = _cfg(tag_folder, "data.resolution=32", "data.shuffle_tags=true", "cache.text=true", "cache.latents=true")
    with caplog.at_level(logging.WARNING, logger="latentsd.data.cache"):
        assert cache_modes(shuffled) == (True, False)
        wrapped = cache.wrap(build_train_dataset(shuffled.data, seed=0))  # a FeatureCache used directly: no text
    assert "shuffle_tags" in caplog.text and "on the fly" in caplog.text and "prompt_embeds" not in wrapped[0]


# --------------------------------------------------------------------------- through the trainer


def test_training_with_tag_edits_and_a_template_resumes_exactly(tmp_path, tag_folder):
    run = ["max_steps=4", "checkpoint_every=2", "checkpoints_total_limit=0", "optim.train_batch_size=2",
           "data.resolution=32", "data.shuffle_tags=true", "data.keep_tokens=1", "data.tag_dropout=0.3",
           "data.caption_template=a photo of {caption}", "data.caption_dropout=0.2", "cache.latents=true"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    train(_cfg(tag_folder, *run, out=full))
    train(_cfg(tag_folder, *run, f"resume={full}/checkpoints/step-0000002", out=resumed))
    a, b = read_metrics(full), read_metrics(resumed)
    assert sorted(b) == [3, 4] and all(a[s]["loss"] == b[s]["loss"] for s in b)
    plain = tmp_path / "plain"  # the captions reach the text encoder: other captions, other losses
    train(_cfg(tag_folder, *run[:5], "data.caption_dropout=0.2", "cache.latents=true", out=plain))
    assert any(read_metrics(plain)[s]["loss"] != a[s]["loss"] for s in a)


# --------------------------------------------------------------------------- shown to learn (slow)


def _tags(caption: str, order=(0, 1, 2)) -> str:
    """'a red star on the left' -> 'red, star, on the left' (color, shape, position), in ``order``."""
    words = caption.split()
    parts = [words[1], words[2], " ".join(words[3:])]
    return ", ".join(parts[k] for k in order)


def caption_learning_run(out: Path, steps: int = 300) -> dict:
    """The demo recipe on tag captions ('red, star, on the left'), tags in a fixed order or shuffled; prompts in
    the training order and reversed ('on the left, star, red'), scored against the scene they describe."""
    from latentsd.data.shapes import SHAPES, score
    from latentsd.demo import BASE_MODEL, prompts_for, write_concept_data
    from latentsd.generate import load_pipeline
    from latentsd.images import save_images
    from latentsd.resources import shipped_config

    data = write_concept_data(out / "data", 600, 600, seed=0)
    meta = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    (data / "metadata.jsonl").write_text("".join(json.dumps({**m, "text": _tags(m["text"])}) + "\n" for m in meta))
    scenes = prompts_for(["star"]) + prompts_for(list(SHAPES))[::3]  # 30 star and 30 known-shape scenes
    results = {}
    for name, extra in (("fixed order", []), ("shuffled", ["data.shuffle_tags=true"])):
        run = out / name.replace(" ", "_")
        summary = train(load_config(shipped_config("train", "demo_star"), [
            f"output_dir={run}", f"model.pretrained={BASE_MODEL}", f"data.dataset={data}",
            f"max_steps={steps}", f"checkpoint_every={steps}", *extra]))
        pipe = load_pipeline(summary["model"], scheduler="ddim")
        pipe.set_progress_bar_config(disable=True)
        results[name] = {"train_seconds": summary["seconds"]}
        for prompt_order, order in (("training order", (0, 1, 2)), ("reversed", (2, 1, 0))):
            prompts = [_tags(scene, order) for scene in scenes]
            images = pipe(prompts, num_inference_steps=25, guidance_scale=2.0,
                          generator=torch.Generator().manual_seed(0)).images
            save_images(images, prompts, run / f"{prompt_order.replace(' ', '_')}.png", cols=5)
            results[name][prompt_order] = {"star": score(images[:30], scenes[:30])["all"],
                                           "old": score(images[30:], scenes[30:])["all"]}
    return results


@pytest.mark.slow
def test_shuffled_tags_teach_prompts_in_any_order(tmp_path):
    """Measured 2026-12-01 (2 shared CPU cores, 300 steps each), star prompts, all three right: fixed order 100 %
    in the training order, 3 % reversed; shuffled 97 % and 90 % (known shapes: 100 / 7 % and 100 / 100 %)."""
    results = caption_learning_run(tmp_path)
    print(json.dumps(results, indent=1))
    fixed, shuffled = results["fixed order"], results["shuffled"]
    assert shuffled["reversed"]["star"] >= 0.8 and shuffled["training order"]["star"] >= 0.8
    assert shuffled["reversed"]["star"] > fixed["reversed"]["star"] + 0.2
