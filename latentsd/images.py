"""Image grids with a JSON sidecar that records the prompt of every cell (read back by the scorers)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import PIL.Image

from .io import write_file_atomically, write_json_atomically


def make_grid(images: list[PIL.Image.Image], cols: int | None = None) -> PIL.Image.Image:
    """Tile equally sized images row by row; ``cols`` defaults to a near-square layout."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    if any(img.size != (w, h) for img in images):
        raise ValueError("make_grid needs images of one size")
    grid = PIL.Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def save_images(images: list[PIL.Image.Image], prompts: list[str], out: str | Path,
                cols: int | None = None) -> Path:
    """Save one image as is, or several as a grid; either way write ``out`` with a ``.json`` sidecar.

    The sidecar is ``{"prompts": [...], "rows": r, "cols": c, "cell": [h, w]}``; both are written atomically
    (:mod:`latentsd.io`), so a reader never sees half an image.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    out = Path(out)
    cols = cols or math.ceil(math.sqrt(len(images)))
    grid = make_grid(images, cols)
    image_format = (out.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG")
    write_file_atomically(out, lambda tmp: grid.save(tmp, format=image_format))
    w, h = images[0].size
    meta = {"prompts": list(prompts), "rows": math.ceil(len(images) / cols), "cols": cols, "cell": [h, w]}
    write_json_atomically(out.with_suffix(".json"), meta, indent=1)
    return out


GRID_FORMAT = ("a grid X.png with a sidecar X.json {\"prompts\": [...], \"rows\": r, \"cols\": c, "
               "\"cell\": [h, w]} (what `latentsd generate` writes)")


def grid_paths(path: str | Path) -> tuple[Path, Path]:
    """(png, json) of a grid given either file."""
    p = Path(path)
    return (p.with_suffix(".png"), p) if p.suffix.lower() == ".json" else (p, p.with_suffix(".json"))


def load_grid(path: str | Path) -> tuple[list[PIL.Image.Image], list[str]]:
    """Split a grid written by :func:`save_images` back into its cells and prompts."""
    png, sidecar = grid_paths(path)
    if not sidecar.is_file():
        raise ValueError(f"grid {png} has no sidecar {sidecar.name}: expected {GRID_FORMAT}")
    meta = json.loads(sidecar.read_text())
    try:
        prompts, rows, cols = list(meta["prompts"]), int(meta["rows"]), int(meta["cols"])
        h, w = (int(v) for v in meta["cell"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"bad grid sidecar {sidecar}: {err!r}; expected {GRID_FORMAT}") from None
    grid = PIL.Image.open(png).convert("RGB")
    if grid.size != (cols * w, rows * h) or len(prompts) > rows * cols:
        raise ValueError(f"grid {png} is {grid.size[0]}x{grid.size[1]} but its sidecar says "
                         f"{rows}x{cols} cells of {h}x{w} for {len(prompts)} prompts")
    cells = [grid.crop(((k % cols) * w, (k // cols) * h, (k % cols + 1) * w, (k // cols + 1) * h))
             for k in range(len(prompts))]
    return cells, prompts
