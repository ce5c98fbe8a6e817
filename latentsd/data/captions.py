"""Caption recipes: which caption a sample trains with, after the pick, dropout, tags and template.

A sample's caption is made in this order (:class:`CaptionRecipe`):

1. **pick**: one caption of the row (uniformly from a list caption);
2. **caption dropout** (``data.caption_dropout``): the whole caption becomes exactly ``""``, the pipeline's
   unconditional prompt; nothing below touches a dropped caption;
3. **tags** (``data.shuffle_tags``, ``data.tag_dropout``): the caption is split on ``data.tag_separator`` into
   stripped tags (empty ones left out); the first ``data.keep_tokens`` tags stay first and in order, every
   other tag is dropped with probability ``data.tag_dropout``, and the survivors are shuffled; the tags are
   joined back with the separator and a space (``"a, b"``). With both off the caption is left untouched;
4. **template** (``data.caption_template``, e.g. ``"a photo of {caption}"`` or ``"{instance} {caption}"``):
   ``{caption}`` is the caption, ``{instance}`` is ``data.instance_token``; the result is stripped at both
   ends (so an empty caption with ``"{instance} {caption}"`` gives the token alone). ``"{caption}"`` (the
   default) leaves the caption untouched.

Steps 1-2 draw two numbers from the sample's generator (``sample_generator(seed, epoch, index)``, before the
transform's crop/flip draws), as they always have; step 3 draws from its own stream
(``sample_generator(seed, epoch, index, stream=TAG_STREAM)``), so turning tags on never moves a crop or flip,
and every caption is a function of (seed, epoch, index) only: exact resume, any number of workers or ranks.

Text caching keys on the caption string. A template is deterministic: its strings are cached
(:meth:`CaptionRecipe.variants`). Shuffled or dropped tags make too many strings to precompute, so
``cache.text`` is then refused with a logged reason (:attr:`CaptionRecipe.uncacheable_reason`) and captions are
encoded every step.
"""

from __future__ import annotations

import string
from typing import Any, Iterator, Optional, Sequence, Union

import torch

__all__ = ["TAG_STREAM", "TEMPLATE_FIELDS", "pick_caption", "caption_options", "split_tags", "template_problems",
           "CaptionRecipe"]

TAG_STREAM = 1
"""``sample_generator(..., stream=TAG_STREAM)``: the random stream of the tag shuffle and tag dropout."""

TEMPLATE_FIELDS = ("caption", "instance")


def pick_caption(caption: Union[str, Sequence[str], None], generator: torch.Generator,
                 dropout: float = 0.0) -> tuple[str, bool]:
    """``(one caption of the cell, dropped)``: uniform pick from a list, then caption dropout.

    Always draws two numbers from ``generator`` so the stream after it is the same for every row. A missing
    caption (None / empty list) is ``""`` (not dropped). A dropped caption is ``""``.
    """
    u_pick, u_drop = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
    if isinstance(caption, (list, tuple)):
        caption = caption[min(int(u_pick * len(caption)), len(caption) - 1)] if caption else ""
    if caption is None:
        caption = ""
    if not isinstance(caption, str):
        raise TypeError(f"caption must be a string or a list of strings, got {type(caption).__name__}: {caption!r}")
    return ("", True) if u_drop < dropout else (caption, False)


def caption_options(caption: Any) -> list[str]:
    """Every string :func:`pick_caption` may pick from this cell (dropout's ``""`` aside)."""
    if isinstance(caption, (list, tuple)):
        return [c if isinstance(c, str) else "" for c in caption] or [""]
    return [caption if isinstance(caption, str) else ""]


def split_tags(caption: str, separator: str = ",") -> list[str]:
    """The caption's tags: split on ``separator``, stripped, empty ones left out."""
    return [tag for tag in (t.strip() for t in caption.split(separator)) if tag]


def _template_fields(template: str) -> Iterator[tuple[str, str, Optional[str]]]:
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is not None:
            yield name, spec or "", conversion


def template_problems(template: str, instance: str = "") -> list[str]:
    """What is wrong with a caption template (empty list: nothing)."""
    try:
        fields = list(_template_fields(template))
    except ValueError as err:  # a lone "{" or "}"
        return [f"{template!r} is not a template ({err}); write literal braces as {{{{ and }}}}"]
    problems = []
    for name, spec, conversion in fields:
        if name not in TEMPLATE_FIELDS:
            problems.append(f"{template!r} has the field {{{name}}}; the fields are {{caption}} and {{instance}}")
        elif spec or conversion:
            problems.append(f"{template!r}: write {{{name}}} plainly (no format spec or !conversion)")
    if any(name == "instance" for name, *_ in fields) and not instance.strip():
        problems.append(f"{template!r} uses {{instance}} but data.instance_token is empty: set it (e.g. sks)")
    return problems


class CaptionRecipe:
    """Makes a sample's caption from its row's caption cell (see the module docstring for the steps)."""

    def __init__(self, *, dropout: float = 0.0, shuffle_tags: bool = False, keep_tokens: int = 0,
                 tag_dropout: float = 0.0, separator: str = ",", template: str = "{caption}", instance: str = ""):
        if not 0.0 <= dropout <= 1.0 or not 0.0 <= tag_dropout <= 1.0:
            raise ValueError(f"caption dropout and tag dropout must be in [0, 1], got {dropout}, {tag_dropout}")
        if keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
        if not separator:
            raise ValueError("the tag separator is empty: use e.g. ','")
        problems = template_problems(template, instance)
        if problems:
            raise ValueError("caption template: " + "; ".join(problems))
        self.dropout, self.shuffle_tags, self.keep_tokens = float(dropout), bool(shuffle_tags), int(keep_tokens)
        self.tag_dropout, self.separator, self.template, self.instance = float(tag_dropout), separator, template, instance
        self.joiner = separator if separator.isspace() else separator.rstrip() + " "

    @classmethod
    def from_config(cls, data_cfg: Any) -> "CaptionRecipe":
        """From a :class:`~latentsd.config.DataConfig` (keys a config lacks take their defaults)."""
        get = lambda key, default: getattr(data_cfg, key, default)  # noqa: E731
        return cls(dropout=get("caption_dropout", 0.0), shuffle_tags=get("shuffle_tags", False),
                   keep_tokens=get("keep_tokens", 0), tag_dropout=get("tag_dropout", 0.0),
                   separator=get("tag_separator", ","), template=get("caption_template", "{caption}"),
                   instance=get("instance_token", ""))

    @property
    def edits_tags(self) -> bool:
        return self.shuffle_tags or self.tag_dropout > 0

    @property
    def uncacheable_reason(self) -> Optional[str]:
        """Why the captions cannot be precomputed (None: they can, :meth:`variants` lists them)."""
        if self.edits_tags:
            return ("data.shuffle_tags / data.tag_dropout make a new caption string almost every step, too many "
                    "to precompute")
        return None

    def __call__(self, caption: Any, generator: torch.Generator, tag_generator: Optional[torch.Generator]) -> str:
        """The caption a sample trains with. ``generator``: the sample's (two draws); ``tag_generator``: its
        tag stream (needed only when tags are edited: :attr:`edits_tags`)."""
        text, dropped = pick_caption(caption, generator, self.dropout)
        return "" if dropped else self.finish(text, tag_generator)

    def finish(self, text: str, tag_generator: Optional[torch.Generator] = None) -> str:
        """Steps 3-4 on one picked, not dropped caption."""
        if self.edits_tags:
            if tag_generator is None:
                raise ValueError("editing tags needs the sample's tag generator")
            text = self.edit_tags(text, tag_generator)
        if self.template == "{caption}":
            return text
        return self.template.format(caption=text, instance=self.instance).strip()

    def edit_tags(self, text: str, generator: torch.Generator) -> str:
        """Keep the first ``keep_tokens`` tags, drop each other one with ``tag_dropout``, shuffle the rest."""
        tags = split_tags(text, self.separator)
        kept, rest = tags[:self.keep_tokens], tags[self.keep_tokens:]
        if rest and self.tag_dropout > 0:
            keep = torch.rand(len(rest), generator=generator, dtype=torch.float64) >= self.tag_dropout
            rest = [tag for tag, k in zip(rest, keep.tolist()) if k]
        if len(rest) > 1 and self.shuffle_tags:
            rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
        return self.joiner.join(kept + rest)

    def variants(self, caption: Any) -> list[str]:
        """Every caption this recipe can make of the cell, dropout's ``""`` aside (only without tag edits)."""
        reason = self.uncacheable_reason
        if reason:
            raise ValueError(f"the captions cannot be listed: {reason}")
        return [self.finish(c) for c in caption_options(caption)]

    def __repr__(self) -> str:
        return (f"CaptionRecipe(dropout={self.dropout}, shuffle_tags={self.shuffle_tags}, "
                f"keep_tokens={self.keep_tokens}, tag_dropout={self.tag_dropout}, separator={self.separator!r}, "
                f"template={self.template!r}, instance={self.instance!r})")
