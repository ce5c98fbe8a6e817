"""Reading the feature cache: :class:`CachedCaptionDataset` serves cached VAE posteriors and text embeddings
with the same per-sample randomness as the dataset it wraps, and :func:`sample_from_params` turns cached
posterior parameters into the latents encoding would give. Built by :meth:`latentsd.data.cache.FeatureCache.wrap`.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch

from ..errors import UserError
from .captions import CaptionRecipe
from .datasets import open_image, sample_generator
from .fingerprints import bucket_size, latent_key, text_key
from .shards import ShardStore

__all__ = ["sample_from_params", "latents_from_params", "CachedCaptionDataset", "collate_cached"]


# =========================================================================== sampling


def sample_from_params(params: torch.Tensor, noise: Optional[torch.Tensor], scaling_factor: float,
                       shift_factor: float = 0.0) -> torch.Tensor:
    """Posterior parameters ``[..., 2C, h, w]`` and noise ``[..., C, h, w]`` → scaled latents.

    ``(mean + exp(0.5 * clamp(logvar, -30, 20)) * noise - shift) * scale``: the same operations as diffusers'
    ``DiagonalGaussianDistribution`` and :func:`latentsd.latents.encode` with ``noise=``, so the same params
    and noise give the same latents. ``noise=None`` takes the posterior mode (the mean).
    """
    mean, logvar = torch.chunk(params, 2, dim=-3)
    if noise is None:
        z = mean
    else:
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        z = mean + std * noise.to(mean)
    return (z - shift_factor) * scaling_factor


def latents_from_params(vae: Any, params: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`sample_from_params` with this VAE's ``scaling_factor`` / ``shift_factor``."""
    from ..latents import _scale_shift

    scale, shift = _scale_shift(vae)
    return sample_from_params(params, noise, scale, shift)


# =========================================================================== dataset access helpers


def _column(ds: Any, column: str, rows: Optional[Sequence[int]] = None, chunk: int = 4096) -> Iterable:
    """Values of one column (for ``rows`` only if given), read in chunks."""
    part = ds.select_columns([column])
    if rows is not None:
        part = part.select(rows)
    for start in range(0, len(part), chunk):
        yield from part[start:start + chunk][column]


def _row_size(dataset: Any, row: int) -> Optional[tuple[int, int]]:
    """Row ``row``'s output size as a key part (None: the square resolution; see :func:`bucket_size`)."""
    size = dataset.target_size(row) if hasattr(dataset, "target_size") else None
    return bucket_size(size, dataset.transform.resolution)


def _recipe(dataset: Any) -> CaptionRecipe:
    return getattr(dataset, "captions", None) or CaptionRecipe(dropout=dataset.caption_dropout)


# =========================================================================== the dataset


class CachedCaptionDataset(torch.utils.data.Dataset):
    """Map-style dataset reading cached entries; per-sample randomness identical to ``CaptionImageDataset``.

    ``ds[i]`` draws from ``sample_generator(seed, epoch, i)``: the caption pick and dropout first
    (the wrapped dataset's :class:`~latentsd.data.captions.CaptionRecipe`), then the transform's three draws (the
    third decides the flip), exactly like the wrapped dataset, and returns ``{"latent_params": FloatTensor[2C,h,w]``
    (or ``"pixel_values"`` and, with loss masks, ``"loss_mask"`` when latents are not cached),
    ``"prompt_embeds": FloatTensor[77,D]`` (only when text is cached), ``"caption": str`` (always: the chosen
    string), ``"index": i, "num_skipped": k}``. With aspect-ratio buckets, sample ``i``'s latents are those of its
    bucket's size. An unreadable image is skipped as the wrapped dataset does (the next row, same randomness, at
    ``i``'s size), counted in ``num_skipped`` and in ``self.num_skipped`` / ``self.skipped_indices``. Build it
    with :meth:`FeatureCache.wrap`.
    """

    max_tries = 100

    def __init__(self, base: Any, *, latents: Optional[ShardStore], row_digests: Optional[list],
                 latent_context: Optional[str], text: Optional[ShardStore], text_context: Optional[str]):
        self.base = base
        self.latents, self.row_digests, self.latent_context = latents, row_digests, latent_context
        self.text, self.text_context = text, text_context
        self.transform, self.caption_dropout = base.transform, base.caption_dropout
        self.seed, self.epoch = base.seed, base.epoch
        self.caption_cells = list(_column(base.ds, base.caption_column)) if latents is not None else None

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.base.set_epoch(epoch)

    # the wrapped dataset's surface, for code written against it (buckets.image_sizes, skip counting)
    @property
    def ds(self):
        return self.base.ds

    @property
    def image_column(self) -> str:
        return self.base.image_column

    @property
    def caption_column(self) -> str:
        return self.base.caption_column

    def _record_skip(self, row: int, cell: Any, err: Exception) -> None:
        self.base._record_skip(row, cell, err)

    @property
    def captions(self):
        """The wrapped dataset's :class:`~latentsd.data.captions.CaptionRecipe`."""
        return self.base.captions

    def set_bucket_sizes(self, sizes) -> None:
        """Aspect-ratio buckets; with cached latents they must be set on the wrapped dataset before the cache
        is built (the latents are encoded at each bucket's size)."""
        if self.latents is not None:
            raise ValueError("aspect-ratio bucket sizes must be set before the latent cache is built (its latents "
                             "are encoded at each bucket's size): call make_bucket_sampler on the dataset first, "
                             "then build_cached_dataset")
        self.base.set_bucket_sizes(sizes)

    def target_size(self, index: int):
        return self.base.target_size(index) if hasattr(self.base, "target_size") else None

    @property
    def num_skipped(self) -> int:
        return self.base.num_skipped

    @property
    def skipped_indices(self) -> set[int]:
        return self.base.skipped_indices

    def __getitem__(self, index: int) -> dict:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        for attempt in range(min(n, self.max_tries)):
            sample = self._sample((index + attempt) % n, index, attempt)
            if sample is not None:
                return sample
        if self.latents is None:  # the wrapped dataset retries the same rows and names the unreadable files
            return self.base[index]
        raise UserError(f"data.dataset: {min(n, self.max_tries)} consecutive images from row {index} were unreadable "
                        "when the latent cache was built: check that the files exist and are images (see the "
                        "warnings above)")

    def _skip(self, row: int, err: Exception) -> None:
        cell = self.base.ds[row][self.base.image_column]
        self.base._record_skip(row, cell, err)

    def _sample(self, row: int, index: int, attempt: int) -> Optional[dict]:
        if self.latents is None:  # pixels on the fly, exactly as the wrapped dataset makes them
            record = self.base.ds[row]
            cell = record[self.base.image_column]
            try:
                image = open_image(cell)
            except Exception as err:
                self.base._record_skip(row, cell, err)
                return None
            size = self.target_size(index)  # aspect-ratio bucket, if the wrapped dataset has one for i
            made = self.base._make(image, record[self.base.caption_column], index, attempt, size, record)
            out = {k: made[k] for k in ("pixel_values", "caption", "loss_mask") if k in made}
        else:
            digest = self.row_digests[row]
            if digest is None:
                self._skip(row, ValueError("unreadable when the cache was built"))
                return None
            g = sample_generator(self.seed, self.epoch, index)
            caption = self.base._caption(self.caption_cells[row], g, index)  # draws first: fixed order
            flip = self.transform.draw(g)[2]  # the same draw CaptionImageDataset's transform makes
            key = latent_key(self.latent_context, digest, flip, _row_size(self.base, index))  # i's bucket
            out = {"latent_params": self.latents.get(key), "caption": caption}
        if self.text is not None:
            out["prompt_embeds"] = self.text.get(text_key(self.text_context, out["caption"]))
        out["index"], out["num_skipped"] = index, attempt
        return out


def collate_cached(batch: Iterable[dict]) -> dict:
    """Stack :class:`CachedCaptionDataset` samples: ``latent_params`` [B,2C,h,w] or ``pixel_values``
    [B,3,H,W] (and ``loss_mask`` [B,1,H,W]), ``prompt_embeds`` [B,77,D] when cached, ``caption`` list[str],
    ``index`` LongTensor[B], ``num_skipped`` int (sum over the batch)."""
    batch = list(batch)
    if not batch:
        raise ValueError("collate_cached got an empty batch")
    out = {k: torch.stack([b[k] for b in batch]).contiguous()
           for k in ("latent_params", "pixel_values", "loss_mask", "prompt_embeds") if k in batch[0]}
    out["caption"] = [b["caption"] for b in batch]
    out["index"] = torch.tensor([b["index"] for b in batch], dtype=torch.long)
    out["num_skipped"] = int(sum(b["num_skipped"] for b in batch))
    return out
