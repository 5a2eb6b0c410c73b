"""Test helper: a tiny SentencePiece model trained on the fly.

The real UMT5 tokenizer is 4 MB and not available offline, so tests that need
token ids train a throw-away unigram model with the T5 id conventions
(pad 0, eos 1, unk 2, no bos) from generated English-like sentences.
"""

from __future__ import annotations

import random
from pathlib import Path

_SUBJECTS = [
    "a cat", "the dog", "an old man", "a young woman", "two children", "a red car",
    "the astronaut", "a small robot", "the horse", "a flock of birds", "the dancer",
    "a sailing boat", "the chef", "a golden retriever", "the knight", "a dragon",
]
_VERBS = [
    "walks", "runs", "jumps", "dances", "sleeps", "flies", "swims", "drives",
    "smiles", "turns around", "looks at the camera", "waves", "eats", "reads",
    "climbs", "rolls", "sings", "paints", "cooks", "falls slowly",
]
_PLACES = [
    "in the park", "on the beach", "through a forest", "across the street",
    "under the rain", "at sunset", "in a snowy village", "inside a kitchen",
    "on a mountain", "near the river", "in outer space", "on a busy market",
    "through neon lit streets", "over the ocean", "in a quiet library",
]
_STYLES = [
    "cinematic lighting", "slow motion", "close-up shot", "wide angle", "4k",
    "highly detailed", "soft focus", "handheld camera", "dramatic shadows",
    "vivid colors", "film grain", "aerial view", "tracking shot", "golden hour",
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
    """Train a tiny SentencePiece model in ``tmp_path``; return the ``.model`` path.

    Ids follow T5: pad 0, eos 1, unk 2, no bos. ``hard_vocab_limit=False`` lets
    the trainer stop below ``vocab_size`` when the corpus is too small, so the
    result has at most ``vocab_size`` pieces (fits any encoder vocab >= it).
    """
    import sentencepiece as spm

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(tiny_sentences(seed=seed)) + "\n", encoding="utf-8")
    prefix = tmp_path / "tiny_spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")
