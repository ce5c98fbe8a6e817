"""Tests for the procedural shapes dataset and its scorer (latentsd.data.shapes)."""

import json
import time

import numpy as np
import pytest
from PIL import Image, ImageFilter

from latentsd.data import shapes as S

STAR_SPECS = S.all_specs(shapes=["star"])
ALL_SPECS = S.all_specs() + STAR_SPECS  # the 90-combination grid plus stars


def _render_set(specs, seeds, size=64):
    """Jittered ground-truth renders of every spec for every seed, with captions."""
    imgs, prompts = [], []
    for seed in seeds:
        for i, spec in enumerate(specs):
            imgs.append(S.render(spec, size=size, rng=np.random.default_rng([seed, i])))
            prompts.append(spec.caption)
    return imgs, prompts


@pytest.fixture(scope="module")
def gt64():
    return _render_set(ALL_SPECS, seeds=range(3))


def _assert_scores(result, at_least):
    for key in ("color", "shape", "position", "all"):
        assert result[key] >= at_least, (key, result[key], [r for r in result["records"] if not r["all"]][:5])


# ---------------------------------------------------------------- vocabulary


def test_vocabulary():
    specs = S.all_specs()
    assert len(specs) == 6 * 3 * 5 == len({s.caption for s in specs})
    assert "star" not in S.SHAPES and "star" in S.EXTRA_SHAPES
    assert S.POSITIONS["at the top"] == (0.5, 0.25)  # y grows downward
    assert S.ShapeSpec("red", "circle", "on the left").caption == "a red circle on the left"


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.caption)
def test_parse_caption_round_trip(spec):
    assert S.parse_caption(spec.caption) == spec


def test_parse_caption_is_lenient_about_case_space_and_article():
    assert S.parse_caption("  An ORANGE  square at   the top ") == S.ShapeSpec("orange", "square", "at the top")


@pytest.mark.parametrize("caption", [
    "", "a red circle", "a pink circle on the left", "a red hexagon on the left",
    "the red circle on the left", "a red circle somewhere", "red circle on the left",
    "a red circle on the left side",
])
def test_parse_caption_rejects_other_text(caption):
    assert S.parse_caption(caption) is None


# ---------------------------------------------------------------- rendering


def test_render_basics():
    img = S.render("a blue square in the center", size=64)
    a = np.asarray(img)
    assert img.mode == "RGB" and img.size == (64, 64)
    assert (a[0, 0] == 255).all() and (a[-1, -1] == 255).all()
    assert tuple(a[32, 32]) == S.COLORS["blue"]
    # Anti-aliased: some edge pixels are blends, neither background nor color.
    edge = ~((a == 255).all(-1) | (a == S.COLORS["blue"]).all(-1))
    assert edge.any()


@pytest.mark.parametrize("where,axis,side", [
    ("on the left", 1, "low"), ("on the right", 1, "high"),
    ("at the top", 0, "low"), ("at the bottom", 0, "high"),
])
def test_shapes_stay_in_their_half(where, axis, side):
    # Jitter and size variation must never push a shape across the middle.
    for i, shape in enumerate([*S.SHAPES, "star"]):
        for seed in range(8):
            a = np.asarray(S.render(S.ShapeSpec("red", shape, where), 64, rng=np.random.default_rng([seed, i])))
            ink = np.nonzero((a < 250).any(-1).any(axis=1 - axis))[0]
            assert (ink < 32).all() if side == "low" else (ink >= 32).all()


def test_render_accepts_int_seed_and_rejects_unknown_names():
    assert np.array_equal(np.asarray(S.render("a red star on the left", rng=5)),
                          np.asarray(S.render("a red star on the left", rng=5)))
    with pytest.raises(ValueError):
        S.render("a red blob on the left")
    with pytest.raises(ValueError):
        S.render(S.ShapeSpec("red", "circle", "upstairs"))


# ---------------------------------------------------------------- dataset


def _pixels(ds):
    return [np.asarray(im) for im in ds["image"]]


def test_dataset_is_deterministic_per_seed_and_index():
    a, b = S.make_shapes_dataset(6, seed=3), S.make_shapes_dataset(6, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(b)))
    other = S.make_shapes_dataset(6, seed=4)
    assert not all(np.array_equal(x, y) for x, y in zip(_pixels(a), _pixels(other)))
    # Sample i depends only on (seed, i): a shorter run is a prefix.
    prefix = S.make_shapes_dataset(3, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(prefix), _pixels(a)[:3]))


def test_dataset_columns_and_features():
    from datasets import Image as ImageFeature

    ds = S.make_shapes_dataset(5, seed=0, size=32)
    assert set(ds.column_names) == {"image", "text", "color", "shape", "where"}
    assert isinstance(ds.features["image"], ImageFeature)
    row = ds[0]
    assert row["image"].size == (32, 32)
    assert row["text"] == S.ShapeSpec(row["color"], row["shape"], row["where"]).caption


def test_exclude_holds_combinations_out():
    held = [S.ShapeSpec("red", "circle", "on the left"), "a blue triangle in the center"]
    ds = S.make_shapes_dataset(88 * 2, seed=1, size=16, exclude=held)
    counts = {t: ds["text"].count(t) for t in set(ds["text"])}
    assert "a red circle on the left" not in counts and "a blue triangle in the center" not in counts
    assert len(counts) == 88 and set(counts.values()) == {2}  # balanced over the rest


@pytest.mark.parametrize("kwargs", [{"exclude": S.all_specs()}, {"exclude": ["a red blob"]}])
def test_bad_exclude_raises(kwargs):
    with pytest.raises(ValueError):
        S.make_shapes_dataset(2, **kwargs)


def test_specs_restricts_and_can_teach_a_star():
    ds = S.make_shapes_dataset(10, specs=STAR_SPECS[:5], size=16)
    assert set(ds["shape"]) == {"star"}


def test_imagefolder_round_trip(tmp_path):
    from datasets import load_dataset

    ds = S.make_shapes_dataset(6, seed=2, size=32)
    out = S.write_imagefolder(ds, tmp_path / "folder")
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert set(lines[0]) == {"file_name", "text"}
    loaded = load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert sorted(loaded["text"]) == sorted(ds["text"])
    by_text = {t: np.asarray(im) for t, im in zip(loaded["text"], loaded["image"])}
    for t, im in zip(ds["text"], ds["image"]):
        assert np.array_equal(by_text[t], np.asarray(im))


def test_generation_is_fast():
    t = time.perf_counter()
    S.make_shapes_dataset(300, seed=0)
    assert time.perf_counter() - t < 3.0  # ~1.5 ms/image measured; generous for shared CPUs


# ---------------------------------------------------------------- scorer


def test_scorer_on_ground_truth(gt64):
    result = S.score(*gt64)
    assert result["n"] == len(ALL_SPECS) * 3
    _assert_scores(result, 0.99)


@pytest.mark.parametrize("size", [32, 128])
def test_scorer_on_other_sizes(size):
    _assert_scores(S.score(*_render_set(ALL_SPECS, seeds=[7], size=size)), 0.99)


def _noisy(img, rng):
    """Slight blur plus Gaussian noise, sigma 10/255."""
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7)), np.float32) + rng.normal(0, 10, (*img.size[::-1], 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _soft(img, rng):
    """Like a tiny diffusion model's output: blurrier, color cast, off-white background."""
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)), np.float32)
    a = a * 0.96 + rng.normal(0, 8, 3) + rng.normal(0, 6, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("perturb", [_noisy, _soft], ids=["noisy", "soft"])
def test_scorer_is_robust(gt64, perturb):
    rng = np.random.default_rng(0)
    imgs, prompts = gt64
    keep = slice(0, len(ALL_SPECS))  # one seed keeps the test quick
    _assert_scores(S.score([perturb(im, rng) for im in imgs[keep]], prompts[keep]), 0.95)


def _swap(spec, field):
    """The same spec with one attribute replaced by a different valid value."""
    values = {"color": list(S.COLORS), "shape": list(S.SHAPES), "where": list(S.POSITIONS)}[field]
    cur = getattr(spec, field)
    new = values[(values.index(cur) + 1) % len(values)]
    return S.ShapeSpec(**{**spec.__dict__, field: new})


@pytest.mark.parametrize("field,key", [("color", "color"), ("shape", "shape"), ("where", "position")])
def test_wrong_prompt_scores_zero_on_that_attribute(gt64, field, key):
    imgs, prompts = gt64
    keep = slice(0, len(S.all_specs()), 2)  # half the default grid, first seed
    wrong = [_swap(S.parse_caption(p), field).caption for p in prompts[keep]]
    result = S.score(imgs[keep], wrong)
    assert result[key] == 0.0 and result["all"] == 0.0
    assert all(result[k] >= 0.99 for k in {"color", "shape", "position"} - {key})


@pytest.mark.parametrize("noise", [0.0, 10.0])
def test_blank_image_gets_nothing_right(noise):
    a = np.full((64, 64, 3), 255.0) + np.random.default_rng(0).normal(0, noise, (64, 64, 3))
    blank = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    assert S.classify(blank) == S.ShapeSpec(None, None, None)
    result = S.score([blank], ["a red circle on the left"])
    assert (result["color"], result["shape"], result["position"], result["all"]) == (0, 0, 0, 0)


def test_classify_accepts_arrays_and_ignores_speckles():
    img = S.render("a green triangle on the right", rng=1)
    spec = S.parse_caption("a green triangle on the right")
    assert S.classify(np.asarray(img)) == spec
    assert S.classify(np.asarray(img, np.float32) / 255) == spec
    a = np.asarray(img).copy()
    a[5:7, 5:7] = S.COLORS["blue"]  # a stray 2x2 blue speck in the corner
    assert S.classify(a) == spec


def test_star_is_only_a_candidate_when_asked():
    star = S.render("a red star in the center", rng=3)
    assert S.classify(star).shape == "star"
    assert S.classify(star, shapes=S.SHAPES).shape in S.SHAPES
    assert S.score([star], ["a red star in the center"])["shape"] == 1.0


@pytest.mark.parametrize("images,prompts", [([], []), ([None], []), ([None], ["a red circle"])])
def test_score_rejects_bad_input(images, prompts):
    with pytest.raises(ValueError):
        S.score(images, prompts)


# ---------------------------------------------------------------- grids and folders


def test_grid_round_trip_and_score(tmp_path, gt64):
    imgs, prompts = gt64[0][:10], gt64[1][:10]
    png = S.write_grid(imgs, prompts, tmp_path / "grid.png", cols=4)
    meta = json.loads((tmp_path / "grid.json").read_text())
    assert meta == {"prompts": prompts, "rows": 3, "cols": 4, "cell": [64, 64]}
    cells, got = S.split_grid(png)
    assert got == prompts
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(cells, imgs))
    assert S.score_path(png)["all"] == 1.0
    assert S.score_path(tmp_path / "grid.json")["n"] == 10
    assert S.score_path(tmp_path)["n"] == 10  # a folder of grids


def test_score_path_on_imagefolder(tmp_path, gt64):
    pairs = list(zip(*[x[:12] for x in gt64]))
    S.write_imagefolder(pairs, tmp_path / "gen")
    result = S.score_folder(tmp_path / "gen")
    assert result["n"] == 12 and result["all"] == 1.0
    assert S.score_path(tmp_path / "gen")["all"] == 1.0


def test_missing_metadata_or_sidecar_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="metadata.jsonl"):
        S.score_path(tmp_path)
    Image.new("RGB", (8, 8), "white").save(tmp_path / "lonely.png")
    with pytest.raises(ValueError, match=r"lonely\.json"):
        S.score_path(tmp_path / "lonely.png")
    with pytest.raises(FileNotFoundError):
        S.score_path(tmp_path / "nope")
