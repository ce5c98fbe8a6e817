"""Procedural "shapes" text-to-image dataset and the scorer that grades it.

Every image holds one colored shape on a white background and is captioned
``"a {color} {shape} {where}"``, e.g. ``"a red circle on the left"``.  The
grammar is small enough that a tiny latent-diffusion model can learn it on a
CPU, and regular enough that :func:`classify` can read color, shape and
position back out of any image, ground truth or generated.  That makes prompt
following measurable, including on combinations held out of training
(``make_shapes_dataset(..., exclude=...)``).

Adding a concept: put an RGB triple in ``COLORS`` (or ``EXTRA_COLORS``) or a
drawing function in ``SHAPE_DRAWERS`` (or ``EXTRA_SHAPES``).  A drawing
function fills a given box; the scorer matches shapes against templates drawn
by the same functions, so it recognises a new shape with no further code.

Grid format (written by :func:`write_grid`, read by :func:`split_grid`): a
grid ``X.png`` of equally sized cells, row-major, with a sidecar ``X.json``::

    {"prompts": [...], "rows": r, "cols": c, "cell": [h, w]}

where ``prompts[k]`` belongs to cell ``(k // cols, k % cols)``; cells past
``len(prompts)`` are padding.
"""

from __future__ import annotations

import functools
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..images import grid_paths, load_grid, save_images

# --------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 30),
}
# Colors that parse and score but are not in the default training grid.
EXTRA_COLORS: dict[str, tuple[int, int, int]] = {}

# Shape centre as (x, y) fractions of the image side; y grows downward.
POSITIONS: dict[str, tuple[float, float]] = {
    "on the left": (0.25, 0.5),
    "on the right": (0.75, 0.5),
    "at the top": (0.5, 0.25),
    "at the bottom": (0.5, 0.75),
    "in the center": (0.5, 0.5),
}

# Combinations the shipped base model never sees in training (each color, shape and position still
# appears in other combinations), so its scores on them measure compositional generalisation.
HELD_OUT = (
    "a red square at the top", "a green triangle on the left", "a blue circle at the bottom",
    "a yellow triangle in the center", "a purple square on the right", "a orange circle on the left",
    "a red circle in the center", "a green square at the bottom", "a blue triangle on the right",
    "a yellow circle at the top",
)
BACKGROUND = (255, 255, 255)
EXTENT_RANGE = (0.25, 0.35)  # shape bounding-box side, fraction of the image
CANONICAL_EXTENT = 0.30      # used by render(..., rng=None)
JITTER = 0.03                # max centre offset per axis, fraction of the image
SUPERSAMPLE = 4              # draw at 4x, box-filter down: exact-area anti-aliasing

Box = tuple[float, float, float, float]
Drawer = Callable[[ImageDraw.ImageDraw, Box, int], None]


def draw_circle(draw: ImageDraw.ImageDraw, box: Box, fill: int) -> None:
    """Fill the ellipse inscribed in ``box`` (a circle for a square box)."""
    draw.ellipse(box, fill=fill)


def draw_square(draw: ImageDraw.ImageDraw, box: Box, fill: int) -> None:
    """Fill ``box``."""
    draw.rectangle(box, fill=fill)


def draw_triangle(draw: ImageDraw.ImageDraw, box: Box, fill: int) -> None:
    """Fill an apex-up isosceles triangle spanning ``box``."""
    x0, y0, x1, y1 = box
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def draw_star(draw: ImageDraw.ImageDraw, box: Box, fill: int,
              points: int = 5, inner: float = 0.45) -> None:
    """Fill a ``points``-point star (one point up) stretched to span ``box``."""
    x0, y0, x1, y1 = box
    pts = _unit_star(points, inner)
    draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in pts], fill=fill)


@functools.lru_cache(maxsize=None)
def _unit_star(points: int, inner: float) -> tuple[tuple[float, float], ...]:
    """Star vertices scaled so their bounding box is the unit square."""
    ang = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    ux, uy = rad * np.cos(ang), rad * np.sin(ang)
    ux, uy = (ux - ux.min()) / np.ptp(ux), (uy - uy.min()) / np.ptp(uy)
    return tuple(zip(ux.tolist(), uy.tolist()))


SHAPE_DRAWERS: dict[str, Drawer] = {
    "circle": draw_circle,
    "square": draw_square,
    "triangle": draw_triangle,
}
SHAPES: tuple[str, ...] = tuple(SHAPE_DRAWERS)
# Shapes that render, parse and score but are not in the default grid, so a
# demo can teach them as a new concept.
EXTRA_SHAPES: dict[str, Drawer] = {"star": draw_star}


def _palette() -> dict[str, tuple[int, int, int]]:
    return {**COLORS, **EXTRA_COLORS}


def _drawers() -> dict[str, Drawer]:
    return {**SHAPE_DRAWERS, **EXTRA_SHAPES}


# --------------------------------------------------------------------------
# Specs and captions
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeSpec:
    """One (color, shape, where) combination; fields are None when unknown."""

    color: str | None
    shape: str | None
    where: str | None

    @property
    def caption(self) -> str:
        """The caption ``"a {color} {shape} {where}"`` ("unknown" for None)."""
        parts = [p if p is not None else "unknown" for p in (self.color, self.shape, self.where)]
        return "a {} {} {}".format(*parts)

    @property
    def found(self) -> bool:
        """True when all three attributes are known."""
        return None not in (self.color, self.shape, self.where)


def all_specs(colors: Iterable[str] | None = None, shapes: Iterable[str] | None = None,
              positions: Iterable[str] | None = None) -> list[ShapeSpec]:
    """Every combination of the given names (default: the 6×3×5 = 90 grid)."""
    colors = list(COLORS if colors is None else colors)
    shapes = list(SHAPES if shapes is None else shapes)
    positions = list(POSITIONS if positions is None else positions)
    return [ShapeSpec(c, s, w) for c in colors for s in shapes for w in positions]


def parse_caption(caption: str) -> ShapeSpec | None:
    """Parse ``"a {color} {shape} {where}"``; None if not in the grammar.

    Case and extra whitespace are ignored, and "an" is accepted for "a".
    Extra colors and shapes (``EXTRA_COLORS``, ``EXTRA_SHAPES``) parse too.
    """
    words = caption.lower().split()
    if len(words) < 4 or words[0] not in ("a", "an"):
        return None
    color, shape, where = words[1], words[2], " ".join(words[3:])
    if color in _palette() and shape in _drawers() and where in POSITIONS:
        return ShapeSpec(color, shape, where)
    return None


def _as_spec(spec: ShapeSpec | str) -> ShapeSpec:
    """Accept a ShapeSpec or a caption string; raise on anything else."""
    if isinstance(spec, ShapeSpec):
        return spec
    parsed = parse_caption(spec) if isinstance(spec, str) else None
    if parsed is None:
        raise ValueError(f"not a shapes caption (expected 'a {{color}} {{shape}} {{where}}'): {spec!r}")
    return parsed


# --------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------


def _coverage(shape: str, box: Box, hw: tuple[int, int], origin: tuple[int, int] = (0, 0),
              ss: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel of an (h, w) window covered by ``shape`` in ``box``.

    ``box`` is in image pixel units (continuous, right/bottom exclusive);
    ``origin`` is the window's top-left pixel (x, y) in the image.
    """
    try:
        drawer = _drawers()[shape]
    except KeyError:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(_drawers())}") from None
    h, w = hw
    ox, oy = origin
    canvas = Image.new("L", (w * ss, h * ss), 0)
    x0, y0, x1, y1 = box
    # PIL fills inclusive of the far edge, hence the -1 (one supersample pixel).
    sbox = ((x0 - ox) * ss, (y0 - oy) * ss, (x1 - ox) * ss - 1, (y1 - oy) * ss - 1)
    drawer(ImageDraw.Draw(canvas), sbox, 255)
    small = canvas.resize((w, h), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _layout(where: str, size: int, rng: np.random.Generator | None) -> Box:
    """Bounding box of the shape for position ``where`` (jittered when rng given)."""
    if where not in POSITIONS:
        raise ValueError(f"unknown position {where!r}; known: {list(POSITIONS)}")
    fx, fy = POSITIONS[where]
    if rng is None:
        ext, dx, dy = CANONICAL_EXTENT, 0.0, 0.0
    else:
        ext = rng.uniform(*EXTENT_RANGE)
        dx, dy = rng.uniform(-JITTER, JITTER, size=2)
    cx, cy, half = (fx + dx) * size, (fy + dy) * size, ext * size / 2
    return (cx - half, cy - half, cx + half, cy + half)


def render(spec: ShapeSpec | str, size: int = 64,
           rng: np.random.Generator | int | None = None) -> Image.Image:
    """Draw ``spec`` (or a caption) as an anti-aliased ``size``×``size`` RGB image.

    ``rng`` (a numpy Generator or an int seed) randomises the extent within
    ``EXTENT_RANGE`` and jitters the centre by up to ``JITTER``; None gives
    the canonical, un-jittered drawing.
    """
    spec = _as_spec(spec)
    if rng is not None and not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    palette = _palette()
    if spec.color not in palette:
        raise ValueError(f"unknown color {spec.color!r}; known: {list(palette)}")
    box = _layout(spec.where, size, rng)
    cov = _coverage(spec.shape, box, (size, size))[..., None]
    # Linear blend == drawing in color at 4x then box-filtering down.
    img = np.asarray(BACKGROUND, np.float32) * (1 - cov) + np.asarray(palette[spec.color], np.float32) * cov
    return Image.fromarray(np.rint(img).astype(np.uint8), "RGB")


# --------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------


def _spec_pool(specs: Iterable[ShapeSpec | str] | None,
               exclude: Iterable[ShapeSpec | str] | None) -> list[ShapeSpec]:
    """Deduplicated specs to sample from, minus the held-out ones."""
    pool = [_as_spec(s) for s in (all_specs() if specs is None else specs)]
    banned = {_as_spec(s).caption for s in (exclude or ())}
    pool = [s for s in dict.fromkeys(pool) if s.caption not in banned]
    if not pool:
        raise ValueError("no shape specs left to sample from after `exclude`")
    return pool


def sample(i: int, seed: int = 0, size: int = 64, specs: Sequence[ShapeSpec | str] | None = None,
           balanced: bool = True) -> tuple[Image.Image, ShapeSpec]:
    """The i-th (image, spec) of the stream for ``seed``; depends only on (seed, i, specs).

    ``balanced`` cycles through ``specs`` (equal counts per combination);
    otherwise each sample draws its spec at random.
    """
    specs = [_as_spec(s) for s in (all_specs() if specs is None else specs)]
    rng = np.random.default_rng([seed, i])
    spec = specs[i % len(specs)] if balanced else specs[int(rng.integers(len(specs)))]
    return render(spec, size=size, rng=rng), spec


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)  # fast; these PNGs are tiny anyway
    return buf.getvalue()


def _features():
    from datasets import Features, Image as ImageFeature, Value

    return Features({"image": ImageFeature(), "text": Value("string"), "color": Value("string"),
                     "shape": Value("string"), "where": Value("string")})


def make_shapes_dataset(n: int, seed: int = 0, size: int = 64,
                        specs: Iterable[ShapeSpec | str] | None = None,
                        exclude: Iterable[ShapeSpec | str] | None = None,
                        balanced: bool = True):
    """A ``datasets.Dataset`` of ``n`` shape images with captions.

    Columns: ``image`` (Image feature, PNG), ``text`` (caption), ``color``,
    ``shape``, ``where``.  ``specs`` restricts the combinations (default: all
    90); ``exclude`` holds combinations out (ShapeSpecs or caption strings).
    Sample i depends only on (seed, i) and the resulting spec list.
    """
    from datasets import Dataset

    pool = _spec_pool(specs, exclude)
    cols: dict[str, list] = {"image": [], "text": [], "color": [], "shape": [], "where": []}
    for i in range(n):
        img, spec = sample(i, seed, size, pool, balanced)
        cols["image"].append({"bytes": _png_bytes(img), "path": None})
        cols["text"].append(spec.caption)
        cols["color"].append(spec.color)
        cols["shape"].append(spec.shape)
        cols["where"].append(spec.where)
    return Dataset.from_dict(cols, features=_features())


def _iter_pairs(data) -> Iterable[tuple[bytes | Image.Image, str]]:
    """(image, text) pairs from a Dataset or an iterable of pairs."""
    from datasets import Dataset, Image as ImageFeature

    if isinstance(data, Dataset):
        raw = data.cast_column("image", ImageFeature(decode=False))  # keep PNG bytes as-is
        for row in raw:
            img = row["image"]
            yield (img["bytes"] if img.get("bytes") else Image.open(img["path"])), row["text"]
    else:
        yield from data


def write_imagefolder(data, out_dir: str | Path, **dataset_kwargs) -> Path:
    """Write images as PNGs plus ``metadata.jsonl`` (imagefolder layout).

    ``data`` is a Dataset with ``image``/``text`` columns, an iterable of
    (PIL image, caption) pairs, or an int ``n`` (then ``dataset_kwargs`` go
    to :func:`make_shapes_dataset`).  Each metadata line is
    ``{"file_name": "000000.png", "text": caption}``, which
    ``datasets.load_dataset("imagefolder", data_dir=out_dir)`` loads as
    ``image`` + ``text`` columns.  Returns ``out_dir``.
    """
    if isinstance(data, int):
        data = make_shapes_dataset(data, **dataset_kwargs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i, (img, text) in enumerate(_iter_pairs(data)):
            name = f"{i:06d}.png"
            if isinstance(img, bytes) and img.startswith(b"\x89PNG"):
                (out / name).write_bytes(img)
            else:
                img = Image.open(io.BytesIO(img)) if isinstance(img, bytes) else img
                img.convert("RGB").save(out / name)
            meta.write(json.dumps({"file_name": name, "text": text}) + "\n")
    return out


# --------------------------------------------------------------------------
# Scorer: mask helpers (pure numpy; scipy is not a dependency)
# --------------------------------------------------------------------------

MIN_CONTRAST = 60.0    # RGB distance from background that counts as "ink"
MIN_AREA_FRAC = 0.002  # smaller blobs are speckles, not shapes
BLUR_LEVELS = (0.0, 0.8, 1.6)  # template blurs tried, in pixels (generated images are soft)


def _dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Binary dilation with a (2r+1)² square."""
    out = mask.copy()
    for _ in range(r):
        v = out.copy()
        v[1:] |= out[:-1]
        v[:-1] |= out[1:]
        out = v.copy()
        out[:, 1:] |= v[:, :-1]
        out[:, :-1] |= v[:, 1:]
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of ``mask`` (min-label propagation)."""
    if not mask.any():
        return mask
    rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if mask.shape != (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1):
        # Label only the bounding window of the mask: same result, less work.
        out = np.zeros_like(mask)
        win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        out[win] = _largest_component(mask[win])
        return out
    h, w = mask.shape
    n = h * w
    lab = np.where(mask, np.arange(n).reshape(h, w), n)  # n marks background
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new[~mask] = n
        # Pointer jumping: a label is a pixel index in the same component, so
        # adopting that pixel's label is safe and converges in far fewer passes.
        flat = new.reshape(-1)
        fg = flat < n
        flat[fg] = flat[flat[fg]]
        if np.array_equal(new, lab):
            break
        lab = new
    counts = np.bincount(lab[mask])
    return lab == counts.argmax()


def _to_rgb_array(image) -> np.ndarray:
    """HxWx3 float32 in 0..255 from a PIL image or an array (uint8 or 0..1 float)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {arr.shape}")
    arr = np.repeat(arr, 3, axis=-1) if arr.shape[-1] == 1 else arr[..., :3]
    arr = arr.astype(np.float32)
    if np.issubdtype(np.asarray(image).dtype, np.floating) and arr.max(initial=0) <= 1.0:
        arr = arr * 255.0
    return arr


def _nearest_color(rgb: np.ndarray, bg: np.ndarray, colors: Iterable[str]) -> str:
    """Palette color whose background→color segment passes closest to ``rgb``.

    A segment rather than a point, because blur and small size mix the shape
    color with the background (a pale red is still red, not orange).
    """
    palette = _palette()
    best, best_d = None, math.inf
    v = rgb - bg
    for name in colors:
        d = np.asarray(palette[name], np.float32) - bg
        t = float(np.clip(v @ d / max(float(d @ d), 1e-6), 0.25, 1.5))
        dist = float(np.linalg.norm(v - t * d))
        if dist < best_d:
            best, best_d = name, dist
    return best


def _nearest_position(cx: float, cy: float) -> str:
    return min(POSITIONS, key=lambda k: (POSITIONS[k][0] - cx) ** 2 + (POSITIONS[k][1] - cy) ** 2)


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """n×n Gaussian blur operator with zero padding outside the window."""
    r = max(1, int(math.ceil(3 * sigma)))
    d = np.arange(n)[:, None] - np.arange(n)[None, :]
    k = np.where(np.abs(d) <= r, np.exp(-0.5 * (d / sigma) ** 2), 0.0)
    return (k / np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).sum()).astype(np.float32)


def _gauss_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a small 2-D window (two small matmuls)."""
    if sigma <= 0:
        return a
    return _blur_matrix(a.shape[0], sigma) @ a @ _blur_matrix(a.shape[1], sigma).T


def _moments(cov: np.ndarray) -> tuple[float, float, float, float, float]:
    """(area, mean x, mean y, var x, var y) of a coverage map, pixel centres at +0.5."""
    ys, xs = np.indices(cov.shape, dtype=np.float64)
    area = float(cov.sum())
    mx = float((cov * (xs + 0.5)).sum()) / area
    my = float((cov * (ys + 0.5)).sum()) / area
    vx = float((cov * (xs + 0.5 - mx) ** 2).sum()) / area
    vy = float((cov * (ys + 0.5 - my) ** 2).sum()) / area
    return area, mx, my, vx, vy


@functools.lru_cache(maxsize=None)
def _shape_constants(name: str, drawer: Drawer) -> tuple[float, float, float, float]:
    """(var_x/w², var_y/h², centroid offset x/w, y/h) of ``name`` drawn in a w×h box."""
    n, pad = 256, 4
    _, mx, my, vx, vy = _moments(_coverage(name, (pad, pad, pad + n, pad + n), (n + 2 * pad,) * 2, ss=1))
    centre = pad + n / 2
    return vx / n**2, vy / n**2, (mx - centre) / n, (my - centre) / n


def _fit_box(mom: tuple, name: str, blur: float) -> Box:
    """Box in which ``name`` would have the observed centroid and spread.

    Moments use every pixel, so the fit tolerates lumpy edges; the variance
    added by pixel sampling (1/12) and by ``blur`` (blur²) is taken out first.
    """
    _, mx, my, vx, vy = mom
    kx, ky, ox, oy = _shape_constants(name, _drawers()[name])
    w = math.sqrt(max(vx - 1 / 12 - blur**2, 0.25) / kx)
    h = math.sqrt(max(vy - 1 / 12 - blur**2, 0.25) / ky)
    cx, cy = mx - ox * w, my - oy * h
    return (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def _match_shape(cov: np.ndarray, region: np.ndarray,
                 shapes: Iterable[str]) -> tuple[str, Box, dict[str, float]]:
    """Shape whose template best overlaps ``cov`` (soft IoU), with its fitted box.

    Each candidate is fitted by moments and compared at a few blur levels, so a
    soft (generated) image is compared with an equally soft template.
    """
    ys, xs = np.nonzero(region)
    h, w = cov.shape
    x0, y0 = max(0, int(xs.min()) - 2), max(0, int(ys.min()) - 2)
    x1, y1 = min(w, int(xs.max()) + 3), min(h, int(ys.max()) + 3)
    win, reg = cov[y0:y1, x0:x1], region[y0:y1, x0:x1]
    mom = _moments(win)
    ious, boxes = {}, {}
    for name in shapes:
        for blur in BLUR_LEVELS:
            bx = _fit_box(mom, name, blur)
            t = _gauss_blur(_coverage(name, bx, win.shape), blur) * reg
            iou = float(np.minimum(win, t).sum() / max(float(np.maximum(win, t).sum()), 1e-6))
            if iou > ious.get(name, -1.0):
                ious[name] = iou
                boxes[name] = (bx[0] + x0, bx[1] + y0, bx[2] + x0, bx[3] + y0)
    best = max(ious, key=ious.get)
    return best, boxes[best], ious


def analyze(image, shapes: Iterable[str] | None = None,
            colors: Iterable[str] | None = None) -> tuple[ShapeSpec, dict]:
    """:func:`classify` plus diagnostics (box, mean color, per-shape IoU)."""
    shapes = list(shapes) if shapes is not None else [*SHAPES, *EXTRA_SHAPES]
    colors = list(colors) if colors is not None else list(_palette())
    unknown = [s for s in shapes if s not in _drawers()] + [c for c in colors if c not in _palette()]
    if unknown:
        raise ValueError(f"unknown shape/color name(s) {unknown}")
    a = _to_rgb_array(image)
    h, w, _ = a.shape
    # Background from the border (shapes never touch it), so off-white works.
    bg = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    dist = np.linalg.norm(a - bg, axis=-1)
    min_area = max(4, MIN_AREA_FRAC * h * w)
    blob = _largest_component(dist > MIN_CONTRAST)
    if blob.sum() < min_area:
        return ShapeSpec(None, None, None), {"reason": "no shape found"}
    # Coverage relative to this shape's own contrast and the background noise
    # floor, so the 0.5 level sits on the true edge for pale and dark colors.
    peak = float(np.percentile(dist[blob], 90))
    outside = ~_dilate(blob, 2)
    floor = float(np.median(dist[outside])) if outside.any() else 0.0
    cov = np.clip((dist - floor) / max(peak - floor, 1e-6), 0.0, 1.0)
    core = _largest_component(cov >= 0.5)
    if core.sum() < min_area:
        return ShapeSpec(None, None, None), {"reason": "no shape found"}
    region = _dilate(core, 2)  # keep blurred edges, drop speckles and far-off noise
    cov = np.where(region, cov, 0.0)
    shape, box, ious = _match_shape(cov, region, shapes)
    where = _nearest_position((box[0] + box[2]) / 2 / w, (box[1] + box[3]) / 2 / h)
    solid = core & (cov >= 0.8)
    rgb = np.median(a[solid if solid.sum() >= 3 else core], axis=0)
    color = _nearest_color(rgb, bg, colors)
    info = {"box": box, "rgb": rgb.tolist(), "background": bg.tolist(), "iou": ious,
            "area": float(cov.sum())}
    return ShapeSpec(color, shape, where), info


def classify(image, shapes: Iterable[str] | None = None,
             colors: Iterable[str] | None = None) -> ShapeSpec:
    """Read (color, shape, where) from a PIL image or HxWx3 array.

    ``shapes``/``colors`` restrict the candidates (default: every registered
    one, extras included).  Fields are None when no shape is found.
    """
    return analyze(image, shapes, colors)[0]


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------


def score(images: Iterable, prompts: Iterable[str], shapes: Iterable[str] | None = None,
          colors: Iterable[str] | None = None) -> dict:
    """Fraction of images whose color / shape / position / all match the prompt.

    Returns ``{"n", "color", "shape", "position", "all", "records"}``; each
    record holds the prompt, the prediction and per-attribute booleans.
    Candidate shapes/colors default to the default grid plus whatever the
    prompts ask for (so a star is recognised when a prompt asks for one, but
    a lumpy triangle is not called a star when none was asked).
    """
    images, prompts = list(images), list(prompts)
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not images:
        raise ValueError("nothing to score: no images")
    targets = [parse_caption(p) for p in prompts]
    bad = [p for p, t in zip(prompts, targets) if t is None]
    if bad:
        raise ValueError(f"{len(bad)} prompt(s) not in the shapes grammar "
                         f"'a {{color}} {{shape}} {{where}}', e.g. {bad[0]!r}")
    if shapes is None:
        shapes = dict.fromkeys([*SHAPES, *(t.shape for t in targets)])
    if colors is None:
        colors = dict.fromkeys([*COLORS, *(t.color for t in targets)])
    shapes, colors = list(shapes), list(colors)
    records = []
    for img, prompt, tgt in zip(images, prompts, targets):
        pred = classify(img, shapes, colors)
        ok = {"color": pred.color == tgt.color, "shape": pred.shape == tgt.shape,
              "position": pred.where == tgt.where}
        ok["all"] = all(ok.values())
        records.append({"prompt": prompt, "pred_color": pred.color, "pred_shape": pred.shape,
                        "pred_where": pred.where, **ok})
    n = len(records)
    result = {k: sum(r[k] for r in records) / n for k in ("color", "shape", "position", "all")}
    return {"n": n, **result, "records": records}


# --------------------------------------------------------------------------
# Grids and folders
# --------------------------------------------------------------------------

_EXPECTED = ("expected either an imagefolder with metadata.jsonl (one JSON object per line "
             "with \"file_name\" and \"text\") or a grid X.png with a sidecar X.json "
             "{\"prompts\": [...], \"rows\": r, \"cols\": c, \"cell\": [h, w]}")


def write_grid(images: Sequence, prompts: Sequence[str], path: str | Path,
               cols: int | None = None) -> Path:
    """Tile equally sized images (PIL or arrays) row-major into ``path`` plus its ``.json`` sidecar."""
    imgs = [Image.fromarray(_to_rgb_array(im).round().astype(np.uint8)) for im in images]
    return save_images(imgs, list(prompts), grid_paths(path)[0], cols=cols)


split_grid = load_grid


def _read_imagefolder(meta_path: Path) -> tuple[list[Image.Image], list[str]]:
    images, prompts = [], []
    for line in meta_path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        text = row.get("text", row.get("caption", row.get("prompt")))
        if "file_name" not in row or text is None:
            raise ValueError(f"{meta_path}: line without file_name/text: {line[:80]!r}; {_EXPECTED}")
        images.append(Image.open(meta_path.parent / row["file_name"]).convert("RGB"))
        prompts.append(text)
    return images, prompts


def load_scoring_inputs(path: str | Path) -> tuple[list[Image.Image], list[str]]:
    """(images, prompts) from an imagefolder, a folder of grids, or one grid file."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist; {_EXPECTED}")
    if p.is_file():
        return load_grid(p)
    metas = sorted(p.rglob("metadata.jsonl"))
    grids = [g for g in sorted(p.glob("*.png")) if g.with_suffix(".json").is_file()]
    if not metas and not grids:
        raise ValueError(f"{p} has no metadata.jsonl and no grid PNG with a .json sidecar; {_EXPECTED}")
    images, prompts = [], []
    for src in metas or grids:
        ims, ps = _read_imagefolder(src) if src.name == "metadata.jsonl" else load_grid(src)
        images += ims
        prompts += ps
    return images, prompts


def score_folder(path: str | Path, **kwargs) -> dict:
    """Score an imagefolder (metadata.jsonl) or a folder of grid PNGs with sidecars."""
    if not Path(path).is_dir():
        raise ValueError(f"{path} is not a folder; {_EXPECTED}")
    return score(*load_scoring_inputs(path), **kwargs)


def score_grid(path: str | Path, **kwargs) -> dict:
    """Score one grid PNG (or its sidecar JSON path)."""
    return score(*load_grid(path), **kwargs)


def score_path(path: str | Path, **kwargs) -> dict:
    """Score a folder (:func:`score_folder`) or a grid file (:func:`score_grid`)."""
    return score(*load_scoring_inputs(path), **kwargs)
