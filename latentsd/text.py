"""Prompts → CLIP conditioning. One module for the pipeline, the trainer and validation.

Long prompts are split into 75-token chunks, each wrapped in BOS/EOS and encoded separately, and the
results concatenated along the sequence axis (the A1111 / compel convention). ``clip_skip=k`` takes
the hidden state ``k`` layers before the last and applies the final layer norm, as diffusers does.
The unconditional embedding is the encoding of the empty prompt ``""``, the same string the trainer
substitutes for a dropped caption, so guidance and caption dropout agree by construction.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

logger = logging.getLogger(__name__)


class PromptEncoder:
    """Tokenize and encode prompts with a CLIP tokenizer/text encoder pair.

    ``max_chunks`` bounds the length of a prompt to ``max_chunks * (model_max_length - 2)`` tokens;
    anything beyond is dropped with a warning naming what was dropped. ``device`` is where the token
    ids go: the pipeline passes its execution device (under CPU / sequential offload the encoder's
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

    def tokenize(self, prompts: Sequence[str], num_chunks: int | None = None) -> torch.Tensor:
        """Token ids ``[B, num_chunks, window]``; ``num_chunks`` defaults to what the longest prompt needs."""
        ids = self.tokenizer(list(prompts), add_special_tokens=False, truncation=False).input_ids
        if num_chunks is None:
            num_chunks = min(self.max_chunks, max(1, max(math.ceil(len(i) / self.body) for i in ids)))
        keep = num_chunks * self.body
        for prompt, tok in zip(prompts, ids):
            if len(tok) > keep:
                dropped = self.tokenizer.decode(tok[keep:])
                logger.warning("prompt is longer than %d tokens; dropped: %r (raise max_chunks to keep it)", keep, dropped)
        tk = self.tokenizer
        out = torch.full((len(ids), num_chunks, self.window), tk.pad_token_id, dtype=torch.long)
        for b, tok in enumerate(ids):
            for c in range(num_chunks):
                piece = tok[c * self.body:(c + 1) * self.body]
                out[b, c, : len(piece) + 2] = torch.tensor([tk.bos_token_id, *piece, tk.eos_token_id])
        return out

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

    def encode_pair(self, prompts: Sequence[str], negative_prompts: Sequence[str] | None,
                    clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional embeddings of equal length (negatives default to ``""``)."""
        negative_prompts = [""] * len(prompts) if negative_prompts is None else list(negative_prompts)
        ids = self.tokenize(list(prompts) + negative_prompts)  # one chunk count for both halves
        embeds = self.encode_ids(ids, clip_skip)
        return embeds[: len(prompts)], embeds[len(prompts):]
