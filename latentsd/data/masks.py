"""Masked loss: a per-image mask weights the diffusion loss per latent pixel.

Where a mask comes from (:class:`LossMasks`): ``data.mask_column`` (a grayscale image per row: an image column,
or file paths; in an imagefolder write ``"mask_file_name": "masks/0001.png"`` in metadata.jsonl and the column
is ``mask``), or the image's own alpha channel (``data.mask_from_alpha``; an image without alpha counts as
fully opaque). White (255) = train here, black (0) = do not. The mask must have its image's size (after EXIF
rotation); it gets exactly the image's resize, crop and flip (:func:`mask_like`, from the transform's
:class:`~latentsd.data.transforms.TransformInfo`: no random draw of its own).

In the loss (:func:`latent_mask_weights`), the mask is averaged down to the latent grid (area interpolation:
each latent pixel gets the mean of the mask over its 8x8 patch) and a latent pixel's squared error is weighted
by ``unmasked_weight + (1 - unmasked_weight) * mask`` (``loss.unmasked_weight``, default 0: the unmasked region
teaches nothing). Each sample's loss is the mean of the weighted squared errors over channels and pixels (not
renormalised by the mask's area, as kohya's sd-scripts does), so an all-white mask gives the unmasked loss.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .transforms import TransformInfo, resize_to_cover, to_rgb

__all__ = ["alpha_mask", "mask_image", "mask_like", "LossMasks", "latent_mask_weights"]

_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")


def alpha_mask(img: Image.Image) -> Image.Image:
    """The image's alpha channel as an ``L`` mask (EXIF rotation applied, like the pixels); opaque without one."""
    if img.getexif().get(0x0112, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        return img.convert("RGBA").getchannel("A")
    return Image.new("L", img.size, 255)


def mask_image(img: Image.Image) -> Image.Image:
    """A mask file as an ``L`` image (EXIF rotation, 16-bit and palette handled as for images)."""
    return to_rgb(img).convert("L")


def mask_like(mask: Image.Image, info: TransformInfo, crop_hw: tuple[int, int]) -> torch.Tensor:
    """``FloatTensor[1, h, w]`` in [0, 1]: ``mask`` (an ``L`` image of the original image's size) resized,
    cropped and flipped as the transform that returned ``info`` did to its image, cropped to ``crop_hw``."""
    crop_h, crop_w = int(crop_hw[0]), int(crop_hw[1])
    if (mask.height, mask.width) != tuple(info["original_size"]):
        raise ValueError(f"the mask is {mask.width}x{mask.height} pixels but its image is "
                         f"{info['original_size'][1]}x{info['original_size'][0]}: a mask must have its image's size")
    resized = resize_to_cover(mask, crop_h, crop_w)
    top, left = info["crop_top_left"]
    if info["flipped"]:  # crop_top_left is given in the mirrored image
        left = resized.width - left - crop_w
    arr = np.asarray(resized.crop((left, top, left + crop_w, top + crop_h)), dtype=np.float32) / 255.0
    out = torch.from_numpy(arr.copy()).clamp_(0.0, 1.0)[None]  # resampling may ring slightly past [0, 1]
    return torch.flip(out, dims=[2]) if info["flipped"] else out


class LossMasks:
    """Each sample's ``loss_mask`` (``{}`` when masks are off): from ``column`` or the image's alpha."""

    def __init__(self, column: Optional[str] = None, from_alpha: bool = False):
        if column and from_alpha:
            raise ValueError("set data.mask_column or data.mask_from_alpha, not both")
        self.column, self.from_alpha = column or None, bool(from_alpha)

    @classmethod
    def from_config(cls, data_cfg: Any) -> "LossMasks":
        return cls(getattr(data_cfg, "mask_column", None), getattr(data_cfg, "mask_from_alpha", False))

    @property
    def enabled(self) -> bool:
        return self.column is not None or self.from_alpha

    def source(self, record: dict, image: Image.Image, open_cell) -> Optional[Image.Image]:
        """The row's mask as an ``L`` image of the image's size, or None when masks are off. ``open_cell``
        decodes a dataset image cell (:func:`~latentsd.data.datasets.open_image`)."""
        if self.from_alpha:
            return alpha_mask(image)
        if self.column is None:
            return None
        cell = record.get(self.column)
        if cell is None:
            raise ValueError(f"data.mask_column={self.column!r}: this row has no mask; give every row one")
        try:
            return mask_image(open_cell(cell))
        except Exception as err:
            name = cell.get("path") if isinstance(cell, dict) else cell
            raise ValueError(f"data.mask_column={self.column!r}: cannot read the mask {str(name)[:200]!r} "
                             f"({type(err).__name__}: {err})") from err

    def __call__(self, record: dict, image: Image.Image, info: TransformInfo, crop_hw, open_cell) -> dict:
        mask = self.source(record, image, open_cell)
        if mask is None:
            return {}
        try:
            return {"loss_mask": mask_like(mask, info, crop_hw)}
        except ValueError as err:
            raise ValueError(f"data.mask_column={self.column!r}: {err}") from err


def latent_mask_weights(mask: Optional[torch.Tensor], latent_hw: tuple[int, int],
                        unmasked_weight: float = 0.0) -> Optional[torch.Tensor]:
    """Per-latent-pixel loss weights ``[B, 1, h, w]`` from pixel masks ``[B, 1, H, W]`` (None: no mask):
    area-averaged to ``latent_hw``, then ``unmasked_weight + (1 - unmasked_weight) * mask``."""
    if mask is None:
        return None
    small = F.interpolate(mask.float(), size=tuple(latent_hw), mode="area")
    return unmasked_weight + (1.0 - unmasked_weight) * small
