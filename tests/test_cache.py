"""The on-disk latent / text cache: sharding, reuse, self-invalidation, flips, multi-process shares."""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import datasets
import PIL.Image
import pytest
import torch

from latentsd.config import DataConfig, load_config
from latentsd.data.cache import (
    CacheMissingError,
    FeatureCache,
    build_cached_dataset,
    cache_modes,
    collate_cached,
    distinct_captions,
    latents_cacheable,
    latents_from_params,
    module_fingerprint,
    sample_from_params,
    tokenizer_fingerprint,
)
from latentsd.data.buckets import make_bucket_sampler
from latentsd.data.datasets import CaptionImageDataset, build_train_dataset
from latentsd.data.fingerprints import latent_key
from latentsd.data.shapes import make_shapes_dataset, write_imagefolder
from latentsd.latents import encode
from latentsd.text import PromptEncoder

N = 12
SHARD = 5
RES = 64


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_imagefolder(make_shapes_dataset(N, seed=0), tmp_path_factory.mktemp("shapes"))


def _rows(folder: Path) -> tuple[list[str], list]:
    meta = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return [str(folder / m["file_name"]) for m in meta], [m["text"] for m in meta]


def make_base(paths, captions, seed=0, **data) -> CaptionImageDataset:
    """A CaptionImageDataset over in-memory rows (image paths + captions): quicker than load_dataset."""
    hf = datasets.Dataset.from_dict({"image": list(paths), "text": list(captions)}).cast_column("image", datasets.Image())
    cfg = DataConfig(dataset="mem", resolution=data.pop("resolution", RES), **data)
    return CaptionImageDataset(hf, cfg, seed=seed)


def make_cache(root, tiny, **kw) -> FeatureCache:
    kw = {"vae": tiny.vae, "tokenizer": tiny.tokenizer, "text_encoder": tiny.text_encoder, "shard_size": SHARD, **kw}
    return FeatureCache(root, **kw)


def shard_files(root: Path, kind: str) -> list[Path]:
    return sorted((root / kind).glob(f"{kind}-*.safetensors"))


# --------------------------------------------------------------------------- build, index, reuse


def test_build_shards_index_and_noop_rebuild(tiny, folder, tmp_path, monkeypatch):
    cfg = load_config("configs/train/tiny.yaml", [f"data.dataset={folder}", f"data.resolution={RES}"])
    ds = build_train_dataset(cfg.data, seed=cfg.seed)
    root = tmp_path / "cache"
    n_text = len(distinct_captions(ds))
    assert "" in distinct_captions(ds) and n_text >= 2

    stats = make_cache(root, tiny).precompute(ds, batch_size=4)
    assert (stats.latents_encoded, stats.text_encoded) == (N, n_text)
    assert len(shard_files(root, "latents")) == math.ceil(N / SHARD)
    assert len(shard_files(root, "text")) == math.ceil(n_text / SHARD)

    cache = make_cache(root, tiny)  # a new run: everything comes from disk
    assert len(cache.latents) == N and len(cache.text) == n_text
    cache.write_index()
    index = json.loads((root / "latents" / "index.json").read_text())
    assert sorted(index["shards"]) == [p.name for p in shard_files(root, "latents")]
    assert sum(len(r["keys"]) for r in index["shards"].values()) == N
    assert not cache.latents.write_index()  # up to date: not rewritten

    calls = []
    monkeypatch.setattr(tiny.vae, "encode", lambda *a, **k: calls.append(1))
    again = make_cache(root, tiny).precompute(ds, batch_size=4)
    assert (again.latents_encoded, again.text_encoded, again.files_hashed, calls) == (0, 0, 0, [])
    assert (again.latents_total, again.text_total) == (N, n_text)
    monkeypatch.undo()

    wrapped = cache.wrap(ds)
    batch = collate_cached([wrapped[i] for i in range(4)])
    assert batch["latent_params"].shape == (4, 8, RES // 8, RES // 8)
    assert batch["latent_params"].dtype == torch.float32
    assert batch["prompt_embeds"].shape == (4, 77, tiny.text_encoder.config.hidden_size)
    assert batch["index"].tolist() == [0, 1, 2, 3] and batch["num_skipped"] == 0
    assert batch["caption"] == [ds[i]["caption"] for i in range(4)]


def test_wrap_without_precompute_is_an_error(tiny, folder, tmp_path):
    base = make_base(*_rows(folder))
    with pytest.raises(CacheMissingError, match="precompute on every process"):
        make_cache(tmp_path / "empty", tiny).wrap(base)


# --------------------------------------------------------------------------- invalidation


@pytest.fixture(scope="module")
def baseline(tiny, folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline") / "cache"
    base = make_base(*_rows(folder))
    stats = make_cache(root, tiny).precompute(base, batch_size=6)
    assert stats.latents_encoded == N
    return root, len(distinct_captions(base))


def _perturbed(module):
    module = copy.deepcopy(module)
    with torch.no_grad():
        next(module.parameters()).view(-1)[0] += 0.01
    return module


def _change_image(tiny, folder, tmp_path):
    from PIL import Image

    paths, captions = _rows(folder)
    img_dir = tmp_path / "imgs"
    shutil.copytree(folder, img_dir)
    paths = [str(img_dir / Path(p).name) for p in paths]
    img = Image.open(paths[3]).convert("RGB")
    img.putpixel((0, 0), (1, 2, 3))
    img.save(paths[3])
    return make_base(paths, captions), {}


def _change_caption(tiny, folder, tmp_path):
    paths, captions = _rows(folder)
    captions[5] = "a brand new caption"
    return make_base(paths, captions), {}


def _tokenizer_length(tiny, folder, tmp_path):
    tok = copy.deepcopy(tiny.tokenizer)
    tok.model_max_length = 76
    return make_base(*_rows(folder)), {"tokenizer": tok}


def _tokenizer_token(tiny, folder, tmp_path):
    tok = copy.deepcopy(tiny.tokenizer)
    tok.add_tokens(["zqxj"])
    return make_base(*_rows(folder)), {"tokenizer": tok}


CHANGES = {
    # name: (change -> (dataset, FeatureCache overrides), latents re-encoded, text re-encoded ("all" = every caption))
    "image_bytes": (_change_image, 1, 0),
    "vae_weights": (lambda t, f, p: (make_base(*_rows(f)), {"vae": _perturbed(t.vae)}), N, 0),
    "resolution": (lambda t, f, p: (make_base(*_rows(f), resolution=32), {}), N, 0),
    "tokenizer_max_length": (_tokenizer_length, 0, "all"),
    "tokenizer_added_token": (_tokenizer_token, 0, "all"),
    "text_encoder_weights": (lambda t, f, p: (make_base(*_rows(f)), {"text_encoder": _perturbed(t.text_encoder)}), 0, "all"),
    "clip_skip": (lambda t, f, p: (make_base(*_rows(f)), {"clip_skip": 1}), 0, "all"),
    "caption": (_change_caption, 0, 1),
}


@pytest.mark.parametrize("name", list(CHANGES))
def test_a_change_reencodes_exactly_the_affected_entries(name, tiny, folder, baseline, tmp_path):
    root0, n_text = baseline
    root = tmp_path / "cache"
    shutil.copytree(root0, root)
    before = {p.name: p.read_bytes() for p in (root / "latents").glob("*.safetensors")}
    change, want_latents, want_text = CHANGES[name]
    base, overrides = change(tiny, folder, tmp_path)
    cache = make_cache(root, tiny, **overrides)

    stats = cache.precompute(base, batch_size=6)
    assert (stats.latents_encoded, stats.text_encoded) == (want_latents, n_text if want_text == "all" else want_text)
    assert {p.name: p.read_bytes() for p in (root / "latents").glob("*.safetensors") if p.name in before} == before
    again = cache.precompute(base, batch_size=6)  # and the new entries are then reused
    assert (again.latents_encoded, again.text_encoded) == (0, 0)
    cache.wrap(base)[0]  # everything the changed dataset needs is there


# --------------------------------------------------------------------------- same samples as CaptionImageDataset


@pytest.fixture(scope="module")
def list_caption_folder(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lists")
    paths, captions = _rows(folder)
    with open(out / "metadata.jsonl", "w") as f:
        for i, (p, c) in enumerate(zip(paths[:6], captions)):
            shutil.copy(p, out / Path(p).name)
            options = [c, c.upper(), "#" + c][: 1 + i % 3]  # lists of 1 to 3 captions
            f.write(json.dumps({"file_name": Path(p).name, "text": options}) + "\n")
    return out


def test_samples_match_caption_image_dataset(tiny, list_caption_folder, tmp_path):
    cfg = load_config("configs/train/tiny.yaml", [f"data.dataset={list_caption_folder}", f"data.resolution={RES}",
                                                  "data.random_flip=true", "data.caption_dropout=0.3", "seed=5"])
    base = build_train_dataset(cfg.data, seed=cfg.seed)
    ref = build_train_dataset(cfg.data, seed=cfg.seed)
    assert len(distinct_captions(base)) == 1 + sum(1 + i % 3 for i in range(6))  # "" + every option
    cache = make_cache(tmp_path / "cache", tiny)
    stats = cache.precompute(base, batch_size=8)
    assert stats.latents_encoded == 2 * len(base)  # plain + flipped
    wrapped = cache.wrap(base)
    prompts = PromptEncoder(tiny.tokenizer, tiny.text_encoder, max_chunks=1)

    seen_flips, seen_captions = set(), set()
    for epoch in range(4):
        wrapped.set_epoch(epoch)
        ref.set_epoch(epoch)
        got = [wrapped[i] for i in range(len(base))]
        want = [ref[i] for i in range(len(base))]
        assert [g["caption"] for g in got] == [w["caption"] for w in want]
        pixels = torch.stack([w["pixel_values"] for w in want])
        with torch.no_grad():
            params = tiny.vae.encode(pixels).latent_dist.parameters
            embeds = prompts([w["caption"] for w in want])
        torch.testing.assert_close(torch.stack([g["latent_params"] for g in got]), params, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.stack([g["prompt_embeds"] for g in got]), embeds, atol=1e-5, rtol=1e-5)
        for w in want:  # was it flipped? (shapes images are not mirror-symmetric)
            seen_flips.add(not torch.equal(w["pixel_values"], _plain_pixels(ref, w["index"])))
        seen_captions.update(w["caption"] for w in want)
    assert seen_flips == {True, False}
    assert "" in seen_captions and any(c.startswith("#") or c.isupper() for c in seen_captions)


def _plain_pixels(ds, row):
    from latentsd.data.datasets import open_image
    from latentsd.data.transforms import ImageTransform

    img = open_image(ds.ds[row][ds.image_column])
    return ImageTransform(RES, center_crop=True, random_flip=False)(img, torch.Generator())[0]


def test_sample_from_params_equals_encode(tiny, folder, tmp_path):
    base = make_base(*_rows(folder))
    pixels = torch.stack([base[i]["pixel_values"] for i in range(3)])
    noise = torch.randn(3, 4, RES // 8, RES // 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        params = tiny.vae.encode(pixels).latent_dist.parameters
        want = encode(tiny.vae, pixels, noise=noise)
        mode = encode(tiny.vae, pixels, sample=False)
    scale = tiny.vae.config.scaling_factor
    assert torch.equal(sample_from_params(params, noise, scale), want)
    assert torch.equal(latents_from_params(tiny.vae, params, noise), want)
    assert torch.equal(sample_from_params(params, None, scale), mode)
    assert torch.equal(sample_from_params(params[0], noise[0], scale), want[0])  # unbatched [2C, h, w]
    shifted = sample_from_params(params, noise, scale, shift_factor=0.1)
    torch.testing.assert_close(shifted, want - 0.1 * scale)
    huge = params.clone()
    huge[:, 4:] = 100.0  # logvar clamps at 20, as diffusers does
    torch.testing.assert_close(sample_from_params(huge, noise, 1.0), params[:, :4] + torch.exp(torch.tensor(10.0)) * noise)

    # and through the cache: the stored params give the trainer's latents for the same noise
    cache = make_cache(tmp_path / "cache", tiny)
    cache.precompute(base)
    cached = torch.stack([cache.wrap(base)[i]["latent_params"] for i in range(3)])
    torch.testing.assert_close(sample_from_params(cached, noise, scale), want, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- several processes


def test_two_ranks_share_the_work(tiny, folder, tmp_path):
    root = tmp_path / "cache"
    base = make_base(*_rows(folder), random_flip=True)
    n_text = len(distinct_captions(base))
    r0 = make_cache(root, tiny).precompute(base, rank=0, world=2, batch_size=4)
    r1 = make_cache(root, tiny).precompute(base, rank=1, world=2, batch_size=4)
    assert (r0.latents_encoded, r1.latents_encoded) == (N, N)  # 6 rows x 2 flips each
    assert (r0.files_hashed, r1.files_hashed) == (N // 2, N // 2)
    assert sorted([r0.text_encoded, r1.text_encoded]) == [n_text // 2, n_text - n_text // 2]
    assert {n.split("-")[1] for n in r0.shards} == {"r00000"} and {n.split("-")[1] for n in r1.shards} == {"r00001"}

    cache = make_cache(root, tiny)  # every process reloads after the barrier
    for store, want in ((cache.latents, 2 * N), (cache.text, n_text)):
        keys = [k for ks in store.listing.values() for k in ks]
        assert len(keys) == len(set(keys)) == want  # every entry exactly once
    wrapped = cache.wrap(base)
    assert len(wrapped) == N and wrapped[N - 1]["latent_params"].shape[0] == 8
    for rank in (0, 1):
        assert make_cache(root, tiny).precompute(base, rank=rank, world=2).latents_encoded == 0


def test_build_cached_dataset_with_an_accelerator(tiny, folder, tmp_path):
    barriers = []
    acc = SimpleNamespace(process_index=0, num_processes=1, is_local_main_process=True,
                          wait_for_everyone=lambda: barriers.append(1))
    base = make_base(*_rows(folder))
    ds = build_cached_dataset(base, tmp_path / "cache", vae=tiny.vae, tokenizer=tiny.tokenizer,
                              text_encoder=tiny.text_encoder, shard_size=SHARD, accelerator=acc, progress=False)
    assert barriers == [1] and ds.stats.latents_encoded == N
    assert (tmp_path / "cache" / "latents" / "index.json").is_file()
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_cached)
    assert next(iter(loader))["latent_params"].shape == (4, 8, 8, 8)


# --------------------------------------------------------------------------- unreadable images, random crop


def test_unreadable_images_are_skipped_like_the_dataset(tiny, folder, tmp_path):
    paths, captions = _rows(folder)
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths = paths[:2] + [str(bad)] + paths[2:5]
    captions = captions[:2] + ["broken"] + captions[2:5]
    base, ref = make_base(paths, captions), make_base(paths, captions)
    stats = make_cache(tmp_path / "cache", tiny).precompute(base)
    assert stats.skipped_images == 1 and stats.latents_encoded == 5

    wrapped = make_cache(tmp_path / "cache", tiny).wrap(base)  # a fresh process knows row 2 is bad
    got, want = wrapped[2], ref[2]
    assert got["num_skipped"] == want["num_skipped"] == 1 and got["caption"] == want["caption"]
    with torch.no_grad():
        params = tiny.vae.encode(want["pixel_values"][None]).latent_dist.parameters[0]
    torch.testing.assert_close(got["latent_params"], params, atol=1e-5, rtol=1e-5)
    assert wrapped.num_skipped == 1 and wrapped.skipped_indices == {2}


def test_random_crop_falls_back_to_pixels(tiny, folder, tmp_path, caplog):
    cfg = load_config("configs/train/tiny.yaml", [f"data.dataset={folder}", "data.center_crop=false",
                                                  "cache.latents=true", "cache.text=true"])
    assert not latents_cacheable(cfg.data) and latents_cacheable(DataConfig(dataset="x"))
    with caplog.at_level(logging.WARNING, logger="latentsd.data.cache"):
        assert cache_modes(cfg) == (False, True)
    assert "center_crop=false" in caplog.text and "on the fly" in caplog.text
    assert cache_modes(load_config(cfg, ["model.train_text_encoder=true", "data.center_crop=true"])) == (True, False)

    paths, captions = _rows(folder)
    base = make_base(paths, captions, seed=3, center_crop=False, random_flip=True, resolution=48)
    ref = make_base(paths, captions, seed=3, center_crop=False, random_flip=True, resolution=48)
    cache = make_cache(tmp_path / "cache", tiny)
    with caplog.at_level(logging.WARNING, logger="latentsd.data.cache"):
        stats = cache.precompute(base)
    assert stats.latents_encoded == 0 and stats.text_encoded > 0 and "encoded on the fly" in caplog.text
    wrapped = cache.wrap(base)
    wrapped.set_epoch(2)
    ref.set_epoch(2)
    for i in range(4):
        got, want = wrapped[i], ref[i]
        assert "latent_params" not in got and torch.equal(got["pixel_values"], want["pixel_values"])
        assert got["caption"] == want["caption"] and got["prompt_embeds"].shape == (77, 32)
    assert collate_cached([wrapped[0], wrapped[1]])["pixel_values"].shape == (2, 3, 48, 48)


# --------------------------------------------------------------------------- fingerprints


def test_fingerprints(tiny):
    vae = copy.deepcopy(tiny.vae)
    fp = module_fingerprint(vae)
    assert module_fingerprint(vae) == fp == module_fingerprint(copy.deepcopy(vae))
    with torch.no_grad():
        vae.encoder.conv_in.bias[0] += 1.0  # in place: noticed without refresh
    assert module_fingerprint(vae) != fp
    tok = tiny.tokenizer
    before = tokenizer_fingerprint(tok)
    tok(["a red circle"], truncation=True, max_length=10, padding="max_length")  # call-time state only
    assert tokenizer_fingerprint(tok) == before


def test_pickles_for_workers_and_buckets_after_the_cache_are_refused(tiny, folder, tmp_path):
    import pickle

    base = make_base(*_rows(folder), random_flip=True)
    cache = make_cache(tmp_path / "cache", tiny)
    cache.precompute(base)
    wrapped = cache.wrap(base)
    wrapped.set_epoch(1)
    first = wrapped[3]
    clone = pickle.loads(pickle.dumps(wrapped))  # what a spawned DataLoader worker gets
    again = clone[3]
    assert torch.equal(first["latent_params"], again["latent_params"]) and first["caption"] == again["caption"]

    with pytest.raises(ValueError, match="bucket sizes must be set before the latent cache is built"):
        wrapped.set_bucket_sizes([(32, 64)] * N)  # its latents are square: buckets come first
    text_only = make_cache(tmp_path / "cache", tiny, vae=None).wrap(base)
    ref = make_base(*_rows(folder), random_flip=True)
    for d in (text_only, ref):
        d.set_bucket_sizes([(32, 64)] * N)
        d.set_epoch(2)
    got, want = text_only[2], ref[2]
    assert got["pixel_values"].shape == (3, 32, 64) and torch.equal(got["pixel_values"], want["pixel_values"])


# --------------------------------------------------------------------------- aspect-ratio buckets

# resolution 64, bucket step 16: buckets (48, 80), (64, 64), (80, 48); (w, h) per image, in PIL's order
MIXED = [(128, 64), (64, 128), (96, 96), (120, 60), (64, 64), (60, 100), (128, 64), (96, 96)]
CORRUPT_ROW = 6  # a wide image cut in half: its header reads (it gets a bucket), its pixels do not decode


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixed")
    rng = torch.Generator().manual_seed(0)
    lines = []
    for i, (w, h) in enumerate(MIXED):
        pixels = torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy()
        PIL.Image.fromarray(pixels).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"picture number {i}"}))
    data = (root / f"{CORRUPT_ROW}.png").read_bytes()
    (root / f"{CORRUPT_ROW}.png").write_bytes(data[: len(data) // 2])
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _bucketed(folder: Path, *extra: str):
    cfg = load_config("configs/train/tiny.yaml", [f"data.dataset={folder}", "data.resolution=64", "data.buckets=true",
                                                  "data.bucket_step=16", "data.random_flip=true", *extra])
    ds = build_train_dataset(cfg.data, seed=1)
    make_bucket_sampler(ds, cfg.data, batch_size=1, seed=1)
    return ds


def test_bucketed_latents_are_cached_at_each_bucket_size(tiny, mixed_folder, tmp_path):
    base, ref = _bucketed(mixed_folder), _bucketed(mixed_folder)
    cache = make_cache(tmp_path / "cache", tiny)
    stats = cache.precompute(base, batch_size=3)
    assert stats.skipped_images == 1
    assert stats.latents_encoded == 2 * (len(MIXED) - 1) + 2  # plain + flipped, and the corrupt row's stand-in
    wrapped = make_cache(tmp_path / "cache", tiny).wrap(base)
    shapes = set()
    for epoch in range(3):
        wrapped.set_epoch(epoch)
        ref.set_epoch(epoch)
        got = [wrapped[i] for i in range(len(MIXED))]
        want = [ref[i] for i in range(len(MIXED))]
        for g, w in zip(got, want):
            with torch.no_grad():
                params = tiny.vae.encode(w["pixel_values"][None]).latent_dist.parameters[0]
            torch.testing.assert_close(g["latent_params"], params, atol=1e-5, rtol=1e-5)
            assert g["caption"] == w["caption"] and g["num_skipped"] == w["num_skipped"]
            shapes.add(tuple(g["latent_params"].shape[1:]))
    assert shapes == {(6, 10), (8, 8), (10, 6)}  # each image at its bucket's size, in latents (/8)
    assert got[CORRUPT_ROW]["num_skipped"] == 1 and got[CORRUPT_ROW]["latent_params"].shape[1:] == (6, 10)

    # a square bucket is the square: a run without buckets reuses those entries, encodes the rest
    square = make_base(*_rows_of(mixed_folder), random_flip=True)
    again = make_cache(tmp_path / "cache", tiny).precompute(square)
    n_square = sum(w == h for w, h in MIXED)
    assert again.latents_encoded == 2 * (len(MIXED) - 1 - n_square)
    assert latent_key("c", "d", False, (48, 80)) not in {latent_key("c", "d", False), latent_key("c", "d", False, (80, 48))}


def _rows_of(folder: Path) -> tuple[list[str], list]:
    meta = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return [str(folder / m["file_name"]) for m in meta], [m["text"] for m in meta]


def test_bucketed_training_from_the_cache_gives_the_same_losses_and_resumes_exactly(mixed_folder, tmp_path):
    from latentsd.training.logs import read_metrics
    from latentsd.training.trainer import train

    run = ["max_steps=4", "checkpoint_every=2", "checkpoints_total_limit=0", "optim.train_batch_size=2",
           "data.buckets=true", "data.bucket_step=16", "data.random_flip=true", "data.caption_dropout=0.3"]
    cached = run + ["cache.latents=true", "cache.text=true"]

    def cfg(out, *extra):
        return load_config("configs/train/tiny.yaml", [f"output_dir={tmp_path / out}", f"data.dataset={mixed_folder}",
                                                      *extra])

    train(cfg("plain", *run, "cache.latents=false", "cache.text=false"))  # the reference: encoded every step
    summary = train(cfg("cached", *cached))
    train(cfg("resumed", *cached, f"resume={tmp_path}/cached/checkpoints/step-0000002"))
    plain, warm, resumed = (read_metrics(tmp_path / d) for d in ("plain", "cached", "resumed"))
    assert sorted(warm) == [1, 2, 3, 4] and sorted(resumed) == [3, 4]
    for step in plain:
        assert abs(plain[step]["loss"] - warm[step]["loss"]) < 1e-5
    assert all(resumed[s]["loss"] == warm[s]["loss"] for s in resumed)
    assert sorted((tmp_path / "cached/cache/latents").glob("*.safetensors")) and summary["steps"] == 4
