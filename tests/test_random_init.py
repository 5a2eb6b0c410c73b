"""The one random-weight initialiser and the one tiny-tokenizer builder (CPU)."""

from __future__ import annotations

import math

import torch
from helpers_models import TINY_DIT
from torch import nn

from wanrender.models.dit import WanDiT
from wanrender.models.random_init import init_random_, random_lines, train_tokenizer
from wanrender.models.text_encoder import Tokenizer


def test_schemes_scale_each_kind_of_parameter() -> None:
    plain = dict(init_random_(WanDiT(TINY_DIT), seed=1, std=0.05).named_parameters())
    assert abs(plain["blocks.0.ffn.0.weight"].std().item() - 0.05) < 0.005
    gain = plain["blocks.0.self_attn.norm_q.weight"]
    assert abs(gain.mean().item() - 1) < 0.05 and gain.std().item() > 0  # gains near 1, never all 1
    fan = dict(init_random_(WanDiT(TINY_DIT), seed=1, fan_in=True).named_parameters())
    w = fan["blocks.0.ffn.0.weight"]  # [ffn, dim]: fan-in = dim
    assert abs(w.std().item() * math.sqrt(w.shape[1]) - 1) < 0.1
    mod = fan["blocks.0.modulation"]
    assert abs(mod.std().item() * math.sqrt(mod.shape[-1]) - 1) < 0.1
    assert all(p.abs().sum() > 0 for p in fan.values())


def test_seeded_in_name_order_and_filters() -> None:
    a, b = WanDiT(TINY_DIT), WanDiT(TINY_DIT)
    init_random_(a, seed=3)
    init_random_(b, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # only: the others keep their values and draw nothing
    m = nn.ModuleDict({"lin": nn.Linear(4, 4), "norm": nn.LayerNorm(4)})
    before = m["lin"].weight.detach().clone()
    init_random_(m, seed=0, gain_std=0.25, only=lambda name: name.startswith("norm."))
    assert torch.equal(m["lin"].weight, before)
    g = torch.Generator().manual_seed(0)  # name order: norm.bias, then norm.weight
    assert torch.equal(m["norm"].bias, 1 + 0.25 * torch.randn(4, generator=g))
    assert torch.equal(m["norm"].weight, 1 + 0.25 * torch.randn(4, generator=g))
    # one-byte (fp8) storage is left alone: its scale belongs to it
    q = nn.Linear(4, 4)
    q.weight = nn.Parameter(torch.ones(4, 4).to(torch.float8_e4m3fn), requires_grad=False)
    init_random_(q)
    assert torch.equal(q.weight.float(), torch.ones(4, 4))


def test_tokenizer_is_reproducible_and_fits_the_vocabulary() -> None:
    words = "snow bear cub fur light camera slow dolly".split()
    one = train_tokenizer(words, vocab=200, seed=0, lines=300, per_line=(3, 9))
    assert one == train_tokenizer(words, vocab=200, seed=0, lines=300, per_line=(3, 9))  # no paths, one thread
    tok = Tokenizer.from_bytes(one)
    assert tok.sp.get_piece_size() <= 200 and tok.pad_id == 0 and tok.eos_id == 1
    assert tok.sp.encode("snow bear") and tok.sp.unk_id() == 2
    assert one != train_tokenizer(words, vocab=200, seed=1, lines=300, per_line=(3, 9))
    # a fixed line length draws no lengths
    assert all(len(line.split()) == 10 for line in random_lines(words, 0, 5, 10))
