"""A1111 prompt-weighting syntax → ``(text, weight)`` fragments.

The syntax of AUTOMATIC1111's web UI, with its semantics:

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1; brackets nest and
  multiply (``((text))`` = 1.21);
* ``(text:1.3)`` multiplies it by 1.3 (any number, also below 1 or negative);
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; another backslash is dropped, as in A1111;
* an unmatched ``)`` or ``]`` is literal text; a bracket still open at the end applies to the rest;
* ``BREAK`` (upper case, a word of its own) ends the current 75-token chunk (long prompts).

Weights apply to text, so they survive tokenization: each fragment is tokenized on its own and every
token it yields carries the fragment's weight (:mod:`latentsd.text` does that and applies the weights).
Scheduling (``[a:b:0.5]``), alternation (``[a|b]``) and ``AND`` are other A1111 features, not parsed here:
they stay plain text.
"""

from __future__ import annotations

import re

ROUND, SQUARE = 1.1, 1 / 1.1
BREAK = None  # the weight of a BREAK fragment: ("BREAK", None)

Fragment = tuple[str, float | None]

_TOKEN = re.compile(r"""
    \\[()\[\]\\]            # an escaped bracket or backslash
  | \\                      # a lone backslash (dropped)
  | :(?P<weight>[+-]?[.\d]+)\)   # the end of (text:1.3); A1111 allows no spaces here
  | [()\[\]]                # a bracket
  | [^\\()\[\]:]+           # plain text
  | :                       # a colon that ends no weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_weights(prompt: str) -> list[Fragment]:
    """Split ``prompt`` into ``(text, weight)`` fragments, adjacent equal weights merged.

    >>> parse_prompt_weights("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    ``BREAK`` comes back as ``("BREAK", None)``. A prompt without any text gives ``[("", 1.0)]``.
    """
    pieces: list[list] = []  # [text, weight]; a BREAK is ["BREAK", None]
    opened: dict[str, list[int]] = {"(": [], "[": []}  # index of the first piece inside each open bracket

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not BREAK:
                piece[1] *= factor

    for match in _TOKEN.finditer(prompt):
        token, weight = match.group(0), match.group("weight")
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token in ("(", "["):
            opened[token].append(len(pieces))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), _number(weight, prompt))
        elif token == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif token == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:
            _add_text(pieces, token)
    for kind, factor in (("(", ROUND), ("[", SQUARE)):  # brackets still open reach to the end
        for start in opened[kind]:
            scale(start, factor)
    return _merge(pieces)


def _number(text: str, prompt: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"prompt weight {text!r} is not a number in {prompt!r}: write e.g. (word:1.2), or "
                         r"escape a literal bracket as \( \)") from None


def _add_text(pieces: list[list], text: str) -> None:
    """Append plain text, turning each ``BREAK`` in it into a break piece."""
    for i, part in enumerate(_BREAK.split(text)):
        if i:
            pieces.append(["BREAK", BREAK])
        pieces.append([part, 1.0])


def _merge(pieces: list[list]) -> list[Fragment]:
    out: list[list] = []
    for text, weight in pieces:
        if weight is not BREAK and not text:
            continue
        if out and weight is not BREAK and out[-1][1] is not BREAK and out[-1][1] == weight:
            out[-1][0] += text
        else:
            out.append([text, weight])
    return [(t, w) for t, w in out] or [("", 1.0)]
