"""Image-caption training data: loading (local or hub), column detection, per-sample transforms.

* :func:`load_caption_dataset` turns ``cfg.data.dataset`` into a Hugging Face ``Dataset``
  (or ``IterableDataset`` when streaming): an imagefolder directory, a
  ``save_to_disk`` directory, a .parquet/.arrow/.csv/.json/.jsonl file, or a hub id.
* :func:`resolve_columns` finds the image and caption columns (or explains why it can't).
* :class:`CaptionImageDataset` (map-style) and :class:`StreamingCaptionImageDataset`
  (iterable) yield ``{"pixel_values": FloatTensor[3,H,W] in [-1,1], "caption": str, ...}``.
  All per-sample randomness (caption pick, caption dropout, crop, flip) is drawn from a
  ``torch.Generator`` seeded by ``(seed, epoch, index)``: independent of worker count
  and of where a run was resumed.
* :func:`collate` batches samples for a standard ``DataLoader``.
* Bad data (:mod:`latentsd.data.validate`): local text files that are not UTF-8 or not JSON are errors naming
  the file and line, before ``datasets`` parses them; rows without a caption train with ``""`` (counted in
  ``data_issues``, warned once) or are an error (``data.missing_caption=error``); unreadable images are skipped
  and counted, and a dataset with no readable image is an error naming the first files. :func:`data_issues`
  gives the counts by reason for a run's summary (streamed datasets count in the process that reads them).

Caption dropout replaces the caption by exactly ``""``: the trainer encodes ``""`` with the
same conditioning module the pipeline uses for the unconditional branch.
"""

from __future__ import annotations

import difflib
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image as PILImage

from ..errors import UserError
from ..paths import looks_local
from .captions import TAG_STREAM, CaptionRecipe, pick_caption
from .masks import LossMasks
from .transforms import ImageTransform
from .validate import (check_text_files, is_missing, load_error, missing_caption_error, missing_caption_rows,
                       unreadable_error, warn_missing_captions)

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetColumnError",
    "IMAGE_COLUMN_NAMES",
    "CAPTION_COLUMN_NAMES",
    "LOCAL_FILE_FORMATS",
    "load_caption_dataset",
    "resolve_columns",
    "sample_generator",
    "choose_caption",
    "open_image",
    "CaptionImageDataset",
    "StreamingCaptionImageDataset",
    "make_caption_dataset",
    "build_train_dataset",
    "data_issues",
    "describe_data_issues",
    "collate",
]

IMAGE_COLUMN_NAMES = ("image", "img", "images", "file_name", "filename", "path", "image_path", "file")
"""Column names taken to hold images (or image file paths) when no column has an Image feature."""

CAPTION_COLUMN_NAMES = ("text", "caption", "captions", "prompt", "prompts", "sentence", "sentences", "description", "txt")
"""Column names taken to hold captions, before falling back to "the single string column"."""

LOCAL_FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json", ".jsonl": "json"}
"""Local file extension -> ``datasets`` packaged builder."""

HFDataset = Any  # datasets.Dataset | datasets.IterableDataset (datasets is imported lazily: it is slow to import)


class DatasetColumnError(ValueError):
    """The image or caption column is missing, ambiguous, or of the wrong type."""


# =========================================================================== loading


def _looks_local(src: str) -> bool:
    """A string the user meant as a local path (so a missing one must not fall through to the hub)."""
    return looks_local(src) or Path(src).suffix.lower() in LOCAL_FILE_FORMATS


def load_caption_dataset(data_cfg, cache_dir: Optional[str] = None) -> HFDataset:
    """Load ``data_cfg.dataset`` as a ``datasets.Dataset`` (or ``IterableDataset`` if ``data_cfg.streaming``).

    * directory written by ``Dataset.save_to_disk`` -> ``load_from_disk``
    * other directory -> ``load_dataset("imagefolder")`` (captions from metadata.jsonl / metadata.csv
      with a ``file_name`` column)
    * .parquet / .arrow / .csv / .json / .jsonl file; in csv/json (and path-only parquet) the image
      column holds file paths relative to the file, cast to an ``Image`` feature
    * anything else -> ``load_dataset(hub_id)``

    ``data_cfg.max_samples`` truncates (``select`` / ``take``). ``cache_dir`` is passed to ``load_dataset``.
    """
    import datasets

    src = data_cfg.dataset.strip()
    if not src:
        raise ValueError("data.dataset is empty: set it to a local folder/file or a hub id (override: data.dataset=PATH)")
    path = Path(src).expanduser()
    split, streaming = data_cfg.split, data_cfg.streaming
    base_dir = None  # where relative image paths are resolved from

    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data.split={split!r} not in {path}; available splits: {list(ds)}")
            ds = ds[split]
        if streaming:
            ds = ds.to_iterable_dataset()
    elif path.is_dir():
        with _reading(src, check_text_files(path)):
            ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=split, streaming=streaming,
                                       cache_dir=cache_dir)
    elif path.is_file():
        fmt = LOCAL_FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(
                f"data.dataset={src!r}: unsupported file type {path.suffix!r}; use one of "
                f"{', '.join(LOCAL_FILE_FORMATS)} or an imagefolder directory"
            )
        with _reading(src, check_text_files(path) or [path]):
            ds = _load_file(path, fmt, split, streaming, cache_dir)
        base_dir = path.resolve().parent
    elif _looks_local(src):
        raise FileNotFoundError(
            f"data.dataset={src!r}: no such file or directory (resolved to {path.resolve()}). "
            "Create it (e.g. latentsd make-shapes --out data/tiny_imagefolder --n 64) or fix the path; "
            "hub datasets are given as 'owner/name'."
        )
    else:
        try:
            ds = datasets.load_dataset(src, split=split, streaming=streaming, cache_dir=cache_dir)
        except (ConnectionError, FileNotFoundError) as err:  # DatasetNotFoundError is a FileNotFoundError
            raise FileNotFoundError(
                f"data.dataset={src!r} is neither a local path (no {path.resolve()}) nor a loadable hub "
                f"dataset ({type(err).__name__}: {err}). For a local folder, create it or write it as ./{src}"
            ) from err

    ds = _truncate(ds, data_cfg.max_samples)
    if base_dir is not None:
        ds = _resolve_image_paths(ds, data_cfg, base_dir)
    return ds


@contextmanager
def _reading(src: str, files: list[Path]):
    """``datasets``' errors while parsing local files, as one line naming the files (ours pass through)."""
    from datasets.exceptions import DatasetGenerationError

    try:
        yield
    except UserError:
        raise
    except (DatasetGenerationError, ValueError) as err:  # pyarrow's ArrowInvalid and pandas' ParserError too
        raise load_error(src, files, err) from err


def _load_file(path: Path, fmt: str, split: str, streaming: bool, cache_dir: Optional[str]) -> HFDataset:
    import datasets

    if fmt == "arrow" and not streaming:
        try:  # memory-maps the file in place: no copy into the cache
            return datasets.Dataset.from_file(str(path))
        except Exception:  # e.g. Arrow IPC *file* format rather than stream format
            pass
    # map the file onto the configured split name so data.split works for single files too
    return datasets.load_dataset(
        fmt, data_files={split: str(path)}, split=split, streaming=streaming, cache_dir=cache_dir
    )


def _truncate(ds: HFDataset, max_samples: Optional[int]) -> HFDataset:
    if max_samples is None:
        return ds
    if hasattr(ds, "__len__"):
        return ds.select(range(min(max_samples, len(ds))))
    return ds.take(max_samples)


def _features(ds: HFDataset):
    """(dataset, features) with features resolved for streaming datasets whose schema is unknown (csv)."""
    if ds.features is None and hasattr(ds, "_resolve_features"):
        ds = ds._resolve_features()  # peeks the first rows
    return ds, ds.features


def _resolve_image_paths(ds: HFDataset, data_cfg, base_dir: Path) -> HFDataset:
    """If the image column (or ``data.mask_column``) holds relative path strings, make them relative to
    ``base_dir`` and cast to Image."""
    import datasets

    ds, features = _features(ds)
    columns = list(features) if features is not None else _peek_columns(ds)
    image_col, _ = resolve_columns(columns, features, data_cfg.image_column, data_cfg.caption_column)
    candidates = (image_col, getattr(data_cfg, "mask_column", None))
    path_cols = [c for c in candidates if features is not None and c in features and _is_str(features[c])]
    if not path_cols:
        return ds

    def absolutize(batch):
        return {c: [_join_path(base_dir, p) for p in batch[c]] for c in path_cols}

    ds = ds.map(absolutize, batched=True, features=features)
    for column in path_cols:
        ds = ds.cast_column(column, datasets.Image())
    return ds


def _join_path(base_dir: Path, p: Optional[str]) -> Optional[str]:
    if not p or "://" in p or os.path.isabs(p):
        return p
    return os.path.normpath(os.path.join(base_dir, p))


def _peek_columns(ds: HFDataset) -> list[str]:
    return list(next(iter(ds)).keys())


# =========================================================================== columns


def _is_image(f) -> bool:
    import datasets

    return isinstance(f, datasets.Image)


def _is_str(f) -> bool:
    import datasets

    return isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")


def _is_str_list(f) -> bool:
    if isinstance(f, list):  # legacy [Value("string")]
        return len(f) == 1 and _is_str(f[0])
    inner = getattr(f, "feature", None)  # List / LargeList / Sequence
    return inner is not None and _is_str(inner)


def _is_image_like(f) -> bool:
    """Image feature, a path string, raw bytes, or a {bytes, path} struct (parquet written without HF metadata)."""
    import datasets

    if _is_image(f) or _is_str(f):
        return True
    if isinstance(f, datasets.Value) and f.dtype in ("binary", "large_binary"):
        return True
    return isinstance(f, dict) and ("bytes" in f or "path" in f)


def _describe(columns: Sequence[str], features) -> str:
    if features is None:
        return ", ".join(columns)
    return ", ".join(f"{c} ({_ftype(features.get(c))})" for c in columns)


def _ftype(f) -> str:
    if f is None:
        return "?"
    if _is_image(f):
        return "Image"
    if _is_str(f):
        return "string"
    if _is_str_list(f):
        return "list[string]"
    return getattr(f, "dtype", type(f).__name__)


def resolve_columns(
    column_names: Sequence[str],
    features=None,
    image_column: Optional[str] = None,
    caption_column: Optional[str] = None,
) -> tuple[str, str]:
    """Return ``(image_column, caption_column)``.

    Explicit names must exist. Auto-detection: image = the single column with an ``Image`` feature
    (preferring one named like :data:`IMAGE_COLUMN_NAMES` if there are several), else the single
    column with such a name; caption = the single column named like :data:`CAPTION_COLUMN_NAMES`,
    else the single string / list-of-strings column. Missing, ambiguous or mistyped columns raise
    :class:`DatasetColumnError` listing the columns and naming ``data.image_column`` /
    ``data.caption_column``. ``features`` may be None (unknown schema: names only).
    """
    cols = list(column_names)
    listing = _describe(cols, features)

    def check_explicit(name: str, key: str) -> None:
        if name not in cols:
            close = difflib.get_close_matches(name, cols, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise DatasetColumnError(f"{key}={name!r} is not a column of the dataset.{hint} Columns: {listing}")

    def pick(cands: list[str], what: str, key: str) -> str:
        if len(cands) == 1:
            return cands[0]
        if not cands:
            raise DatasetColumnError(f"could not find the {what} column; set {key}. Columns: {listing}")
        raise DatasetColumnError(
            f"ambiguous {what} column: candidates {cands}; set {key} to one of them. Columns: {listing}"
        )

    feat = (lambda c: features.get(c)) if features is not None else (lambda c: None)

    # ---- image
    if image_column is not None:
        check_explicit(image_column, "data.image_column")
        img = image_column
    else:
        by_feature = [c for c in cols if _is_image(feat(c)) and c != caption_column]
        if len(by_feature) > 1:  # e.g. image + conditioning_image: the plainly named one wins
            named = [c for c in by_feature if c.lower() in IMAGE_COLUMN_NAMES]
            by_feature = named if len(named) == 1 else by_feature
        cands = by_feature or [c for c in cols if c.lower() in IMAGE_COLUMN_NAMES and c != caption_column]
        img = pick(cands, "image", "data.image_column")
    if features is not None and not _is_image_like(feat(img)):
        raise DatasetColumnError(
            f"data.image_column={img!r} has type {_ftype(feat(img))}; expected images or image file paths. Columns: {listing}"
        )

    # ---- caption
    if caption_column is not None:
        check_explicit(caption_column, "data.caption_column")
        cap = caption_column
    else:
        rest = [c for c in cols if c != img]
        cands = [c for c in rest if c.lower() in CAPTION_COLUMN_NAMES]
        if not cands and features is not None:
            cands = [c for c in rest if _is_str(feat(c)) or _is_str_list(feat(c))]
        cap = pick(cands, "caption", "data.caption_column")
    if cap == img:
        raise DatasetColumnError(f"data.image_column and data.caption_column are both {img!r}; they must differ")
    if features is not None and not (_is_str(feat(cap)) or _is_str_list(feat(cap))):
        raise DatasetColumnError(
            f"data.caption_column={cap!r} has type {_ftype(feat(cap))}; expected string or list of strings. Columns: {listing}"
        )
    return img, cap


# =========================================================================== per-sample pieces

_MASK64 = (1 << 64) - 1


def sample_generator(seed: int, epoch: int, index: int, stream: int = 0) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded from a hash of ``(seed, epoch, index)`` (numpy SeedSequence mixing).

    ``stream`` > 0 gives an independent generator for the same sample (e.g. the caption tags',
    :data:`~latentsd.data.captions.TAG_STREAM`); stream 0 is the sample's main one."""
    words = [seed & _MASK64, epoch & _MASK64, index & _MASK64] + ([stream & _MASK64] if stream else [])
    state = np.random.SeedSequence(words).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed((int(state[0]) | (int(state[1]) << 32)) & ((1 << 63) - 1))
    return g


def choose_caption(caption: Union[str, Sequence[str], None], generator: torch.Generator, dropout: float = 0.0) -> str:
    """Pick one caption (uniformly from a list) and apply dropout (-> exactly ``""``).

    Always draws two numbers from ``generator`` so the stream after it is the same for every row.
    A missing caption (None / empty list) becomes ``""``. (Tags and templates: :mod:`latentsd.data.captions`.)
    """
    return pick_caption(caption, generator, dropout)[0]


def open_image(value: Any) -> PILImage.Image:
    """Decode a dataset image cell (PIL image, path, bytes, or ``{"bytes", "path"}``) fully into memory.

    Raises on unreadable data; the dataset wrappers catch, skip and count.
    """
    if isinstance(value, PILImage.Image):
        value.load()
        return value
    if isinstance(value, (bytes, bytearray)):
        value = {"bytes": bytes(value), "path": None}
    elif isinstance(value, (str, os.PathLike)):
        value = {"bytes": None, "path": os.fspath(value)}
    if not isinstance(value, dict) or not (value.get("bytes") or value.get("path")):
        raise ValueError(f"not an image cell: {value!r:.80}")
    import datasets

    img = datasets.Image().decode_example(value)  # handles local, bytes and remote (hf://, https://) paths
    img.load()
    return img


def _cell_name(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("path") or "<bytes>")
    return str(value)[:200] if isinstance(value, (str, os.PathLike)) else f"<{type(value).__name__}>"


def _mask_columns(masks: LossMasks, columns: Sequence[str], features) -> list[str]:
    """``[data.mask_column]`` checked against the dataset's columns (``[]`` without a mask column)."""
    if masks.column is None:
        return []
    if masks.column not in columns:
        close = difflib.get_close_matches(masks.column, list(columns), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise DatasetColumnError(f"data.mask_column={masks.column!r} is not a column of the dataset.{hint} Columns: "
                                 f"{_describe(list(columns), features)} (in an imagefolder, a metadata key "
                                 "'mask_file_name' becomes the column 'mask')")
    if features is not None and not _is_image_like(features[masks.column]):
        raise DatasetColumnError(f"data.mask_column={masks.column!r} has type {_ftype(features[masks.column])}; "
                                 "expected grayscale images or image file paths")
    return [masks.column]


class _SampleMaker:
    """Shared by the map-style and streaming wrappers: column setup, sample construction, skip counting."""

    warn_every: int = 100

    def _setup(self, hf_dataset: HFDataset, data_cfg, seed: int, warn_every: int) -> HFDataset:
        import datasets

        hf_dataset, features = _features(hf_dataset)
        columns = list(features) if features is not None else _peek_columns(hf_dataset)
        self.image_column, self.caption_column = resolve_columns(
            columns, features, data_cfg.image_column, data_cfg.caption_column
        )
        self.masks = LossMasks.from_config(data_cfg)  # loss masks: a mask column or the image's alpha
        extra = _mask_columns(self.masks, columns, features)
        ds = hf_dataset.select_columns([self.image_column, self.caption_column, *extra])  # don't decode unused columns
        for column in (self.image_column, *extra):
            if features is not None and _is_image(features[column]):
                # decode ourselves so one corrupt file is skipped instead of raising inside datasets
                ds = ds.cast_column(column, datasets.Image(decode=False))
        self.transform = ImageTransform.from_config(data_cfg)
        self.caption_dropout = float(data_cfg.caption_dropout)
        self.captions = CaptionRecipe.from_config(data_cfg)  # pick, dropout, tags, template
        self.seed, self.epoch = int(seed), 0
        self.warn_every = warn_every
        self.num_skipped = 0  # skip events in this process (a bad file met in 3 epochs counts 3)
        self.skipped_indices: set[int] = set()  # distinct bad row indices seen in this process
        self.source = str(data_cfg.dataset)
        self.missing_caption = getattr(data_cfg, "missing_caption", "empty")
        self.data_issues: dict[str, int] = {}  # reason -> rows, found when the dataset is set up (map-style)
        return ds

    def _check_captions(self) -> None:
        """Rows without a caption (a JSON line without the field): an error, or counted and warned once."""
        rows = missing_caption_rows(self.ds, self.caption_column)
        if not rows:
            return
        names = [_cell_name(self.ds[r][self.image_column]) for r in rows[:5]]
        if self.missing_caption == "error":
            raise missing_caption_error(self.source, rows, names, len(self.ds))
        warn_missing_captions(self.source, rows, names, len(self.ds))
        self.data_issues["missing_caption"] = len(rows)

    def _streamed_caption(self, caption: Any, index: int, cell: Any) -> Any:
        """A streamed row's caption, with ``data.missing_caption`` applied (counted per process, warned once)."""
        if not is_missing(caption):
            return caption
        if self.missing_caption == "error":
            raise missing_caption_error(self.source, [index], [_cell_name(cell)], index + 1)
        self.data_issues["missing_caption"] = self.data_issues.get("missing_caption", 0) + 1
        warn_missing_captions(self.source, [index], [_cell_name(cell)], index + 1)  # once per process and source
        return caption

    def set_epoch(self, epoch: int) -> None:
        """Select the per-epoch randomness. Call before each epoch (workers must not be persistent)."""
        self.epoch = int(epoch)

    def _record_skip(self, row: int, cell: Any, err: Exception) -> None:
        self.num_skipped += 1
        self.skipped_indices.add(row)
        if self.num_skipped == 1 or self.num_skipped % self.warn_every == 0:
            logger.warning(
                "skipped %d unreadable image(s) so far in this process (latest: row %d, %s: %s: %s)",
                self.num_skipped, row, _cell_name(cell), type(err).__name__, err,
            )

    def _caption(self, caption: Any, generator: torch.Generator, index: int) -> str:
        """The sample's caption (draws two numbers from ``generator``; tags from their own stream)."""
        tags = sample_generator(self.seed, self.epoch, index, TAG_STREAM) if self.captions.edits_tags else None
        return self.captions(caption, generator, tags)

    def _make(self, image: PILImage.Image, caption: Any, index: int, num_skipped: int,
              size: Optional[tuple[int, int]] = None, record: Optional[dict] = None) -> dict:
        g = sample_generator(self.seed, self.epoch, index)
        text = self._caption(caption, g, index)  # draws first: fixed order
        pixels, info = self.transform(image, g, size=size)  # size=None: the square resolution
        return {
            "pixel_values": pixels,
            "caption": text,
            "original_size": info["original_size"],
            "crop_top_left": info["crop_top_left"],
            "index": index,
            "num_skipped": num_skipped,
            **self.masks(record or {}, image, info, pixels.shape[-2:], open_image),  # "loss_mask" when on
        }


class CaptionImageDataset(_SampleMaker, torch.utils.data.Dataset):
    """Map-style torch dataset over a HF ``Dataset`` of image/caption rows.

    ``ds[i]`` -> ``{"pixel_values": FloatTensor[3,R,R] in [-1,1], "caption": str, "original_size": (h, w),
    "crop_top_left": (top, left), "index": i, "num_skipped": k}``. Randomness is a function of
    ``(seed, epoch, i)`` only; call :meth:`set_epoch` each epoch. An unreadable image is skipped: the next
    readable row is used instead (keeping batch size fixed), counted in ``num_skipped`` (per sample, so it
    survives worker processes; sum it from batches) and in ``self.num_skipped`` / ``self.skipped_indices``.

    Aspect-ratio buckets: after :meth:`set_bucket_sizes` (done by
    :func:`latentsd.data.buckets.make_bucket_sampler`) ``ds[i]["pixel_values"]`` is ``[3, h_i, w_i]``, the
    image covering its bucket's ``(h_i, w_i)`` and cropped to it, instead of the ``R x R`` square.
    """

    max_tries = 100

    def __init__(self, hf_dataset: HFDataset, data_cfg, seed: int = 0, warn_every: int = 100):
        if not hasattr(hf_dataset, "__len__"):
            raise TypeError("CaptionImageDataset needs a map-style datasets.Dataset; use StreamingCaptionImageDataset")
        self.ds = self._setup(hf_dataset, data_cfg, seed, warn_every)
        if len(self.ds) == 0:
            raise ValueError(f"dataset {data_cfg.dataset!r} (split {data_cfg.split!r}) has no rows")
        self._check_captions()
        self.target_sizes: Optional[np.ndarray] = None  # int32 [n, 2] (h, w) per index; 0 = the square default

    def __len__(self) -> int:
        return len(self.ds)

    def set_bucket_sizes(self, sizes: Optional[Sequence[Optional[tuple[int, int]]]]) -> None:
        """Per-index output size ``(h, w)`` (``None`` entries, or ``sizes=None`` for all: the square resolution)."""
        if sizes is None:
            self.target_sizes = None
            return
        if len(sizes) != len(self):
            raise ValueError(f"set_bucket_sizes: got {len(sizes)} sizes for {len(self)} samples")
        table = np.zeros((len(sizes), 2), dtype=np.int32)  # compact: copied into every worker process
        for i, hw in enumerate(sizes):
            if hw is not None:
                h, w = int(hw[0]), int(hw[1])
                if h < 1 or w < 1:
                    raise ValueError(f"set_bucket_sizes: size {hw!r} at index {i} is not a positive (height, width)")
                table[i] = (h, w)
        self.target_sizes = table

    def target_size(self, index: int) -> Optional[tuple[int, int]]:
        """The ``(h, w)`` sample ``index`` is resized/cropped to, or ``None`` for the square resolution."""
        if self.target_sizes is None:
            return None
        h, w = self.target_sizes[index].tolist()
        return (h, w) if h > 0 else None

    def __getitem__(self, index: int) -> dict:
        n = len(self.ds)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        index %= n
        failed = []
        for attempt in range(min(n, self.max_tries)):
            row = (index + attempt) % n
            record = self.ds[row]
            cell = record[self.image_column]
            try:
                image = open_image(cell)
            except Exception as err:  # corrupt / missing file: never crash a long run
                self._record_skip(row, cell, err)
                failed.append((row, _cell_name(cell), err))
                continue
            # randomness keyed by the requested index, so a replacement row does not copy row+1's crop
            return self._make(image, record[self.caption_column], index, attempt, self.target_size(index), record)
        raise unreadable_error(self.source, failed, len(failed), n)


class StreamingCaptionImageDataset(_SampleMaker, torch.utils.data.IterableDataset):
    """Iterable torch dataset over a streaming HF ``IterableDataset`` (same sample dicts as the map-style one).

    Shuffling (if ``data_cfg.shuffle``) uses a ``buffer_size`` shuffle buffer seeded by ``seed`` and the epoch.
    The sample index is the position in this worker's stream interleaved across workers, so unlike the
    map-style dataset the randomness depends on the number of workers. Unreadable images are skipped
    and counted (``num_skipped`` on the next sample).
    """

    def __init__(self, hf_dataset: HFDataset, data_cfg, seed: int = 0, buffer_size: int = 1000, warn_every: int = 100):
        ds = self._setup(hf_dataset, data_cfg, seed, warn_every)
        self.ds = ds.shuffle(seed=self.seed, buffer_size=buffer_size) if data_cfg.shuffle else ds

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(self.epoch)  # reshuffles shards and buffer

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        pending, failed, yielded = 0, [], False
        for pos, row in enumerate(self.ds):  # datasets shards the stream across workers itself
            index = pos * nw + wid
            cell = row[self.image_column]
            try:
                image = open_image(cell)
            except Exception as err:
                self._record_skip(index, cell, err)
                pending += 1
                if len(failed) < 5:  # named in the error if nothing in this stream is readable
                    failed.append((index, _cell_name(cell), err))
                continue
            yield self._make(image, self._streamed_caption(row[self.caption_column], index, cell), index, pending,
                             record=row)
            pending, yielded = 0, True
        if pending and not yielded:
            raise unreadable_error(self.source, failed, pending, pending)


def make_caption_dataset(hf_dataset: HFDataset, data_cfg, seed: int = 0):
    """Wrap a HF dataset in the matching torch dataset (map-style or streaming)."""
    if hasattr(hf_dataset, "__len__"):
        return CaptionImageDataset(hf_dataset, data_cfg, seed)
    return StreamingCaptionImageDataset(hf_dataset, data_cfg, seed)


def build_train_dataset(data_cfg, seed: int = 0, cache_dir: Optional[str] = None):
    """``load_caption_dataset`` + ``make_caption_dataset``: the torch dataset the trainer wraps in a DataLoader."""
    return make_caption_dataset(load_caption_dataset(data_cfg, cache_dir=cache_dir), data_cfg, seed)


def data_issues(dataset, unreadable: int = 0) -> dict[str, int]:
    """Rows skipped or changed, by reason, for a run's summary (reasons with a zero count left out):
    ``unreadable_image`` (skipped; ``unreadable`` is the sum of the batches' ``num_skipped``) and
    ``missing_caption`` (trained with ``""``, ``data.missing_caption=empty``)."""
    base = getattr(dataset, "base", dataset)  # the feature cache wraps the caption dataset
    issues = {"unreadable_image": int(unreadable), **getattr(base, "data_issues", {})}
    return {reason: n for reason, n in issues.items() if n}


def describe_data_issues(issues: dict[str, int]) -> str:
    """``data_issues`` in words, for the end-of-run line (empty when there were none)."""
    words = {"unreadable_image": "skipped {} unreadable image(s)",
             "missing_caption": "{} row(s) without a caption trained with ''"}
    return "; ".join(words.get(reason, reason + ": {}").format(n) for reason, n in issues.items())


def collate(batch: Iterable[dict]) -> dict:
    """Stack samples: ``pixel_values`` FloatTensor[B,3,H,W], ``caption`` list[str], ``original_size`` and
    ``crop_top_left`` LongTensor[B,2], ``index`` LongTensor[B], ``num_skipped`` int (sum over the batch), and
    ``loss_mask`` FloatTensor[B,1,H,W] when the samples have one."""
    batch = list(batch)
    if not batch:
        raise ValueError("collate got an empty batch")
    masks = {"loss_mask": torch.stack([b["loss_mask"] for b in batch])} if "loss_mask" in batch[0] else {}
    return {
        **masks,
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]).contiguous(),
        "caption": [b["caption"] for b in batch],
        "original_size": torch.tensor([b["original_size"] for b in batch], dtype=torch.long),
        "crop_top_left": torch.tensor([b["crop_top_left"] for b in batch], dtype=torch.long),
        "index": torch.tensor([b["index"] for b in batch], dtype=torch.long),
        "num_skipped": int(sum(b["num_skipped"] for b in batch)),
    }
