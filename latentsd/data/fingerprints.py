"""Content fingerprints and cache keys: sha256 over everything that affects a cached entry."""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from typing import Any, Optional

import torch

from .datasets import open_image

CACHE_FORMAT = 1
"""Bump when the stored layout or meaning of entries changes (part of every key)."""

PREPROCESS_VERSION = "to_rgb(white matte, exif)+resize_shortest_side(lanczos<, bicubic>)+center_crop+[-1,1]/v1"
"""The pixel pipeline of transforms.py that latents depend on; change it when that code changes."""

STORE_DTYPE = torch.float32


# =========================================================================== fingerprints

_FINGERPRINTS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, str]]" = weakref.WeakKeyDictionary()
_VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "torch_dtype", "dtype", "name_or_path"}


def _sha(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _weights_signature(module: torch.nn.Module) -> tuple:
    # Cheap identity of the current weights: storage, shape, dtype and autograd version counter (bumped by
    # every in-place op, optimizer steps and load_state_dict included).
    return tuple((name, t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device))
                 for name, t in module.state_dict(keep_vars=True).items())


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach()
    h.update(json.dumps([str(t.dtype), list(t.shape)]).encode())
    flat = t.to("cpu").contiguous().reshape(-1)
    if flat.numel():
        h.update(memoryview(flat.view(torch.uint8).numpy()))


def module_fingerprint(module: torch.nn.Module, refresh: bool = False) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes), streamed tensor by tensor.

    Remembered per module object and recomputed only when a tensor is replaced or modified in place
    through autograd-visible ops. Writes through ``.data`` bypass that check: pass ``refresh=True``.
    """
    sig = _weights_signature(module)
    hit = _FINGERPRINTS.get(module)
    if hit is not None and hit[0] == sig and not refresh:
        return hit[1]
    h = hashlib.sha256(b"latentsd-weights-v1\0")
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode() + b"\0")
        _hash_tensor(h, tensor)
    digest = h.hexdigest()
    _FINGERPRINTS[module] = (sig, digest)
    return digest


def _config_dict(module: Any) -> dict:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    return {k: v for k, v in d.items() if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides a tokenizer's ids: vocab (added tokens included), merges / backend model,
    normalizer and pre-tokenizer, ``model_max_length`` and the special token ids."""
    h = hashlib.sha256(b"latentsd-tokenizer-v1\0")
    head = {
        "class": type(tokenizer).__name__,
        "model_max_length": tokenizer.model_max_length,
        **{k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")},
    }
    h.update(json.dumps(head, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call-time state that tokenizer(...) calls change: not identity
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True, ensure_ascii=False).encode())
    else:  # a slow tokenizer: its BPE merges
        ranks = getattr(tokenizer, "bpe_ranks", {})
        h.update(json.dumps(sorted((list(k), v) for k, v in ranks.items())).encode())
    return h.hexdigest()


def _hash_pixels(h, img) -> None:
    h.update(b"pixels\0")
    h.update(json.dumps([img.mode, list(img.size), img.getexif().get(0x0112, 1)]).encode())
    h.update(img.tobytes())


def _local_path(cell: Any) -> Optional[str]:
    """The local file a cell reads its bytes from (None: bytes in the cell, a PIL image, or a remote URL)."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return None
        cell = cell.get("path")
    if isinstance(cell, (str, os.PathLike)):
        p = os.fspath(cell)
        return None if "://" in p else p
    return None


def _hash_file(path: str) -> str:
    h = hashlib.sha256(b"file\0")
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image_digest(cell: Any) -> str:
    """sha256 of an image cell's content: its encoded file bytes where it has them (bytes, a local path),
    else its decoded pixels (a PIL image, a remote path). Raises on an unreadable cell."""
    from PIL import Image as PILImage

    if isinstance(cell, PILImage.Image):
        h = hashlib.sha256()
        _hash_pixels(h, cell)
        return h.hexdigest()
    if isinstance(cell, (bytes, bytearray)):
        cell = {"bytes": bytes(cell)}
    if isinstance(cell, dict) and cell.get("bytes"):
        h = hashlib.sha256(b"file\0")
        h.update(cell["bytes"])
        return h.hexdigest()
    path = _local_path(cell)
    if path is not None:
        return _hash_file(path)
    h = hashlib.sha256()
    _hash_pixels(h, open_image(cell))
    return h.hexdigest()


# =========================================================================== keys


def latent_context(vae: Any, resolution: int, store_dtype: torch.dtype = STORE_DTYPE) -> str:
    """Hash of everything a latent entry depends on except the image and the flip."""
    return _sha({
        "kind": "latents", "format": CACHE_FORMAT, "preprocess": PREPROCESS_VERSION,
        "resolution": int(resolution), "crop": "center",
        "vae": module_fingerprint(vae), "vae_config": _config_dict(vae), "vae_dtype": str(vae.dtype),
        "tiling": bool(getattr(vae, "use_tiling", False)), "store_dtype": str(store_dtype),
    })


def latent_key(context: str, digest: str, flip: bool, size: Optional[tuple[int, int]] = None) -> str:
    """An image's latent entry: ``size=(h, w)`` is an aspect bucket's (the image resized to cover it and
    center-cropped to it), None the square ``resolution`` of the context. Pass a square bucket as None (its
    pixels are the square's): :func:`bucket_size` does."""
    variant = f"{context}\0{digest}\0{'flip' if flip else 'plain'}"
    if size is not None:
        variant += f"\0bucket {int(size[0])}x{int(size[1])}"
    return hashlib.sha256(variant.encode()).hexdigest()


def bucket_size(size: Optional[tuple[int, int]], resolution: int) -> Optional[tuple[int, int]]:
    """A sample's output size as a cache key part: None for the square ``resolution`` (bucketed or not)."""
    if size is None or (int(size[0]), int(size[1])) == (int(resolution), int(resolution)):
        return None
    return int(size[0]), int(size[1])


def text_context(tokenizer: Any, text_encoder: Any, clip_skip: Optional[int] = None,
                 store_dtype: torch.dtype = STORE_DTYPE) -> str:
    """Hash of everything a text entry depends on except the caption."""
    return _sha({
        "kind": "text", "format": CACHE_FORMAT, "max_chunks": 1,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "encoder": module_fingerprint(text_encoder), "encoder_config": _config_dict(text_encoder),
        "encoder_dtype": str(text_encoder.dtype), "clip_skip": clip_skip, "store_dtype": str(store_dtype),
    })


def text_key(context: str, caption: str) -> str:
    return hashlib.sha256(f"{context}\0".encode() + caption.encode("utf-8")).hexdigest()


