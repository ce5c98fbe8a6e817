"""Aspect-ratio bucketing: batch images of similar shape at about ``resolution²`` pixels, uncropped.

* :func:`make_buckets` lists the ``(height, width)`` bucket sizes: sides multiples of ``step``, area at most
  ``resolution²``, aspect ratios within ``[1/max_aspect, max_aspect]``, the square always included.
* :func:`assign_bucket` picks the bucket nearest an image in log aspect ratio.
* :func:`image_sizes` reads every image's ``(h, w)`` from its header only (one pass, EXIF rotation applied).
* :class:`BucketBatchSampler` yields batches of dataset indices, each batch from one bucket; the order is a
  function of ``(seed, epoch)`` only, so a run resumes exactly with ``accelerator.skip_first_batches``.
* :func:`make_bucket_sampler` ties it together for a :class:`~latentsd.data.datasets.CaptionImageDataset`:
  sizes -> bucket ids -> sampler, and tells the dataset each index's output size (``set_bucket_sizes``).

Use with a DataLoader (and accelerate) as a *batch* sampler::

    sampler = make_bucket_sampler(dataset, cfg.data, cfg.optim.train_batch_size, cfg.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers)
    loader = accelerator.prepare(loader)    # process i gets every num_processes-th batch
    loader.set_epoch(epoch)                 # reaches the sampler, also through accelerate's BatchSamplerShard

Every batch is full (``drop_last=True``), so every process gets batches of the same size.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections import Counter
from typing import Any, Iterator, Optional, Sequence

import torch
from PIL import Image as PILImage

logger = logging.getLogger(__name__)

__all__ = [
    "make_buckets",
    "assign_bucket",
    "assign_buckets",
    "image_size",
    "image_sizes",
    "BucketBatchSampler",
    "make_bucket_sampler",
    "build_bucketed_loader",
    "bucket_histogram",
]

HW = tuple[int, int]

_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF Orientation values that swap width and height


# =========================================================================== bucket sizes


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[HW]:
    """Bucket sizes ``(height, width)``, sorted and deduplicated.

    For every width ``w`` (a multiple of ``step``) the height is the largest multiple of ``step`` with
    ``h * w <= resolution²``; both ``(h, w)`` and ``(w, h)`` are kept when ``1/max_aspect <= w/h <= max_aspect``.
    So areas never exceed ``resolution²`` (a memory bound) and fall short of it by less than one ``step``
    strip. The square ``(resolution, resolution)`` is always included.

    Raises ``ValueError`` for settings with no valid bucket list: ``step < 1``, ``resolution < step``,
    ``resolution`` not a multiple of ``step`` (the square would not be a bucket), ``max_aspect < 1``.
    """
    resolution, step, max_aspect = int(resolution), int(step), float(max_aspect)
    if step < 1:
        raise ValueError(f"bucket step must be >= 1 pixel, got {step}")
    if resolution < step:
        raise ValueError(f"resolution ({resolution}) must be >= the bucket step ({step}): lower data.bucket_step")
    if resolution % step:
        lower = max(d for d in range(1, step + 1) if resolution % d == 0)
        raise ValueError(
            f"resolution ({resolution}) must be a multiple of the bucket step ({step}) so the square "
            f"{resolution}x{resolution} is a bucket: change data.resolution, or data.bucket_step (e.g. {lower})"
        )
    if not max_aspect >= 1.0 or math.isinf(max_aspect):
        raise ValueError(f"bucket max_aspect must be a finite number >= 1 (widest side / shortest side), got {max_aspect}")
    area = resolution * resolution
    out = {(resolution, resolution)}
    widest = math.isqrt(int(area * max_aspect)) + step  # w / h >= w² / area, so wider buckets are too elongated
    for w in range(step, widest + 1, step):
        h = (area // w) // step * step
        if h < step:
            break
        if max(w / h, h / w) <= max_aspect * (1 + 1e-9):
            out.add((h, w))
            out.add((w, h))
    return sorted(out)


def assign_bucket(height: int, width: int, buckets: Sequence[HW]) -> int:
    """Index of the bucket nearest ``height x width`` in log aspect ratio (ties: the first in ``buckets``)."""
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if not buckets:
        raise ValueError("no buckets to assign to")
    target = math.log(height / width)
    return min(range(len(buckets)), key=lambda i: (abs(math.log(buckets[i][0] / buckets[i][1]) - target), i))


def assign_buckets(sizes: Sequence[Optional[HW]], buckets: Sequence[HW]) -> list[Optional[int]]:
    """:func:`assign_bucket` for every size; ``None`` (unreadable image) stays ``None``."""
    cache: dict[HW, int] = {}  # many images share a size
    out: list[Optional[int]] = []
    for hw in sizes:
        if hw is None:
            out.append(None)
            continue
        hw = (int(hw[0]), int(hw[1]))
        if hw not in cache:
            cache[hw] = assign_bucket(hw[0], hw[1], buckets)
        out.append(cache[hw])
    return out


# =========================================================================== image sizes


def _header_size(img: PILImage.Image) -> HW:
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)  # in the header for JPEG/TIFF/WebP; no pixel decode
    except Exception:
        orientation = 1
    return (w, h) if orientation in _TRANSPOSING_ORIENTATIONS else (h, w)


def image_size(cell: Any) -> HW:
    """``(height, width)`` of a dataset image cell as :func:`~latentsd.data.datasets.open_image` would decode it
    (EXIF rotation applied), reading only the file header where possible.

    Cells: ``{"bytes", "path"}`` dicts (``datasets.Image(decode=False)``), PIL images, paths, raw bytes.
    Remote paths (``hf://``, ``https://``) are decoded fully. Raises on unreadable data.
    """
    from .datasets import open_image

    if isinstance(cell, PILImage.Image):
        return _header_size(cell)
    if isinstance(cell, (bytes, bytearray)):
        cell = {"bytes": bytes(cell), "path": None}
    elif isinstance(cell, (str, os.PathLike)):
        cell = {"bytes": None, "path": os.fspath(cell)}
    if isinstance(cell, dict):
        data, path = cell.get("bytes"), cell.get("path")
        if data:
            with PILImage.open(io.BytesIO(data)) as img:
                return _header_size(img)
        if path and "://" not in path and "::" not in path:
            with PILImage.open(path) as img:
                return _header_size(img)
    return _header_size(open_image(cell))  # remote file (or a malformed cell: raises like the dataset does)


def image_sizes(caption_dataset, progress: Optional[bool] = None, chunk_size: int = 512) -> list[Optional[HW]]:
    """``(height, width)`` of every image of a :class:`~latentsd.data.datasets.CaptionImageDataset`, in index order.

    One pass over the image column in chunks (headers only, no pixel decode). An unreadable image gives
    ``None`` and is recorded like the dataset's own skips (``caption_dataset.num_skipped`` /
    ``skipped_indices``, rate-limited warning). ``progress``: a tqdm bar (default: for 2,000+ images).
    """
    from tqdm.auto import tqdm

    ds, column = caption_dataset.ds, caption_dataset.image_column
    n = len(ds)
    if progress is None:
        progress = n >= 2000
    cells = ds.select_columns([column])
    sizes: list[Optional[HW]] = []
    bar = tqdm(total=n, desc="reading image sizes", unit="img", disable=not progress)
    try:
        for start in range(0, n, chunk_size):
            for offset, cell in enumerate(cells[start:start + chunk_size][column]):
                try:
                    sizes.append(image_size(cell))
                except Exception as err:  # corrupt / missing file: excluded from the buckets, counted
                    record = getattr(caption_dataset, "_record_skip", None)
                    if record is not None:
                        record(start + offset, cell, err)
                    sizes.append(None)
            bar.update(min(chunk_size, n - start))
    finally:
        bar.close()
    return sizes


# =========================================================================== batch sampler


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices, every batch from one bucket; a pure function of ``(seed, epoch)``.

    ``bucket_ids[i]`` is sample ``i``'s bucket (``None`` or negative: never sampled, e.g. unreadable). Each
    epoch (``shuffle=True``): indices are permuted within each bucket, cut into batches of ``batch_size``
    (``drop_last=True`` drops each bucket's remainder, so every batch is full), then the order of all
    batches is permuted. ``shuffle=False``: buckets in id order, indices ascending. ``len()`` is the number of
    batches per epoch (the same every epoch).

    For ``DataLoader(ds, batch_sampler=...)`` / ``accelerator.prepare``: accelerate's ``BatchSamplerShard``
    reads ``batch_size`` and ``drop_last`` from here and gives process ``p`` batches ``p, p + P, ...`` (the
    last ``len % P`` batches are dropped so all processes step together); ``DataLoaderShard.set_epoch``
    reaches :meth:`set_epoch` directly, or through the shard as ``batch_sampler.batch_sampler.sampler`` (which
    is why :attr:`sampler` is this object). Use ``drop_last=False`` only on one process: the short batches
    it yields would break accelerate's same-size sharding.
    """

    def __init__(self, bucket_ids: Sequence[Optional[int]], batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size, self.seed, self.shuffle, self.drop_last = int(batch_size), int(seed), bool(shuffle), bool(drop_last)
        self.epoch = 0
        self.num_samples = len(bucket_ids)
        members: dict[int, list[int]] = {}
        for i, b in enumerate(bucket_ids):
            if b is not None and b >= 0:
                members.setdefault(int(b), []).append(i)
        self.bucket_members: dict[int, torch.Tensor] = {b: torch.tensor(ix, dtype=torch.long) for b, ix in sorted(members.items())}

    @property
    def sampler(self) -> "BucketBatchSampler":
        """This object: where accelerate's ``DataLoaderShard.set_epoch`` looks when it is wrapped in a shard."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches_per_bucket(self, n: int) -> int:
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __len__(self) -> int:
        return sum(self._batches_per_bucket(len(ix)) for ix in self.bucket_members.values())

    def batches(self, epoch: Optional[int] = None) -> list[list[int]]:
        """The batches of ``epoch`` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else int(epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)  # same keying as the trainer's EpochSampler
        out: list[list[int]] = []
        for ix in self.bucket_members.values():
            if self.shuffle:
                ix = ix[torch.randperm(len(ix), generator=g)]
            ix = ix.tolist()
            for k in range(self._batches_per_bucket(len(ix))):
                out.append(ix[k * self.batch_size:(k + 1) * self.batch_size])
        if self.shuffle and out:
            out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __repr__(self) -> str:
        return (f"BucketBatchSampler({self.num_samples} samples, {len(self.bucket_members)} buckets, "
                f"batch_size={self.batch_size}, {len(self)} batches/epoch, shuffle={self.shuffle}, drop_last={self.drop_last})")


# =========================================================================== wiring


def bucket_histogram(bucket_ids: Sequence[Optional[int]], buckets: Sequence[HW]) -> dict[HW, int]:
    """``{(h, w): number of images}`` over the buckets used, in bucket order."""
    counts = Counter(b for b in bucket_ids if b is not None and b >= 0)
    return {buckets[b]: counts[b] for b in sorted(counts)}


def make_bucket_sampler(caption_dataset, data_cfg, batch_size: int, seed: int = 0, *, drop_last: bool = True,
                        indices: Optional[Sequence[int]] = None, sizes: Optional[Sequence[Optional[HW]]] = None,
                        progress: Optional[bool] = None) -> BucketBatchSampler:
    """Bucket a :class:`~latentsd.data.datasets.CaptionImageDataset` and return its :class:`BucketBatchSampler`.

    Buckets from ``data_cfg.resolution / bucket_step / bucket_max_aspect``; image sizes read once
    (:func:`image_sizes`, or pass ``sizes``); the dataset is told each index's bucket size
    (``set_bucket_sizes``); shuffling follows ``data_cfg.shuffle``. Only ``indices`` are sampled (default:
    all; e.g. ``range(holdout, n)`` to leave a held-out prefix out). Unreadable images are left out of every
    epoch. Logs the bucket histogram once. The returned sampler also carries ``buckets``, ``bucket_ids``
    (``None`` = never sampled), ``histogram`` (of the sampled indices) and ``num_unreadable``.
    """
    if not hasattr(caption_dataset, "set_bucket_sizes"):
        raise TypeError(f"bucketing needs a map-style CaptionImageDataset (not streaming), got {type(caption_dataset).__name__}")
    buckets = make_buckets(data_cfg.resolution, data_cfg.bucket_step, data_cfg.bucket_max_aspect)
    if sizes is None:
        sizes = image_sizes(caption_dataset, progress=progress)
    if len(sizes) != len(caption_dataset):
        raise ValueError(f"got {len(sizes)} image sizes for {len(caption_dataset)} samples")
    ids = assign_buckets(sizes, buckets)
    caption_dataset.set_bucket_sizes([None if b is None else buckets[b] for b in ids])
    if indices is not None:
        keep = set(int(i) for i in indices)
        ids = [b if i in keep else None for i, b in enumerate(ids)]
    else:
        keep = range(len(ids))
    sampler = BucketBatchSampler(ids, batch_size, seed, shuffle=data_cfg.shuffle, drop_last=drop_last)
    sampler.buckets, sampler.bucket_ids = buckets, ids
    sampler.histogram = bucket_histogram(ids, buckets)
    sampler.num_unreadable = sum(sizes[i] is None for i in keep)
    dropped = sum(n % sampler.batch_size for n in sampler.histogram.values()) if drop_last else 0
    logger.info(
        "aspect buckets (h x w: images) %s; %d batches of %d per epoch%s%s",
        ", ".join(f"{h}x{w}: {n}" for (h, w), n in sampler.histogram.items()),
        len(sampler), sampler.batch_size,
        f"; {dropped} images/epoch left over in partial batches" if dropped else "",
        f"; {sampler.num_unreadable} unreadable images excluded" if sampler.num_unreadable else "",
    )
    return sampler


def build_bucketed_loader(caption_dataset, data_cfg, batch_size: int, seed: int = 0, *,
                          indices: Optional[Sequence[int]] = None, **loader_kwargs):
    """``DataLoader(caption_dataset, batch_sampler=make_bucket_sampler(...), collate_fn=collate,
    num_workers=data_cfg.num_workers)``; ``indices`` goes to :func:`make_bucket_sampler`, other keyword
    arguments to the DataLoader. The sampler is ``loader.batch_sampler``."""
    from .datasets import collate

    sampler = make_bucket_sampler(caption_dataset, data_cfg, batch_size, seed, indices=indices)
    loader_kwargs.setdefault("collate_fn", collate)
    loader_kwargs.setdefault("num_workers", data_cfg.num_workers)
    return torch.utils.data.DataLoader(caption_dataset, batch_sampler=sampler, **loader_kwargs)
