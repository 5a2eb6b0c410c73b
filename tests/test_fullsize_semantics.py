"""Full-size shapes against the official Wan 2.2 formulas, written out here by hand.

Issue #14 (full-size parity with ComfyUI) bisected the stages on the CPU; these pin
what was verified there at the real sizes that the tiny parity tests never reach:
RoPE for head dim 128 on the 81-frame 832x1216 token grid (21 x 76 x 52), the
patch/unpatch order for a non-square grid, and the I2V conditioning layout for 81
frames. Each reference below restates the official code's semantics (tables for
1024 positions per axis, complex128, split 22/21/21 complex channels).
"""

from __future__ import annotations

import torch

from wanrender.models.dit import DiTConfig, apply_rope, rope_tables, unpatchify
from wanrender.models.vae import VAEConfig, WanVAE
from wanrender.pipeline.i2v import image_condition, latent_shape

FULL = DiTConfig()  # i2v-A14B: dim 5120, 40 heads, head dim 128
GRID = (21, 76, 52)  # 81 x 1216 (h) x 832 (w) pixels -> latent 21 x 152 x 104 -> patches of 1x2x2


def _official_rotations(head_dim: int, grid: tuple[int, int, int], theta: float = 10000.0) -> torch.Tensor:
    """Complex128 [L, head_dim // 2]: one table of 1024 positions per axis over the whole
    half head dim, split (c - 2*(c//3), c//3, c//3), each part's frequencies over its own size."""
    c = head_dim // 2
    sizes = (c - 2 * (c // 3), c // 3, c // 3)
    tables = []
    for n in sizes:
        dim = 2 * n
        inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        ang = torch.outer(torch.arange(1024, dtype=torch.float64), inv)
        tables.append(torch.polar(torch.ones_like(ang), ang))
    f, h, w = grid
    rot = torch.cat(
        [
            tables[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            tables[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            tables[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return rot.reshape(f * h * w, -1)


def test_rope_tables_match_official_on_the_full_size_grid() -> None:
    ours = torch.view_as_complex(rope_tables(FULL, GRID, torch.device("cpu"))[:, 0]).to(torch.complex128)
    ref = _official_rotations(FULL.head_dim, GRID)
    assert ours.shape == ref.shape == (21 * 76 * 52, 64)
    assert (ours - ref).abs().max().item() < 1e-6  # complex64 storage of float64 angles


def test_apply_rope_matches_official_for_head_dim_128() -> None:
    g = torch.Generator().manual_seed(0)
    f, h, w = 3, 76, 52  # the full spatial extent: positions up to 75 and 51
    heads = 2
    x = torch.randn(1, f * h * w, heads, FULL.head_dim, generator=g)
    ours = apply_rope(x, rope_tables(FULL, (f, h, w), x.device))
    xc = torch.view_as_complex(x.double().reshape(1, f * h * w, heads, -1, 2))
    ref = torch.view_as_real(xc * _official_rotations(FULL.head_dim, (f, h, w))[None, :, None]).flatten(3)
    assert (ours.double() - ref).abs().max().item() < 1e-4


def test_unpatchify_inverts_the_patch_order_on_a_non_square_grid() -> None:
    """Token order is (frame, row, column), patch channels (pt, ph, pw, C) innermost,
    as the official unpatchify's einsum 'fhwpqrc->cfphqwr' reads them."""
    f, h, w, c = 2, 3, 5, 16
    pt, ph, pw = FULL.patch_size
    video = torch.randn(1, c, f * pt, h * ph, w * pw)
    tokens = video.reshape(1, c, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(1, f * h * w, -1)
    assert torch.equal(unpatchify(tokens, (f, h, w), FULL.patch_size, c), video)


def test_i2v_condition_layout_for_81_frames() -> None:
    """Official I2V: mask 1 for the 4 channels of latent frame 0 only (the first pixel
    frame repeated 4 times), then the latent of [image, zeros x 80] in [-1, 1]."""
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.preset("demo")).eval()
    image = torch.rand(3, 16, 24)
    cond = image_condition(vae, image, 81)
    assert tuple(cond.shape) == (1, 20, 21, 2, 3)
    assert latent_shape(81, 832, 1216) == (1, 16, 21, 152, 104)
    assert torch.equal(cond[:, :4, 0], torch.ones(1, 4, 2, 3))
    assert torch.equal(cond[:, :4, 1:], torch.zeros(1, 4, 20, 2, 3))
    video = torch.zeros(1, 3, 81, 16, 24)
    video[:, :, 0] = image * 2 - 1
    assert torch.equal(cond[:, 4:], vae.encode(video))
