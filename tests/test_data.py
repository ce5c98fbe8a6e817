"""Training data: loading local sources, column detection, captions, transforms, skipping bad images."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from latentsd.config import DataConfig
from latentsd.data.datasets import (
    CaptionImageDataset,
    DatasetColumnError,
    StreamingCaptionImageDataset,
    build_train_dataset,
    choose_caption,
    collate,
    load_caption_dataset,
    make_caption_dataset,
    resolve_columns,
    sample_generator,
)
from latentsd.data.transforms import ImageTransform, to_rgb

RES = 16

# (file name, mode, size, fill): different modes and aspect ratios on purpose
IMAGES = [
    ("red.png", "RGB", (40, 30), (255, 0, 0)),
    ("clear.png", "RGBA", (20, 50), (0, 0, 255, 0)),  # fully transparent -> white matte
    ("gray.png", "L", (33, 33), 128),
    ("pal.png", "P", (24, 16), 3),
    ("wide.png", "RGB", (64, 16), (0, 255, 0)),
]
CAPTIONS = ["a red box", "nothing", "a gray square", "a palette image", "a wide green bar"]


def _write_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, mode, size, fill in IMAGES:
        Image.new(mode, size, fill).save(folder / name)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """All on-disk sources, built once per module (loading is the slow part)."""
    root = tmp_path_factory.mktemp("data")
    _write_images(root / "imgs")
    names = [n for n, *_ in IMAGES]

    # imagefolder + metadata.jsonl with list-of-strings captions
    fj = root / "folder_jsonl"
    _write_images(fj)
    with open(fj / "metadata.jsonl", "w") as f:
        for n, c in zip(names, CAPTIONS):
            f.write(json.dumps({"file_name": n, "text": [c, c.upper(), c + "!", "#" + c]}) + "\n")

    # imagefolder + metadata.csv, with one corrupt file
    fc = root / "folder_csv"
    _write_images(fc)
    (fc / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n definitely not a png")
    with open(fc / "metadata.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "caption"])
        w.writerows(zip(names[:2] + ["corrupt.png"] + names[2:], CAPTIONS[:2] + ["broken"] + CAPTIONS[2:]))

    # tables whose image column holds paths relative to the table file
    rel = [f"imgs/{n}" for n in names]
    with open(root / "table.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption"], *zip(rel, CAPTIONS)])
    with open(root / "table.jsonl", "w") as f:
        for p, c in zip(rel, CAPTIONS):
            f.write(json.dumps({"file_name": p, "prompt": c}) + "\n")
    pq.write_table(pa.table({"path": rel, "text": CAPTIONS}), root / "paths.parquet")

    # parquet with embedded image bytes, as written by datasets
    cells = [{"bytes": (root / p).read_bytes(), "path": None} for p in rel]
    feats = datasets.Features(image=datasets.Image(), text=datasets.Value("string"))
    datasets.Dataset.from_dict({"image": cells, "text": CAPTIONS}, features=feats).to_parquet(str(root / "embedded.parquet"))
    return root


def dcfg(dataset, **kw) -> DataConfig:
    kw.setdefault("resolution", RES)
    return DataConfig(dataset=str(dataset), **kw)


def load(root: Path, name: str, **kw):
    return load_caption_dataset(dcfg(root / name, **kw), cache_dir=str(root / "hf_cache"))


# --------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("mode, fill", [("RGB", (1, 2, 3)), ("RGBA", (9, 9, 9, 0)), ("L", 7), ("P", 0), ("LA", (5, 0)), ("I;16", 65535)])
def test_to_rgb_modes(mode, fill):
    img = to_rgb(Image.new(mode, (4, 3), fill))
    assert img.mode == "RGB" and img.size == (4, 3)
    if mode in ("RGBA", "LA"):  # transparent pixels land on a white matte
        assert img.getpixel((0, 0)) == (255, 255, 255)
    if mode == "I;16":  # 16-bit white stays white (PIL's convert would clip it)
        assert img.getpixel((0, 0)) == (255, 255, 255)


def test_to_rgb_applies_exif_rotation(tmp_path):
    img = Image.new("RGB", (4, 2))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW", as phones write it
    img.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert to_rgb(Image.open(tmp_path / "r.jpg")).size == (2, 4)


@pytest.mark.parametrize("size", [(40, 30), (20, 50), (16, 16), (64, 16), (7, 9)])
@pytest.mark.parametrize("center", [True, False])
def test_transform_shape_and_range(size, center):
    arr = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    x, info = ImageTransform(RES, center_crop=center, random_flip=True)(Image.fromarray(arr), torch.Generator().manual_seed(1))
    assert x.shape == (3, RES, RES) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert info["original_size"] == (size[1], size[0])


def test_transform_value_mapping():
    t = ImageTransform(8)
    assert torch.all(t(Image.new("RGB", (8, 8), (255, 255, 255)))[0] == 1)
    assert torch.all(t(Image.new("RGB", (8, 8), (0, 0, 0)))[0] == -1)


def _ramp(width: int, height: int) -> Image.Image:
    """Each column x has value 5*x, so a crop's left edge can be read back from its pixels."""
    row = (np.arange(width) * 5).astype(np.uint8)
    return Image.fromarray(np.repeat(np.tile(row, (height, 1))[..., None], 3, axis=2))


def _expected(left: int) -> torch.Tensor:
    cols = torch.arange(left, left + RES, dtype=torch.float32) * 5 / 127.5 - 1
    return cols.expand(3, RES, RES)


def test_center_crop_is_centered():
    x, info = ImageTransform(RES, center_crop=True)(_ramp(48, RES))  # no resize: short side == RES
    assert info["crop_top_left"] == (0, 16)
    assert torch.allclose(x, _expected(16))


def test_random_crop_varies_and_matches_info():
    t = ImageTransform(RES, center_crop=False)
    lefts = set()
    for seed in range(12):
        x, info = t(_ramp(48, RES), torch.Generator().manual_seed(seed))
        left = info["crop_top_left"][1]
        assert torch.allclose(x, _expected(left))
        lefts.add(left)
    assert len(lefts) > 3 and all(0 <= v <= 32 for v in lefts)


def test_resize_shortest_side():
    x, info = ImageTransform(8)(_ramp(64, 16))  # 64x16 -> 32x8 -> center crop
    assert x.shape == (3, 8, 8) and info["crop_top_left"] == (0, 12)


def test_flip_really_flips():
    img = _ramp(48, RES)
    plain, _ = ImageTransform(RES, random_flip=False)(img)
    flip = ImageTransform(RES, random_flip=True)
    outcomes = [flip(img, torch.Generator().manual_seed(s)) for s in range(40)]
    flipped = [x for x, info in outcomes if info["flipped"]]
    kept = [x for x, info in outcomes if not info["flipped"]]
    assert 8 < len(flipped) < 32  # p = 0.5
    assert all(torch.equal(x, torch.flip(plain, dims=[2])) for x in flipped)
    assert all(torch.equal(x, plain) for x in kept)


def test_transform_deterministic_given_generator():
    t = ImageTransform(RES, center_crop=False, random_flip=True)
    a = t(_ramp(48, 20), torch.Generator().manual_seed(5))
    b = t(_ramp(48, 20), torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]


# --------------------------------------------------------------------------- columns


F = datasets.Features


@pytest.mark.parametrize(
    "features, expected",
    [
        (F(image=datasets.Image(), text=datasets.Value("string")), ("image", "text")),
        (F(pic=datasets.Image(), note=datasets.Value("string"), n=datasets.Value("int64")), ("pic", "note")),
        (F(image=datasets.Image(), conditioning_image=datasets.Image(), prompt=datasets.Value("string")), ("image", "prompt")),
        (F(file_name=datasets.Value("string"), caption=datasets.Value("string")), ("file_name", "caption")),
        (F(image=datasets.Image(), captions=datasets.List(datasets.Value("string"))), ("image", "captions")),
    ],
)
def test_resolve_columns_auto(features, expected):
    assert resolve_columns(list(features), features) == expected


def test_resolve_columns_explicit():
    f = F(a=datasets.Image(), b=datasets.Image(), x=datasets.Value("string"), y=datasets.Value("string"))
    assert resolve_columns(list(f), f, image_column="b", caption_column="y") == ("b", "y")


@pytest.mark.parametrize(
    "features, kw, fragments",
    [
        (F(image=datasets.Image(), text=datasets.Value("string")), {"image_column": "img"}, ["data.image_column='img'", "image (Image)"]),
        (F(image=datasets.Image(), text=datasets.Value("string")), {"caption_column": "txt"}, ["data.caption_column='txt'", "Did you mean 'text'"]),
        (F(a=datasets.Image(), b=datasets.Image(), text=datasets.Value("string")), {}, ["ambiguous image", "['a', 'b']", "data.image_column"]),
        (F(image=datasets.Image(), x=datasets.Value("string"), y=datasets.Value("string")), {}, ["ambiguous caption", "['x', 'y']", "data.caption_column"]),
        (F(image=datasets.Image(), label=datasets.Value("int64")), {}, ["could not find the caption", "label (int64)"]),
        (F(image=datasets.Image(), label=datasets.Value("int64")), {"caption_column": "label"}, ["expected string or list of strings"]),
        (F(x=datasets.Value("int64"), text=datasets.Value("string")), {}, ["could not find the image"]),
    ],
)
def test_resolve_columns_errors(features, kw, fragments):
    with pytest.raises(DatasetColumnError) as e:
        resolve_columns(list(features), features, **kw)
    for frag in fragments:
        assert frag in str(e.value)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "name, image_col, caption_col, n",
    [
        ("folder_jsonl", "image", "text", 5),
        ("folder_csv", "image", "caption", 6),
        ("table.csv", "image", "caption", 5),
        ("table.jsonl", "file_name", "prompt", 5),
        ("paths.parquet", "path", "text", 5),
        ("embedded.parquet", "image", "text", 5),
    ],
)
def test_load_local_sources(root, name, image_col, caption_col, n):
    hf = load(root, name)
    assert len(hf) == n
    assert isinstance(hf.features[image_col], datasets.Image)  # path columns are cast to Image
    ds = CaptionImageDataset(hf, dcfg(root / name), seed=0)
    assert (ds.image_column, ds.caption_column) == (image_col, caption_col)
    sample = ds[0]
    assert sample["pixel_values"].shape == (3, RES, RES)
    assert isinstance(sample["caption"], str) and sample["caption"]


def test_relative_paths_resolved_against_table_not_cwd(root, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a cwd-relative lookup would fail here
    ds = CaptionImageDataset(load(root, "table.csv"), dcfg(root / "table.csv"))
    assert all(ds[i]["num_skipped"] == 0 for i in range(len(ds)))


def test_embedded_parquet_holds_bytes(root):
    cell = load(root, "embedded.parquet").cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert cell["bytes"]


def test_explicit_columns_and_missing_column(root):
    ds = CaptionImageDataset(load(root, "folder_csv"), dcfg(root, image_column="image", caption_column="caption"))
    assert ds.caption_column == "caption"
    with pytest.raises(DatasetColumnError, match="Columns: image"):
        CaptionImageDataset(load(root, "folder_csv"), dcfg(root, caption_column="prompt"))


def test_save_to_disk_directory(root, tmp_path):
    load(root, "embedded.parquet").save_to_disk(str(tmp_path / "saved"))
    assert len(load_caption_dataset(dcfg(tmp_path / "saved"))) == 5


@pytest.mark.parametrize("missing", ["./nope", "data/tiny_imagefolder", "x/y/z", "nope.parquet", "/abs/nope"])
def test_missing_local_path_is_clear(missing, tmp_path, monkeypatch):
    # must fail fast with the fix, not after a hub lookup (no network here)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()  # "data/x" counts as local once ./data exists
    with pytest.raises(FileNotFoundError, match="make-shapes"):
        load_caption_dataset(dcfg(missing))


def test_unsupported_file_type(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_caption_dataset(dcfg(tmp_path / "x.txt"))


@pytest.mark.parametrize("name", ["folder_jsonl", "table.csv"])
def test_max_samples(root, name):
    assert len(load(root, name, max_samples=2)) == 2
    assert len(list(load(root, name, max_samples=2, streaming=True))) == 2


@pytest.mark.parametrize("name", ["folder_jsonl", "table.csv", "embedded.parquet"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_streaming_yields_samples(root, name, shuffle, monkeypatch):
    # datasets sleeps 5 s after a shuffled parquet stream ends (an arrow-threads workaround)
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)
    cfg = dcfg(root / name, streaming=True, shuffle=shuffle)
    ds = build_train_dataset(cfg, seed=0, cache_dir=str(root / "hf_cache"))
    assert isinstance(ds, StreamingCaptionImageDataset)
    samples = list(ds)
    assert len(samples) == 5
    assert {s["pixel_values"].shape for s in samples} == {(3, RES, RES)}
    assert all(isinstance(s["caption"], str) and s["caption"] for s in samples)


# --------------------------------------------------------------------------- captions and randomness


def test_list_caption_pick_deterministic_per_seed_epoch_index(root):
    hf = load(root, "folder_jsonl")
    options = set(hf[0]["text"])
    ds = CaptionImageDataset(hf, dcfg(root), seed=7)
    again = CaptionImageDataset(hf, dcfg(root), seed=7)  # a fresh object (another worker / a resumed run)
    picks = []
    for epoch in range(16):
        ds.set_epoch(epoch)
        again.set_epoch(epoch)
        a = ds[0]
        assert a["caption"] in options
        assert a["caption"] == ds[0]["caption"] == again[0]["caption"]
        picks.append(a["caption"])
    assert len(set(picks)) > 1  # the pick really changes with the epoch


def test_sample_independent_of_access_order(root):
    # same (seed, epoch, index) -> same sample, whatever was read before (worker count / resume)
    cfg = dcfg(root, center_crop=False, random_flip=True)
    hf = load(root, "folder_jsonl")
    a = CaptionImageDataset(hf, cfg, seed=1)
    b = CaptionImageDataset(hf, cfg, seed=1)
    first = [a[i] for i in range(5)]
    for i in reversed(range(5)):
        s = b[i]
        assert torch.equal(s["pixel_values"], first[i]["pixel_values"]) and s["caption"] == first[i]["caption"]


def test_sample_generator_streams_differ():
    draws = {tuple(torch.rand(2, generator=sample_generator(*k)).tolist()) for k in [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]}
    assert len(draws) == 4


@pytest.mark.parametrize("rate", [0.0, 0.3, 1.0])
def test_caption_dropout_rate(rate):
    n = 600
    out = [choose_caption(["a", "b"], sample_generator(0, 0, i), rate) for i in range(n)]
    dropped = sum(c == "" for c in out)
    assert abs(dropped / n - rate) < 0.06
    assert set(out) <= {"", "a", "b"}  # dropout yields exactly "", nothing else


def test_caption_dropout_in_dataset_yields_empty_string(root):
    ds = CaptionImageDataset(load(root, "folder_jsonl"), dcfg(root, caption_dropout=1.0))
    assert all(ds[i]["caption"] == "" for i in range(len(ds)))


# --------------------------------------------------------------------------- corrupt images, collate, DataLoader


def test_corrupt_image_skipped_and_counted(root, caplog):
    hf = load(root, "folder_csv")
    bad = [i for i in range(len(hf)) if hf.cast_column("image", datasets.Image(decode=False))[i]["image"]["path"].endswith("corrupt.png")]
    ds = CaptionImageDataset(hf, dcfg(root / "folder_csv"))
    with caplog.at_level(logging.WARNING, logger="latentsd.data.datasets"):
        samples = [ds[i] for i in range(len(ds))]  # must not raise
    assert ds.num_skipped == 1 and ds.skipped_indices == set(bad)
    assert samples[bad[0]]["num_skipped"] == 1 and samples[bad[0]]["caption"] != "broken"
    assert sum(s["num_skipped"] for s in samples) == 1
    assert "skipped 1 unreadable image" in caplog.text and "corrupt.png" in caplog.text


def test_streaming_skips_corrupt(root):
    ds = build_train_dataset(dcfg(root / "folder_csv", streaming=True, shuffle=False), cache_dir=str(root / "hf_cache"))
    samples = list(ds)
    assert len(samples) == 5 and ds.num_skipped == 1 and sum(s["num_skipped"] for s in samples) == 1


def test_collate_and_seeded_dataloader(root):
    ds = make_caption_dataset(load(root, "folder_csv"), dcfg(root / "folder_csv"), seed=0)

    def indices(seed):
        sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(seed))
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate)
        batches = list(loader)
        b = batches[0]
        assert b["pixel_values"].shape == (3, 3, RES, RES) and len(b["caption"]) == 3
        assert b["original_size"].shape == (3, 2) and b["crop_top_left"].shape == (3, 2)
        assert sum(x["num_skipped"] for x in batches) == 1
        return torch.cat([x["index"] for x in batches]).tolist()

    assert indices(0) == indices(0) and sorted(indices(0)) == list(range(6))


def test_samples_independent_of_worker_count(root):
    # randomness is keyed by (seed, epoch, index), not by per-worker RNG state
    cfg = dcfg(root / "folder_jsonl", center_crop=False, random_flip=True, caption_dropout=0.3)
    ds = CaptionImageDataset(load(root, "folder_jsonl"), cfg, seed=3)
    ds.set_epoch(2)

    def run(workers):
        sampler = torch.utils.data.RandomSampler(ds, generator=torch.Generator().manual_seed(0))
        loader = torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler, collate_fn=collate, num_workers=workers)
        return list(loader)

    for a, b in zip(run(0), run(2)):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]


# --------------------------------------------------------------------------- bad text, missing captions, all-bad images


def _jsonl_folder(folder: Path, rows: list[bytes]) -> Path:
    _write_images(folder)
    (folder / "metadata.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    return folder


def test_json_array_table_passes_the_line_check(root, tmp_path):
    """A .json file holding one JSON array (not JSON lines) is valid: the check must not call it broken."""
    rows = [{"image": f"{root}/imgs/{n}", "text": c} for (n, *_), c in zip(IMAGES, CAPTIONS)]
    (tmp_path / "table.json").write_text(json.dumps(rows, indent=2))
    hf = load_caption_dataset(dcfg(tmp_path / "table.json"), cache_dir=str(tmp_path / "hf_cache"))
    assert hf["text"] == CAPTIONS == datasets.load_dataset("json", data_files=str(tmp_path / "table.json"),
                                                           split="train", cache_dir=str(tmp_path / "c2"))["text"]


@pytest.mark.parametrize("line, fragment", [(b"[1, 2]", "a list, not an object"),
                                            (b'{"file_name": "a.png", "text": "x"', "Expecting ',' delimiter"),
                                            (b'{"file_name": "a.png", "text": "\xff"}', "not UTF-8")])
def test_bad_metadata_line_names_file_and_line(line, fragment, tmp_path):
    names = [n for n, *_ in IMAGES]
    good = [json.dumps({"file_name": n, "text": c}).encode() for n, c in zip(names, CAPTIONS)]
    folder = _jsonl_folder(tmp_path / "f", good[:3] + [line] + good[3:])
    with pytest.raises(ValueError, match="metadata.jsonl") as err:
        load_caption_dataset(dcfg(folder))
    assert "line 4" in str(err.value) and fragment in str(err.value)


def test_missing_caption_rows_nulls_and_empty_lists():
    from latentsd.data.validate import missing_caption_rows

    lists = datasets.Dataset.from_dict({"text": [["a"], [], None, ["b", "c"], []]})
    plain = datasets.Dataset.from_dict({"text": ["a", None, "", None]})
    assert missing_caption_rows(lists, "text") == [1, 2, 4]
    assert missing_caption_rows(plain, "text") == [1, 3]  # "" is a caption: the empty one, on purpose
    assert missing_caption_rows(plain.select([3, 0, 1]), "text") == [0, 2]  # indices of the view, not the table


def _no_caption_folder(tmp_path: Path) -> Path:
    names = [n for n, *_ in IMAGES]
    rows = [json.dumps({"file_name": n, **({"text": c} if i != 2 else {})}).encode()
            for i, (n, c) in enumerate(zip(names, CAPTIONS))]
    return _jsonl_folder(tmp_path / "nocap", rows)


def test_streaming_missing_caption_counted_or_refused(tmp_path):
    folder = _no_caption_folder(tmp_path)
    samples = list(build_train_dataset(dcfg(folder, streaming=True, shuffle=False)))
    assert [s["caption"] for s in samples] == [c if i != 2 else "" for i, c in enumerate(CAPTIONS)]
    strict = build_train_dataset(dcfg(folder, streaming=True, shuffle=False, missing_caption="error"))
    with pytest.raises(ValueError, match=r"have no caption: row 2 \(.*gray.png\)"):
        list(strict)


def test_all_unreadable_images_is_an_error_naming_them(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(b"")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "x"}) + "\n"
                                                   for i in range(3)))
    for streaming in (False, True):
        ds = build_train_dataset(dcfg(folder, streaming=streaming, shuffle=False))
        with pytest.raises(ValueError, match=r"none of the 3 images could be read \(the first: .*0\.png, .*1\.png"):
            ds[0] if not streaming else list(ds)


@pytest.mark.parametrize("name, make, rgb", [
    ("one_pixel.png", lambda: Image.new("RGB", (1, 1), (255, 0, 0)), (255, 0, 0)),
    ("cmyk.jpg", lambda: Image.new("CMYK", (20, 10), (0, 255, 255, 0)), (255, 0, 0)),
    ("sixteen_bit.png", lambda: Image.new("I;16", (9, 9), 65535), (255, 255, 255)),
    ("huge.png", lambda: Image.new("L", (12000, 12000), 128), (128, 128, 128)),  # over PIL's bomb warning limit
])
def test_odd_images_are_read_and_converted(name, make, rgb, tmp_path):
    from latentsd.data.datasets import open_image

    make().save(tmp_path / name)
    pixels, info = ImageTransform(resolution=RES)(open_image(str(tmp_path / name)), torch.Generator().manual_seed(0))
    assert pixels.shape == (3, RES, RES)
    expected = torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 127.5 - 1
    torch.testing.assert_close(pixels, expected.expand(3, RES, RES), atol=2 / 255, rtol=0)
