"""A small CLIP-format BPE tokenizer, built deterministically, for tiny models trained offline.

Real models ship their own tokenizer (``tokenizer/`` in a diffusers folder). Tiny models built from a
config here need one that loads offline, so we train a byte-level BPE over a fixed word list: every word
in the list becomes a single token, any other text still tokenizes (it falls back to smaller pieces down
to single bytes). The files are the CLIP format (``vocab.json`` + ``merges.txt``), so
``transformers.CLIPTokenizer.from_pretrained(dir)`` loads them.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

BUILTIN_TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Every word here is one token. The shapes domain first, then common prompt words.
WORDS = """
a an the of on in at to and with without is are
red green blue yellow purple orange black white gray grey pink brown cyan magenta gold silver
circle square triangle star heart hexagon diamond cross ring shape shapes
left right top bottom center centre middle corner above below beside near
big small large tiny little huge
photo photograph picture image painting drawing sketch illustration render portrait landscape
of cat dog bird horse car house tree flower mountain river sea sky city street person man woman
child face sun moon cloud water fire snow forest beach night day light dark
beautiful detailed high quality realistic style art digital oil watercolor
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte → printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Learn merges until every word is a single token (ties broken alphabetically: deterministic)."""
    byte_map = bytes_to_unicode()
    corpus = {}
    for w in dict.fromkeys(words):
        chars = [byte_map[b] for b in w.encode("utf-8")]
        corpus[w] = chars[:-1] + [chars[-1] + "</w>"]
    merges = []
    while any(len(toks) > 1 for toks in corpus.values()):
        pairs = Counter(p for toks in corpus.values() for p in zip(toks, toks[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, toks in corpus.items():
            out, i = [], 0
            while i < len(toks):
                if i + 1 < len(toks) and (toks[i], toks[i + 1]) == best:
                    out.append(toks[i] + toks[i + 1])
                    i += 2
                else:
                    out.append(toks[i])
                    i += 1
            corpus[w] = out
    return merges


def write_tokenizer(out_dir: str | Path, words: list[str] = WORDS, max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json in CLIP format; returns ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = list(bytes_to_unicode().values())
    merges = train_bpe(words)
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


@lru_cache(maxsize=None)
def builtin_vocab_size() -> int:
    return len(json.loads((BUILTIN_TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8")))


def load_tokenizer(path: str | Path = "builtin", **kwargs):
    """Load a CLIPTokenizer from a folder / hub id, or the shipped one for ``"builtin"``.

    Uses ``from_pretrained``: with transformers 5.x ``CLIPTokenizer(vocab_file=…)`` ignores the files.
    """
    from transformers import CLIPTokenizer

    src = BUILTIN_TOKENIZER_DIR if str(path) == "builtin" else path
    return CLIPTokenizer.from_pretrained(str(src), **kwargs)


if __name__ == "__main__":  # regenerate the shipped files: python -m latentsd.tokenizer
    print(write_tokenizer(BUILTIN_TOKENIZER_DIR))
