"""Image grids with a JSON sidecar that records the prompt of every cell (read back by the scorers)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import PIL.Image


def make_grid(images: list[PIL.Image.Image], cols: int | None = None) -> PIL.Image.Image:
    """Tile equally sized images row by row; ``cols`` defaults to a near-square layout."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = PIL.Image.new("RGB", (cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def save_images(images: list[PIL.Image.Image], prompts: list[str], out: str | Path,
                cols: int | None = None) -> Path:
    """Save one image as is, or several as a grid; either way write ``out`` with a ``.json`` sidecar.

    The sidecar is ``{"prompts": [...], "rows": r, "cols": c, "cell": [h, w]}``; the file is written
    to a temporary name and renamed, so a reader never sees half an image.
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cols = 1 if len(images) == 1 else (cols or math.ceil(math.sqrt(len(images))))
    grid = make_grid(images, cols)
    tmp = out.with_name(f".{out.name}.tmp")
    grid.save(tmp, format=(out.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    os.replace(tmp, out)
    w, h = images[0].size
    meta = {"prompts": list(prompts), "rows": math.ceil(len(images) / cols), "cols": cols, "cell": [h, w]}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def load_grid(path: str | Path) -> tuple[list[PIL.Image.Image], list[str]]:
    """Split a grid written by :func:`save_images` back into its cells and prompts."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise ValueError(f"{path} has no sidecar {sidecar.name}: grids written by `latentsd generate` have one; "
                         "for a folder of images use an imagefolder with metadata.jsonl (file_name, text)")
    meta = json.loads(sidecar.read_text())
    grid = PIL.Image.open(path).convert("RGB")
    h, w = meta["cell"]
    cells = [grid.crop(((i % meta["cols"]) * w, (i // meta["cols"]) * h, (i % meta["cols"] + 1) * w,
                        (i // meta["cols"] + 1) * h)) for i in range(len(meta["prompts"]))]
    return cells, meta["prompts"]
