"""Seeded random stand-ins for trained artefacts: weights and a tiny tokenizer.

One initialiser and one tokenizer builder for the demo models, the benchmarks'
full-size random experts and the tests' tiny models. Speed does not depend on
values, and the demo only has to run the real code, so random is enough; but the
demo's files are hashed and its video is checked bit for bit, so the order of the
draws is part of the contract: parameters in name order, one ``randn`` each.

Imports only torch (sentencepiece inside the tokenizer builder).
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Sequence

import torch
from torch import nn


def is_gain(name: str) -> bool:
    """A normalisation gain (or its bias): it must sit near 1, never near 0."""
    return "norm" in name or name.rsplit(".", 1)[-1] == "gamma"


def init_random_(
    module: nn.Module,
    seed: int = 0,
    *,
    std: float = 0.02,
    gain_std: float = 0.1,
    fan_in: bool = False,
    only: Callable[[str], bool] | None = None,
) -> nn.Module:
    """Seeded normal values for ``module``'s parameters, in place; returns ``module``.

    Parameters are visited in name order and each gets one ``randn`` of its shape
    (float32, drawn on the parameters' device, so a full-size model on the GPU never
    passes through host memory):

    - with ``fan_in``, weights of >= 2 dimensions: N(0, 1/fan_in);
    - gains (``is_gain``): 1 + ``gain_std`` * N(0, 1);
    - with ``fan_in``, other tensors of >= 2 dimensions (the modulation tables):
      N(0, 1/last dim);
    - everything else: ``std`` * N(0, 1).

    ``fan_in`` keeps activations O(1) through many random layers (the demo runs its
    models end to end); plain ``std`` is what the benchmarks and tests use. ``only``
    (a name filter) leaves the other parameters untouched and draws nothing for them.
    Parameters stored in one byte (fp8 codes) are skipped: their scale belongs to them.
    """
    params = [
        (name, p)
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0])
        if p.is_floating_point() and p.element_size() > 1 and (only is None or only(name))
    ]
    if not params:
        return module
    dev = params[0][1].device
    g = torch.Generator(device=dev).manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=dev, dtype=torch.float32)

    with torch.no_grad():
        for name, p in params:
            leaf = name.rsplit(".", 1)[-1]
            if fan_in and p.dim() >= 2 and leaf == "weight":
                p.copy_(randn(p.shape) / math.sqrt(math.prod(p.shape[1:])))
            elif is_gain(name):
                p.copy_(1.0 + gain_std * randn(p.shape))
            elif fan_in and p.dim() >= 2:
                p.copy_(randn(p.shape) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(std * randn(p.shape))
    return module


def random_lines(words: Sequence[str], seed: int, lines: int, per_line: int | tuple[int, int]) -> list[str]:
    """``lines`` lines of words drawn from ``words``; ``per_line`` a count or a (min, max) range."""
    rng = random.Random(seed)
    lo, hi = (per_line, per_line) if isinstance(per_line, int) else per_line
    # A fixed count draws no length: the stream stays that of a fixed-length corpus.
    return [" ".join(rng.choice(words) for _ in range(lo if lo == hi else rng.randint(lo, hi))) for _ in range(lines)]


def train_tokenizer(
    words: Sequence[str] = (),
    *,
    vocab: int,
    seed: int = 0,
    lines: int = 2000,
    per_line: int | tuple[int, int] = (4, 14),
    corpus: Sequence[str] | None = None,
) -> bytes:
    """A tiny SentencePiece unigram model with T5's ids (pad 0, eos 1, unk 2, no bos),
    as the bytes of its ``.model`` file.

    Trained on ``corpus`` if given, else on ``random_lines(words, seed, lines, per_line)``.
    ``vocab`` is an upper bound (``hard_vocab_limit=False``: a small corpus stops
    below it), so the result fits any encoder whose vocabulary is at least ``vocab``.
    The corpus goes in and the model comes out through memory, so no file path is
    recorded in the model and the same arguments give the same bytes; one thread
    keeps the training itself deterministic.
    """
    import sentencepiece as spm

    text = list(corpus) if corpus is not None else random_lines(words, seed, lines, per_line)
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=out, vocab_size=vocab, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, num_threads=1,
        minloglevel=2,
    )  # fmt: skip
    return out.getvalue()
