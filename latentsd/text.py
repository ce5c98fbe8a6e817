"""Prompts → CLIP conditioning. One module for the pipeline, the trainer and validation.

Two entry points:

* :meth:`PromptEncoder.encode` (generation): by default exactly diffusers' ``encode_prompt`` — one
  77-token window, longer prompts truncated with diffusers' warning. ``long_prompts=True`` splits prompts
  into 75-token chunks, each wrapped in BOS/EOS and encoded separately, concatenated along the sequence
  axis (the A1111 / compel convention); a prompt with fewer chunks than the batch's longest gets whole
  padding chunks, and the returned mask (``encoder_attention_mask`` for the UNet: 1 keep, 0 discard)
  hides them, so a prompt's conditioning is the same alone or batched with longer prompts.
  ``weighting=True`` reads A1111's ``(word:1.3)`` syntax (:mod:`latentsd.prompt_weights`).
* ``PromptEncoder(...)(captions)`` (training, caches): the plain path, no syntax, ``max_chunks`` chunks, no mask.

``clip_skip=k`` takes the hidden state ``k`` layers before the last and applies the final layer norm, as
diffusers does. The unconditional embedding is the encoding of the empty prompt ``""``, the same string the
trainer substitutes for a dropped caption, so guidance and caption dropout agree by construction.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from .prompt_weights import BREAK, parse_prompt_weights

logger = logging.getLogger(__name__)

# diffusers' wording (StableDiffusionPipeline.encode_prompt), so logs read the same
TRUNCATED = ("The following part of your input was truncated because CLIP can only handle sequences up to"
             " {window} tokens: {removed}")

Chunk = list[tuple[int, float]]  # (token id, weight) pairs between BOS and EOS


def emphasize(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's emphasis: scale each token's hidden state by its weight, then rescale each chunk so its mean
    equals the unweighted mean. ``hidden`` ``[B, n * window, D]``, ``weights`` ``[B, n, window]``.

    The rescale is per prompt and chunk (A1111 takes the mean over the whole batch, which would make a
    prompt's encoding depend on its batch). Where a chunk's mean is ~0 relative to its values (an encoder
    whose final layer norm has no bias, like a freshly initialised one) the ratio is noise and is skipped.
    """
    batch, chunks, window = weights.shape
    z = hidden.float().reshape(batch, chunks, window, -1)
    weighted = z * weights.to(z.device, torch.float32)[..., None]
    before, after = z.mean(dim=(2, 3), keepdim=True), weighted.mean(dim=(2, 3), keepdim=True)
    floor = 1e-4 * z.abs().mean(dim=(2, 3), keepdim=True)
    usable = (before.abs() > floor) & (after.abs() > floor)
    scale = torch.where(usable, before / torch.where(usable, after, 1.0), 1.0)
    return (weighted * scale).reshape(hidden.shape).to(hidden.dtype)


class PromptEncoder:
    """Tokenize and encode prompts with a CLIP tokenizer/text encoder pair.

    ``max_chunks`` bounds the length of a chunked prompt to ``max_chunks * (model_max_length - 2)``
    tokens; anything beyond is dropped with a warning naming what was dropped. ``device`` is where the
    token ids go: the pipeline passes its execution device (under CPU / sequential offload the encoder's
    parameters sit on the CPU or on ``meta``); None = the device of the encoder's parameters.
    """

    def __init__(self, tokenizer, text_encoder, max_chunks: int = 3, device: torch.device | str | None = None):
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be >= 1, got {max_chunks}")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_chunks = max_chunks
        self.device = device
        self.window = tokenizer.model_max_length  # 77 for CLIP
        self.body = self.window - 2  # tokens per chunk between BOS and EOS

    # ---- generation ---------------------------------------------------------------------------------
    def encode(self, prompts: str | Sequence[str], *, clip_skip: int | None = None, long_prompts: bool = False,
               weighting: bool = False, num_chunks: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(embeds [B, n * window, D], mask [B, n * window] long or None)`` for ``prompts``.

        Default: diffusers' encoding (one window, truncated with its warning). ``long_prompts``: 75-token
        chunks, ``n`` = the longest prompt's chunk count (at most ``max_chunks``). ``num_chunks`` fixes ``n``
        (e.g. negatives for given ``prompt_embeds``). A prompt with fewer chunks than ``n`` gets padding
        chunks whose mask is 0; the mask is None when no chunk is padding. ``weighting``: A1111 weights.
        Encode a prompt batch and its negatives in one call so that both halves get the same ``n``.
        """
        prompts = _as_prompts(prompts)
        if num_chunks is not None and num_chunks < 1:
            raise ValueError(f"num_chunks must be >= 1 or None, got {num_chunks}")
        limit = self.max_chunks if long_prompts else 1
        limit = limit if num_chunks is None else min(limit, num_chunks)
        kept = self._chunk_batch(prompts, limit, weighting, truncation_message=not long_prompts)
        ids, weights, real = self._pack(kept, num_chunks or max(map(len, kept)))
        embeds = self.encode_ids(ids, clip_skip)
        if weighting:
            embeds = emphasize(embeds, weights)
        mask = None if real.all() else real.repeat_interleave(self.window, dim=1).long().to(embeds.device)
        return embeds, mask

    # ---- plain captions (trainer, caches) -----------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], num_chunks: int | None = None) -> torch.Tensor:
        """Token ids ``[B, num_chunks, window]``; ``num_chunks`` defaults to what the longest prompt needs."""
        limit = self.max_chunks if num_chunks is None else num_chunks
        kept = self._chunk_batch(list(prompts), limit, weighting=False, truncation_message=False)
        return self._pack(kept, num_chunks or max(map(len, kept)))[0]

    def encode_ids(self, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
        """``[B, n, window]`` ids → ``[B, n * window, D]`` hidden states."""
        batch, chunks, window = ids.shape
        device = self.device if self.device is not None else next(self.text_encoder.parameters()).device
        flat = ids.reshape(batch * chunks, window).to(device)
        if clip_skip is None:
            hidden = self.text_encoder(flat)[0]
        else:
            states = self.text_encoder(flat, output_hidden_states=True).hidden_states
            # transformers 5 puts final_layer_norm on the model itself; 4.x on its .text_model
            model = getattr(self.text_encoder, "module", self.text_encoder)  # under DDP
            model = getattr(model, "text_model", model)
            hidden = model.final_layer_norm(states[-(clip_skip + 1)])
        return hidden.reshape(batch, chunks * window, -1)

    def __call__(self, prompts: str | Sequence[str], clip_skip: int | None = None,
                 num_chunks: int | None = None) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self.encode_ids(self.tokenize(prompts, num_chunks), clip_skip)

    # ---- tokens -------------------------------------------------------------------------------------
    def chunks(self, prompt: str, weighting: bool = False) -> list[Chunk]:
        """``prompt`` as chunks of at most ``body`` (token, weight) pairs; ``BREAK`` starts a new chunk.

        With ``weighting`` each A1111 fragment is tokenized on its own and its tokens carry its weight.
        """
        fragments = parse_prompt_weights(prompt) if weighting else [(prompt, 1.0)]
        texts = [text for text, weight in fragments if weight is not BREAK]
        ids = iter(self.tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False).input_ids
                   if texts else [])  # verbose=False: no "longer than 77" warning, we chunk or warn ourselves
        segments: list[Chunk] = [[]]
        for _, weight in fragments:
            if weight is BREAK:
                segments.append([])
            else:
                segments[-1].extend((token, weight) for token in next(ids))
        if len(segments) > 1 and not segments[-1]:
            segments.pop()  # a trailing BREAK adds nothing (as in A1111)
        return [seg[i:i + self.body] for seg in segments for i in range(0, max(len(seg), 1), self.body)]

    def _chunk_batch(self, prompts: list[str], limit: int, weighting: bool,
                     truncation_message: bool) -> list[list[Chunk]]:
        """Each prompt's chunks, at most ``limit``; what is dropped is logged by name."""
        chunked = [self.chunks(p, weighting) for p in prompts]
        removed = [self.tokenizer.decode([t for chunk in c[limit:] for t, _ in chunk]) for c in chunked]
        removed = [r for r in removed if r]
        if removed and truncation_message:
            logger.warning(TRUNCATED.format(window=self.window, removed=removed)
                           + " (long_prompts=True, or --long-prompts, encodes them in 75-token chunks)")
        elif removed:
            hint = " (raise max_chunks to keep it)" if limit == self.max_chunks else ""
            logger.warning("prompt is longer than %d tokens; dropped: %s%s", limit * self.body, removed, hint)
        return [c[:limit] for c in chunked]

    def _pack(self, prompts: list[list[Chunk]], num_chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids ``[B, n, window]`` (a padding chunk is the empty prompt's), weights ``[B, n, window]``, and
        which chunks are real ``[B, n]``."""
        tk = self.tokenizer
        ids = torch.full((len(prompts), num_chunks, self.window), tk.pad_token_id, dtype=torch.long)
        ids[:, :, :2] = torch.tensor([tk.bos_token_id, tk.eos_token_id])
        weights = torch.ones(ids.shape)
        real = torch.zeros(ids.shape[:2], dtype=torch.bool)
        for b, chunks in enumerate(prompts):
            for c, chunk in enumerate(chunks):
                tokens = [t for t, _ in chunk]
                ids[b, c, : len(chunk) + 2] = torch.tensor([tk.bos_token_id, *tokens, tk.eos_token_id])
                weights[b, c, 1: len(chunk) + 1] = torch.tensor([w for _, w in chunk])
                real[b, c] = True
        return ids, weights, real


def _as_prompts(prompts) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r:.200}")
    return list(prompts)
