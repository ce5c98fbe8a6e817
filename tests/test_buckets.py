"""Aspect-ratio bucketing: bucket sizes, assignment, header-only image sizes, the batch sampler (alone, through
accelerate, resumed and sharded) and bucket-shaped samples from CaptionImageDataset."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentsd.config import load_config
from latentsd.data.buckets import (
    BucketBatchSampler,
    assign_bucket,
    assign_buckets,
    build_bucketed_loader,
    image_size,
    image_sizes,
    make_bucket_sampler,
    make_buckets,
)
from latentsd.data.datasets import CaptionImageDataset, build_train_dataset, collate
from latentsd.data.transforms import ImageTransform

TINY_YAML = Path(__file__).resolve().parents[1] / "configs" / "train" / "tiny.yaml"
RED, GREEN, BLUE, GRAY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 128, 128)

# resolution 64, step 16 -> buckets (48, 80), (64, 64), (80, 48)
WIDE, SQUARE, TALL = (48, 80), (64, 64), (80, 48)
# file name -> (width, height), expected bucket (h, w); sizes in PIL's (w, h) order
IMAGES = {
    "sq_a.png": ((64, 64), SQUARE),
    "sq_b.png": ((60, 64), SQUARE),
    "sq_c.png": ((72, 64), SQUARE),
    "wide_2to1.png": ((128, 64), WIDE),  # red | green | blue stripes, 16 px each edge
    "wide_3to2.png": ((96, 64), WIDE),
    "wide_5to3.png": ((160, 96), WIDE),  # exactly the bucket's aspect: thin 4 px edge stripes
    "wide_5to3_small.png": ((80, 48), WIDE),
    "wide_big.png": ((200, 100), WIDE),
    "tall_1to2.png": ((64, 128), TALL),
    "tall_2to5.png": ((64, 160), TALL),
    "tall_3to5.png": ((48, 80), TALL),
    "tall_7to10.png": ((70, 100), TALL),
}
STRIPES = {"wide_2to1.png": 16, "wide_5to3.png": 4}


def _image(name: str, size: tuple[int, int]) -> Image.Image:
    img = Image.new("RGB", size, GRAY if name not in STRIPES else GREEN)
    if name in STRIPES:
        s, (w, h) = STRIPES[name], size
        img.paste(RED, (0, 0, s, h))
        img.paste(BLUE, (w - s, 0, w, h))
    return img


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("buckets") / "imgs"
    root.mkdir()
    rows = []
    for name, (size, _) in IMAGES.items():
        _image(name, size).save(root / name)
        rows.append({"file_name": name, "text": f"an image {name}"})
    (root / "corrupt.png").write_bytes(b"not a png at all")
    rows.append({"file_name": "corrupt.png", "text": "broken"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _cfg(folder: Path, *more: str):
    return load_config(TINY_YAML, [f"data.dataset={folder}", "data.buckets=true", "data.resolution=64",
                                   "data.bucket_step=16", *more])


def _dataset(folder: Path, *more: str, seed: int = 0) -> CaptionImageDataset:
    cfg = _cfg(folder, *more)
    return build_train_dataset(cfg.data, seed, cache_dir=str(folder.parent / "hf_cache"))


def _names(ds: CaptionImageDataset) -> list[str]:
    return [Path(c["path"]).name for c in ds.ds[ds.image_column]]


@pytest.fixture(scope="module")
def bucketed(folder):
    """(dataset, sampler, names) with buckets set up, batch size 2."""
    ds = _dataset(folder)
    sampler = make_bucket_sampler(ds, _cfg(folder).data, batch_size=2, seed=3)
    return ds, sampler, _names(ds)


# --------------------------------------------------------------------------- bucket sizes


@pytest.mark.parametrize("resolution, step, max_aspect", [(64, 16, 2.0), (256, 32, 2.0), (512, 64, 2.0),
                                                         (1024, 64, 2.0), (768, 64, 3.0), (512, 8, 1.5), (64, 64, 2.0)])
def test_make_buckets_properties(resolution, step, max_aspect):
    buckets = make_buckets(resolution, step, max_aspect)
    assert buckets == sorted(set(buckets))
    assert (resolution, resolution) in buckets
    area = resolution * resolution
    for h, w in buckets:
        assert h % step == 0 and w % step == 0 and h >= step and w >= step
        assert h * w <= area  # never above resolution²: a memory bound
        assert h * w > area - step * max(h, w)  # short of it by less than one step-wide strip
        assert 1 / max_aspect <= w / h <= max_aspect
        assert (w, h) in buckets  # portrait and landscape alike
    if step <= resolution // 8:
        assert len(buckets) >= 5  # fine steps give real aspect choice
        assert all(h * w >= 0.9 * area for h, w in buckets)


def test_make_buckets_tiny_setting():
    assert make_buckets(64, 16, 2.0) == [WIDE, SQUARE, TALL]
    assert make_buckets(64, 64) == [SQUARE]  # tiny.yaml defaults: only the square fits
    assert max(w / h for h, w in make_buckets(1024, 64, 2.0)) == 2.0  # 704 x 1408


@pytest.mark.parametrize("args, match", [((32, 64), "must be >= the bucket step"), ((96, 64), "multiple of the bucket step"),
                                         ((64, 0), "step must be >= 1"), ((64, 16, 0.5), "max_aspect"),
                                         ((64, 16, float("nan")), "max_aspect")])
def test_make_buckets_errors(args, match):
    with pytest.raises(ValueError, match=match):
        make_buckets(*args)


def test_assign_bucket():
    buckets = make_buckets(512, 64, 2.0)  # widest 384 x 640
    assert buckets[assign_bucket(300, 300, buckets)] == (512, 512)
    assert buckets[assign_bucket(500, 1000, buckets)] == (384, 640)  # 2:1 -> the widest (<= 2)
    assert buckets[assign_bucket(1000, 500, buckets)] == (640, 384)
    assert buckets[assign_bucket(10, 1000, buckets)] == (384, 640)  # extreme panoramas clamp to the widest
    b = make_buckets(1024, 64, 2.0)
    assert b[assign_bucket(1000, 2000, b)] == (704, 1408)
    assert b[assign_bucket(768, 1024, b)] == (896, 1152)  # 4:3 -> 1.286, the nearest in log aspect
    assert assign_buckets([(64, 128), None, (64, 64)], [WIDE, SQUARE, TALL]) == [0, None, 1]
    with pytest.raises(ValueError):
        assign_bucket(0, 5, buckets)


# --------------------------------------------------------------------------- image sizes


def test_image_size_reads_headers_and_exif(tmp_path):
    img = Image.new("RGB", (40, 20))
    img.save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    assert image_size({"bytes": None, "path": str(tmp_path / "a.png")}) == (20, 40)
    assert image_size({"bytes": data, "path": "ignored.png"}) == (20, 40)
    assert image_size(data) == image_size(str(tmp_path / "a.png")) == image_size(img) == (20, 40)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: the decoded (and trained-on) image is 20 wide, 40 tall
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert image_size({"bytes": buf.getvalue(), "path": None}) == (40, 20)
    with pytest.raises(Exception):
        image_size({"bytes": b"garbage", "path": None})


def test_image_sizes_of_dataset_counts_unreadable(folder):
    ds = _dataset(folder)
    sizes = image_sizes(ds, progress=False, chunk_size=5)  # several chunks
    names = _names(ds)
    assert len(sizes) == len(ds) == len(IMAGES) + 1
    for name, hw in zip(names, sizes):
        if name == "corrupt.png":
            assert hw is None
        else:
            w, h = IMAGES[name][0]
            assert hw == (h, w)
    assert ds.num_skipped == 1 and ds.skipped_indices == {names.index("corrupt.png")}


# --------------------------------------------------------------------------- sampler


def _ids(n=103, buckets=4, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, buckets, n).tolist()
    for i in (5, 17, 60):
        ids[i] = None  # unreadable
    ids[7] = -1
    return ids


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_batches_single_bucket_no_repeats(drop_last, shuffle):
    ids, bs = _ids(), 4
    s = BucketBatchSampler(ids, bs, seed=1, shuffle=shuffle, drop_last=drop_last)
    per_bucket = {b: sum(x == b for x in ids) for b in range(4)}
    expected_len = sum((n // bs) if drop_last else math.ceil(n / bs) for n in per_bucket.values())
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == expected_len
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))  # every index at most once per epoch
        assert not {5, 17, 60, 7} & set(flat)  # unreadable / excluded never sampled
        for b in batches:
            assert len({ids[i] for i in b}) == 1  # one bucket per batch
            assert len(b) == bs if drop_last else 1 <= len(b) <= bs
        if drop_last:
            assert len(flat) == sum(n // bs * bs for n in per_bucket.values())
        else:
            assert sorted(flat) == [i for i, b in enumerate(ids) if b is not None and b >= 0]
        if not shuffle:
            assert flat == sorted(flat, key=lambda i: (ids[i], i))


def test_sampler_deterministic_per_seed_and_epoch():
    ids = _ids()

    def order(seed, epoch):
        s = BucketBatchSampler(ids, 4, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert order(0, 0) == order(0, 0) and order(3, 2) == order(3, 2)  # fresh objects: no hidden state
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    s = BucketBatchSampler(ids, 4, seed=0)
    s.set_epoch(1)
    list(s)
    assert list(s) == order(0, 1) == s.batches(1)  # iterating twice does not advance anything
    # batches of different buckets are interleaved, not bucket after bucket
    buckets_in_order = [ids[b[0]] for b in order(0, 0)]
    assert buckets_in_order != sorted(buckets_in_order)


def test_sampler_validation_and_small_buckets():
    with pytest.raises(ValueError):
        BucketBatchSampler([0, 1], 0)
    s = BucketBatchSampler([0, 0, 0, 1, 2, 2], 2)  # bucket 1 has a single image: no full batch
    assert len(s) == 2 and all(len(b) == 2 for b in s)
    assert len(BucketBatchSampler([None, None], 2)) == 0 and list(BucketBatchSampler([None], 1)) == []


# --------------------------------------------------------------------------- transform


def test_transform_size_draws_same_numbers_and_covers():
    img = _image("wide_2to1.png", (128, 64))
    t = ImageTransform(64, center_crop=False, random_flip=True)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    x, info = t(img, g1, size=(48, 80))
    t(img, g2)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # stream unchanged by size
    assert x.shape == (3, 48, 80) and info["original_size"] == (64, 128)
    top, left = info["crop_top_left"]
    assert top == 0 and 0 <= left <= 16  # resized to 96 x 48 (scale 0.75 covers 48 x 80), then cropped
    sq, _ = t(img, torch.Generator().manual_seed(4), size=(64, 64))
    ref, _ = t(img, torch.Generator().manual_seed(4))
    assert torch.equal(sq, ref)  # size == the square is the old behaviour exactly


def test_transform_size_random_crop_and_flip_match_info():
    width, height = 96, 48
    row = (np.arange(width) * 2).astype(np.uint8)  # column x has value 2x: the crop's left edge is readable
    img = Image.fromarray(np.repeat(np.tile(row, (height, 1))[..., None], 3, axis=2))
    t = ImageTransform(64, center_crop=False, random_flip=True)
    lefts, flips = set(), set()
    for seed in range(30):
        x, info = t(img, torch.Generator().manual_seed(seed), size=(48, 64))  # no resize: 96 x 48 covers it
        top, left = info["crop_top_left"]
        cols = x[0, 0]
        if info["flipped"]:  # left is the crop's edge in the mirrored image
            expected = (torch.arange(width - left - 64, width - left, dtype=torch.float32).flip(0) * 2) / 127.5 - 1
        else:
            expected = (torch.arange(left, left + 64, dtype=torch.float32) * 2) / 127.5 - 1
        assert top == 0 and torch.allclose(cols, expected)
        lefts.add(left)
        flips.add(info["flipped"])
    assert len(lefts) > 5 and flips == {True, False}


# --------------------------------------------------------------------------- dataset


def test_make_bucket_sampler_sets_sizes_and_logs(folder, caplog):
    ds = _dataset(folder)
    names = _names(ds)
    with caplog.at_level(logging.INFO, logger="latentsd.data.buckets"):
        sampler = make_bucket_sampler(ds, _cfg(folder).data, batch_size=2, seed=0)
    assert sampler.buckets == [WIDE, SQUARE, TALL]
    assert sampler.histogram == {WIDE: 5, SQUARE: 3, TALL: 4} and sampler.num_unreadable == 1
    assert "48x80: 5, 64x64: 3, 80x48: 4" in caplog.text and "1 unreadable" in caplog.text
    assert caplog.text.count("aspect buckets") == 1
    assert len(sampler) == 2 + 1 + 2
    for i, name in enumerate(names):
        assert ds.target_size(i) == (None if name == "corrupt.png" else IMAGES[name][1])
    ds.set_bucket_sizes(None)
    assert ds[0]["pixel_values"].shape == (3, 64, 64)  # back to the square


def test_make_bucket_sampler_indices_subset(folder):
    ds = _dataset(folder)
    names = _names(ds)
    hold = 4  # a held-out prefix, as the trainer's validation.holdout
    sampler = make_bucket_sampler(ds, _cfg(folder).data, batch_size=1, seed=0, indices=range(hold, len(ds)))
    flat = sorted(i for b in sampler for i in b)
    assert flat == [i for i in range(hold, len(ds)) if names[i] != "corrupt.png"]
    assert sum(sampler.histogram.values()) == len(flat)
    assert sampler.num_unreadable == (names.index("corrupt.png") >= hold)


def test_samples_have_bucket_shape_uncropped(bucketed):
    ds, sampler, names = bucketed
    ds.set_epoch(0)
    for i, name in enumerate(names):
        if name == "corrupt.png":
            continue
        s = ds[i]
        bh, bw = IMAGES[name][1]
        assert s["pixel_values"].shape == (3, bh, bw) and s["num_skipped"] == 0
        w, h = IMAGES[name][0]
        assert s["original_size"] == (h, w)
        if name == "wide_5to3.png":  # same aspect as its bucket: nothing cropped at all
            assert s["crop_top_left"] == (0, 0)
    for batch in sampler:
        b = collate([ds[i] for i in batch])
        assert b["pixel_values"].shape[0] == 2


def _colour_at(x: torch.Tensor, col: int) -> torch.Tensor:
    return (x[:, :, col].mean(dim=1) + 1) * 127.5  # mean RGB of one column, 0..255


def test_wide_image_keeps_both_edges(folder, bucketed):
    ds, _, names = bucketed  # center crop (tiny.yaml)
    for name in STRIPES:
        x = ds[names.index(name)]["pixel_values"]
        assert x.shape == (3, *WIDE)
        r_left, g_left, b_left = _colour_at(x, 0).tolist()
        r_right, g_right, b_right = _colour_at(x, -1).tolist()
        assert r_left > 200 and b_left < 60, name  # the red left edge survived
        assert b_right > 200 and r_right < 60, name  # the blue right edge survived
    square = _dataset(folder, "data.buckets=false")  # the old square crop loses both edges
    x = square[names.index("wide_2to1.png")]["pixel_values"]
    assert x.shape == (3, 64, 64)
    assert _colour_at(x, 0)[0] < 60 and _colour_at(x, -1)[2] < 60


def test_bucketed_random_crop_and_flip(folder):
    ds = _dataset(folder, "data.center_crop=false", "data.random_flip=true", seed=1)
    make_bucket_sampler(ds, _cfg(folder).data, batch_size=2, seed=1)
    i = _names(ds).index("wide_2to1.png")
    crops, flips = set(), set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        s = ds[i]
        assert s["pixel_values"].shape == (3, *WIDE)
        crops.add(s["crop_top_left"])
        x = s["pixel_values"] + 1  # red stripe: channel 0 high; blue: channel 2 high; green middle: neither
        half = x.shape[2] // 2
        left_side = x[0, :, :half].sum() + x[2, :, half:].sum()  # red on the left, blue on the right
        flips.add(bool(x[0, :, half:].sum() + x[2, :, :half].sum() > left_side))  # mirrored
        assert x[0].sum() + x[2].sum() > 100  # a crop never loses both stripes
        assert torch.equal(s["pixel_values"], ds[i]["pixel_values"])  # deterministic per (seed, epoch, index)
    assert len(crops) > 2 and flips == {True, False}


# --------------------------------------------------------------------------- accelerate


def _indices(batches) -> list[list[int]]:
    return [b["index"].tolist() for b in batches]


def test_accelerate_prepare_set_epoch_and_resume(folder, bucketed):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration

    ds, sampler, _ = bucketed
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False, dispatch_batches=False))
    try:
        loader = acc.prepare(torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate))
        assert len(loader) == len(sampler) == 5
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            ds.set_epoch(epoch)
            assert sampler.epoch == epoch  # set_epoch reached the batch sampler
            got = list(loader)
            assert _indices(got) == sampler.batches(epoch)
            for b in got:
                assert b["pixel_values"].shape[0] == 2 and len({tuple(b["pixel_values"].shape[2:])}) == 1
            for k in (1, 3):  # exact resume mid-epoch: the remaining batches, identical tensors
                loader.set_epoch(epoch)
                rest = list(acc.skip_first_batches(loader, k))
                assert _indices(rest) == _indices(got)[k:]
                assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(rest, got[k:]))
        assert sampler.batches(0) != sampler.batches(1)
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


def test_two_process_shards(bucketed):
    from accelerate.data_loader import BatchSamplerShard, DataLoaderShard

    ds, sampler, _ = bucketed
    ids = sampler.bucket_ids
    epoch = 2
    full = sampler.batches(epoch)  # 5 batches: 2 per process, the odd one dropped
    shards = []
    for rank in range(2):
        own = BucketBatchSampler(ids, 2, seed=3)  # each process builds its own sampler
        shard = BatchSamplerShard(own, num_processes=2, process_index=rank)
        loader = DataLoaderShard(ds, batch_sampler=shard, collate_fn=collate)
        loader.set_epoch(epoch)  # must reach the sampler through the shard
        assert own.epoch == epoch
        batches = list(shard)
        assert len(batches) == len(shard) == len(full) // 2
        assert all(len(b) == 2 and len({ids[i] for i in b}) == 1 for b in batches)
        assert batches == full[rank::2][:len(full) // 2]
        assert len(_indices(loader)) == len(batches)
        shards.append(batches)
    together = [b for pair in zip(*shards) for b in pair]
    assert together == full[:2 * (len(full) // 2)]


def test_build_bucketed_loader_with_workers(folder):
    ds = _dataset(folder, "data.num_workers=1")
    loader = build_bucketed_loader(ds, _cfg(folder).data, batch_size=2, seed=0, num_workers=1)
    assert isinstance(loader.batch_sampler, BucketBatchSampler)
    batches = list(loader)  # per-index sizes travel to the worker process with the dataset
    assert _indices(batches) == loader.batch_sampler.batches(0)
    assert {tuple(b["pixel_values"].shape[2:]) for b in batches} == {WIDE, SQUARE, TALL}
