"""Textual inversion: new tokens whose embedding vectors are learned, everything else frozen (``ti.*``).

The trainer calls four small pieces, none of which it branches on (:func:`make_textual_inversion` gives a no-op
object when ``ti.tokens`` is empty):

- at start, the tokens are added to the tokenizer with diffusers' names for several vectors (``<tok>``,
  ``<tok>_1``, ... ``<tok>_{n-1}``; a prompt's ``<tok>`` expands to all of them, as in
  ``TextualInversionLoaderMixin.maybe_convert_prompt``);
- :meth:`TextualInversion.add_rows` swaps the text encoder's token embedding for :class:`NewTokenEmbedding`: the
  existing rows stay the frozen base embedding (bit-identical at the end: they are never in the optimizer, so
  neither weight decay nor EMA touches them) and the new tokens' rows are one separate fp32 parameter;
- :meth:`TextualInversion.prompt_encoder` expands the training captions exactly as the pipeline expands prompts;
- :meth:`TextualInversion.export` writes, per token, diffusers' ``<name>/learned_embeds.safetensors``
  (``{token: [n, D]}``, for ``pipe.load_textual_inversion``) and A1111's ``<name>.safetensors`` (``emb_params``;
  A1111 takes the token from the file name), and puts a plain text encoder with the new rows (and the tokenizer
  with the new tokens) into the exported model folder.

With ``lora.enabled`` the LoRA adapters train beside the vectors: pivotal tuning.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from ..config import token_file_stem
from ..io import write_file_atomically
from ..text import PromptEncoder

logger = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"  # <output_dir>/embeddings/ (beside model/ and lora/)
DIFFUSERS_WEIGHT_NAME = "learned_embeds.safetensors"
A1111_KEY = "emb_params"


class NewTokenEmbedding(nn.Module):
    """A token embedding whose ids ``>= first_id`` read the rows of ``new`` (trainable, fp32); the others read
    ``base`` (frozen, any dtype). The output has the base's dtype."""

    def __init__(self, base: nn.Embedding, first_id: int, init: torch.Tensor):
        super().__init__()
        self.base, self.first_id = base, first_id
        self.new = nn.Parameter(init.detach().to(base.weight.device, torch.float32).clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.first_id
        old = self.base(ids.masked_fill(is_new, 0))
        new = nn.functional.embedding((ids - self.first_id).clamp(0, len(self.new) - 1), self.new)
        return torch.where(is_new[..., None], new.to(old.dtype), old)


def vector_names(token: str, num_vectors: int) -> list[str]:
    """diffusers' names of a token's vectors: ``<tok>``, ``<tok>_1``, ... (``load_textual_inversion`` adds these)."""
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


class TextualInversion:
    """``ti.tokens`` added to ``tokenizer`` (ids ``first_id`` onward); see the module docstring."""

    enabled = True

    def __init__(self, ti_cfg, tokenizer):
        self.cfg, self.tokenizer = ti_cfg, tokenizer
        self.names = {t: vector_names(t, ti_cfg.num_vectors) for t in ti_cfg.tokens}
        added = [name for names in self.names.values() for name in names]
        vocab = tokenizer.get_vocab()
        known = [name for name in added if name in vocab or len(tokenizer.tokenize(name)) == 1]
        if known:  # adding a known word would change the meaning of every prompt that uses it
            raise ValueError(f"ti.tokens: the tokenizer already knows {known} (one token each): pick new words, "
                             f"e.g. '<{token_file_stem(known[0]) or 'sks'}>'")
        self.first_id = len(tokenizer)
        tokenizer.add_tokens(added)
        ids = tokenizer.convert_tokens_to_ids(added)
        if ids != list(range(self.first_id, self.first_id + len(added))):
            raise ValueError(f"ti.tokens: the tokenizer gave the new tokens ids {ids}, not the next free ones")
        self.embedding: NewTokenEmbedding | None = None

    # ---- training --------------------------------------------------------------------------------
    def add_rows(self, text_encoder) -> list[nn.Parameter]:
        """Swap ``text_encoder``'s token embedding for a :class:`NewTokenEmbedding` (after it was cast and moved, and
        after LoRA adapters were added: those freeze everything else); returns the trainable parameter."""
        base = text_encoder.get_input_embeddings()
        if base.weight.shape[0] < self.first_id:
            raise ValueError(f"the text encoder has {base.weight.shape[0]} token embeddings but the tokenizer "
                             f"{self.first_id} tokens: they do not belong together")
        self.embedding = NewTokenEmbedding(base, self.first_id, self.initial_vectors(base.weight))
        text_encoder.set_input_embeddings(self.embedding)
        return [self.embedding.new]

    def initial_vectors(self, weight: torch.Tensor) -> torch.Tensor:
        """``[k, D]``: each token's vectors start as the embeddings of ``ti.init_word``'s tokens, cycled (empty: the
        mean embedding of the vocabulary)."""
        k = sum(map(len, self.names.values()))
        word = self.cfg.init_word.strip()
        if not word:
            return weight[:self.first_id].float().mean(0).expand(k, -1)
        ids = self.tokenizer(word, add_special_tokens=False).input_ids
        if not ids or max(ids) >= self.first_id:
            raise ValueError(f"ti.init_word={word!r} must be made of words the tokenizer knew before ti.tokens "
                             "were added, e.g. the class of the concept ('dog', 'triangle')")
        rows = [ids[j % len(ids)] for names in self.names.values() for j in range(len(names))]
        return weight[rows].float()

    def prompt_encoder(self, tokenizer, text_encoder, **kwargs) -> PromptEncoder:
        return MultiVectorPromptEncoder(tokenizer, text_encoder, **kwargs)

    def vectors(self) -> dict[str, torch.Tensor]:
        """``{token: [num_vectors, D]}``: the learned vectors (fp32, CPU)."""
        rows = self.embedding.new.detach().to("cpu", torch.float32)
        out, start = {}, 0
        for token, names in self.names.items():
            out[token], start = rows[start:start + len(names)].clone(), start + len(names)
        return out

    # ---- export ----------------------------------------------------------------------------------
    def export(self, pipe, path: Path, dtype: torch.dtype, source=None) -> None:
        """Embedding files into ``path.parent / embeddings`` (in ``dtype``), and into ``pipe`` a plain text encoder
        holding the new rows: ``source``'s (the untouched weights, when the trained one was cast) or a copy of the
        trained one. A text encoder LoRA has already been merged into ``pipe.text_encoder``."""
        vectors = self.vectors()
        text_encoder = pipe.text_encoder
        if isinstance(text_encoder.get_input_embeddings(), NewTokenEmbedding):  # the trained module (or a copy)
            text_encoder = source.text_encoder if source is not None else _plain_copy(text_encoder)
        pipe.text_encoder = with_new_rows(text_encoder, self.first_id, torch.cat(list(vectors.values())))
        save_embeddings(path.parent / EMBEDDINGS_DIR, vectors, dtype)


class NoTextualInversion:
    """``ti.tokens`` empty: nothing added, captions encoded as they are, nothing exported."""

    enabled = False

    def add_rows(self, text_encoder) -> list[nn.Parameter]:
        return []

    def prompt_encoder(self, tokenizer, text_encoder, **kwargs) -> PromptEncoder:
        return PromptEncoder(tokenizer, text_encoder, **kwargs)

    def export(self, pipe, path: Path, dtype: torch.dtype, source=None) -> None:
        pass


def make_textual_inversion(ti_cfg, tokenizer) -> TextualInversion | NoTextualInversion:
    """Call once, before the tokenizer is used for training captions (it gains the new tokens)."""
    return TextualInversion(ti_cfg, tokenizer) if ti_cfg.enabled else NoTextualInversion()


class MultiVectorPromptEncoder(PromptEncoder):
    """:class:`~latentsd.text.PromptEncoder` whose captions first expand each multi-vector token to all its vectors,
    with diffusers' own ``maybe_convert_prompt`` (what every pipeline runs on its prompts)."""

    def tokenize(self, prompts, num_chunks=None):
        from diffusers.loaders import TextualInversionLoaderMixin

        prompts = TextualInversionLoaderMixin().maybe_convert_prompt(list(prompts), self.tokenizer)
        return super().tokenize(prompts, num_chunks)


def _plain_copy(text_encoder):
    copied = copy.deepcopy(text_encoder)
    copied.set_input_embeddings(copied.get_input_embeddings().base)
    return copied


def with_new_rows(text_encoder, first_id: int, rows: torch.Tensor):
    """``text_encoder`` (changed in place) with a token embedding of ``first_id + len(rows)`` rows: its first
    ``first_id`` rows, then ``rows``, as diffusers' ``load_textual_inversion`` resizes and fills it."""
    old = text_encoder.get_input_embeddings().weight
    weight = torch.cat([old.detach()[:first_id], rows.to(old.device, old.dtype)])
    embedding = nn.Embedding(*weight.shape, device=weight.device, dtype=weight.dtype)
    embedding.weight.data.copy_(weight)
    embedding.requires_grad_(False)
    text_encoder.set_input_embeddings(embedding)
    text_encoder.config.vocab_size = weight.shape[0]
    return text_encoder


def save_embeddings(folder: str | Path, vectors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict:
    """Per token: ``folder/<name>/learned_embeds.safetensors`` (diffusers: ``{token: [n, D]}``) and
    ``folder/<name>.safetensors`` (A1111: ``{"emb_params": [n, D]}``; A1111's token is the file name ``<name>``, the
    token without ``<>``). Both load with ``pipe.load_textual_inversion`` and :func:`latentsd.generate.load_embedding`.
    Returns ``{token: {"diffusers": path, "a1111": path}}``."""
    from safetensors.torch import save_file

    folder, out = Path(folder), {}
    for token, v in vectors.items():
        stem, v = token_file_stem(token), v.detach().to("cpu", dtype).contiguous()
        files = {"diffusers": (folder / stem / DIFFUSERS_WEIGHT_NAME, {token: v}),
                 "a1111": (folder / f"{stem}.safetensors", {A1111_KEY: v})}
        out[token] = {kind: write_file_atomically(p, lambda tmp, sd=sd: save_file(sd, str(tmp)))
                      for kind, (p, sd) in files.items()}
    return out
