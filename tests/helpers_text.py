"""Test helper: a tiny SentencePiece model trained on the fly (``train_tokenizer``).

The real UMT5 tokenizer is 4 MB and not available offline, so tests that need
token ids train a throw-away unigram model with the T5 id conventions
(pad 0, eos 1, unk 2, no bos) from generated English-like sentences.
"""

from __future__ import annotations

import random
from pathlib import Path

_SUBJECTS = [
    "a cat",
    "the dog",
    "an old man",
    "a young woman",
    "two children",
    "a red car",
    "the astronaut",
    "a small robot",
    "the horse",
    "a flock of birds",
    "the dancer",
    "a sailing boat",
    "the chef",
    "a golden retriever",
    "the knight",
    "a dragon",
]
_VERBS = [
    "walks",
    "runs",
    "jumps",
    "dances",
    "sleeps",
    "flies",
    "swims",
    "drives",
    "smiles",
    "turns around",
    "looks at the camera",
    "waves",
    "eats",
    "reads",
    "climbs",
    "rolls",
    "sings",
    "paints",
    "cooks",
    "falls slowly",
]
_PLACES = [
    "in the park",
    "on the beach",
    "through a forest",
    "across the street",
    "under the rain",
    "at sunset",
    "in a snowy village",
    "inside a kitchen",
    "on a mountain",
    "near the river",
    "in outer space",
    "on a busy market",
    "through neon lit streets",
    "over the ocean",
    "in a quiet library",
]
_STYLES = [
    "cinematic lighting",
    "slow motion",
    "close-up shot",
    "wide angle",
    "4k",
    "highly detailed",
    "soft focus",
    "handheld camera",
    "dramatic shadows",
    "vivid colors",
    "film grain",
    "aerial view",
    "tracking shot",
    "golden hour",
]


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    # Made-up words give the trainer enough distinct substrings to reach a
    # vocabulary of ~1000 pieces; the English phrases alone stop near 150.
    cons, vows = "bcdfghklmnprstvz", "aeiou"
    words = set()
    while len(words) < n:
        k = rng.randint(2, 4)
        words.add("".join(rng.choice(cons) + rng.choice(vows) for _ in range(k)))
    return sorted(words)


def tiny_sentences(n: int = 800, seed: int = 0) -> list[str]:
    """``n`` deterministic video-prompt-like sentences."""
    rng = random.Random(seed)
    names = _pseudo_words(rng, 1500)
    out = []
    for _ in range(n):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_PLACES)}"
        if rng.random() < 0.7:
            s += ", " + ", ".join(rng.sample(_STYLES, rng.randint(1, 3)))
        s += " " + " ".join(rng.sample(names, rng.randint(2, 6)))
        if rng.random() < 0.3:
            s = s.capitalize() + "."
        out.append(s)
    return out


def make_tiny_spm(tmp_path: Path, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Train a tiny SentencePiece model (``train_tokenizer``: T5 ids, at most
    ``vocab_size`` pieces) and write it to ``tmp_path``; return the ``.model`` path."""
    from wanrender.models.random_init import train_tokenizer

    path = Path(tmp_path) / "tiny_spm.model"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(train_tokenizer(corpus=tiny_sentences(seed=seed), vocab=vocab_size))
    return path
