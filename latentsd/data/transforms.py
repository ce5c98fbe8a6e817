"""Image preprocessing for training, in pure PIL + torch (no torchvision).

Pipeline: any PIL mode -> RGB -> resize shortest side to ``resolution`` -> square
crop (center or random) -> optional horizontal flip -> float CHW tensor in [-1, 1].
With a per-call target ``size=(h, w)`` (aspect-ratio buckets, see :mod:`latentsd.data.buckets`)
the image is instead resized to just cover ``h x w`` and cropped to exactly that.

All randomness comes from an explicit ``torch.Generator`` so that a sample's
augmentation is a pure function of its generator seed (exact resume).  Every
call draws the same number of random numbers whatever the options, so turning
flip on does not shift the crop stream.
"""

from __future__ import annotations

from typing import Optional, TypedDict

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = ["TransformInfo", "to_rgb", "resize_shortest_side", "resize_to_cover", "crop_box", "pil_to_tensor", "ImageTransform"]


class TransformInfo(TypedDict):
    """Geometry of one transform, for SDXL-style size/crop conditioning and bucketing."""

    original_size: tuple[int, int]  # (height, width) of the input image
    crop_top_left: tuple[int, int]  # (top, left) of the crop in the resized image (after flip, if flipped)
    flipped: bool


def to_rgb(img: Image.Image, matte: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL image to RGB; transparency is composited on a white matte, EXIF rotation applied."""
    if img.getexif().get(0x0112, 1) != 1:  # phone photos store rotation in EXIF Orientation
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: PIL's convert clips at 255, so rescale by hand
        a = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, matte + (255,))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def resize_shortest_side(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (aspect kept). Lanczos when shrinking, bicubic when enlarging.

    PIL's resampling filters are antialiased (the kernel widens when downscaling).
    """
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return img.resize((new_w, new_h), resample=resample)


def resize_to_cover(img: Image.Image, height: int, width: int) -> Image.Image:
    """Resize (aspect kept) by ``max(height / H, width / W)``: the smallest image covering ``height x width``.

    For ``height == width == size`` this is exactly :func:`resize_shortest_side`.
    """
    w, h = img.size
    scale = max(height / h, width / w)
    new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    if (new_w, new_h) == (w, h):
        return img
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
    return img.resize((new_w, new_h), resample=resample)


def crop_box(height: int, width: int, size, center: bool, u_top: float, u_left: float) -> tuple[int, int]:
    """(top, left) of a crop of ``size`` (an int for a square, or ``(crop_h, crop_w)``) from a ``height x width``
    image; ``u_*`` in [0, 1) pick the random offset when not ``center``."""
    crop_h, crop_w = (size, size) if isinstance(size, int) else size
    if center:
        return (height - crop_h) // 2, (width - crop_w) // 2
    top = min(int(u_top * (height - crop_h + 1)), height - crop_h)
    left = min(int(u_left * (width - crop_w + 1)), width - crop_w)
    return top, left


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB uint8 PIL image -> float32 CHW tensor in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
    return t.to(torch.float32).div_(127.5).sub_(1.0)


class ImageTransform:
    """Callable ``(PIL image, generator, size=None) -> (FloatTensor[3, H, W] in [-1, 1], TransformInfo)``.

    ``size=None``: ``H = W = resolution`` (resize the short side, square crop). ``size=(h, w)``: resize so the
    image just covers ``h x w`` (``scale = max(h / H0, w / W0)``), then crop (center or random) to ``h x w``.
    Either way the same 3 random numbers are drawn, so the caller's generator stream does not depend on ``size``.
    """

    #: random numbers drawn per call (crop top, crop left, flip), always, for a stable stream
    N_DRAWS = 3

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False):
        if resolution < 1:
            raise ValueError(f"resolution must be >= 1, got {resolution}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip

    @classmethod
    def from_config(cls, data_cfg) -> "ImageTransform":
        """Build from a :class:`latentsd.config.DataConfig`."""
        return cls(data_cfg.resolution, data_cfg.center_crop, data_cfg.random_flip)

    def draw(self, generator: Optional[torch.Generator] = None) -> tuple[float, float, bool]:
        """The random choices of one call: (crop top, crop left) uniforms and whether to flip."""
        u = torch.rand(self.N_DRAWS, generator=generator, dtype=torch.float64).tolist()
        return u[0], u[1], bool(self.random_flip and u[2] < 0.5)

    def __call__(self, img: Image.Image, generator: Optional[torch.Generator] = None,
                 size: Optional[tuple[int, int]] = None):
        u_top, u_left, flipped = self.draw(generator)
        if size is None:
            crop_h = crop_w = self.resolution
        else:
            crop_h, crop_w = int(size[0]), int(size[1])
            if crop_h < 1 or crop_w < 1:
                raise ValueError(f"size must be (height, width) >= 1, got {size}")
        img = to_rgb(img)
        original_size = (img.height, img.width)
        img = resize_to_cover(img, crop_h, crop_w)  # == resize_shortest_side for the square
        resized_w = img.width
        top, left = crop_box(img.height, img.width, (crop_h, crop_w), self.center_crop, u_top, u_left)
        pixels = pil_to_tensor(img.crop((left, top, left + crop_w, top + crop_h)))
        if flipped:
            pixels = torch.flip(pixels, dims=[2])
            left = resized_w - left - crop_w  # the crop's left edge in the mirrored image
        info: TransformInfo = {"original_size": original_size, "crop_top_left": (top, left), "flipped": flipped}
        return pixels, info

    def __repr__(self) -> str:
        return f"ImageTransform(resolution={self.resolution}, center_crop={self.center_crop}, random_flip={self.random_flip})"

