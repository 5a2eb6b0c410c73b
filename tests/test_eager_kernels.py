"""The eager path's fused kernels: the fp8 row quantiser (kernels/quant_rows.py) and the
VAE's channel norm + SiLU (kernels/vae_norm.py).

On the CPU (no Triton in CI): the VAE's blocks hand norm-then-SiLU to a kernel in one
call and fall back to the ops when it declines; the row quantiser's guard falls back on
a mismatch. The stand-in kernel in the first test is the module's own PyTorch ops (a
test double: Triton kernels cannot run here). On a GPU (marked): the kernels against
the PyTorch ops, bytes for the quantiser, one unit in the last place for the norm."""

from __future__ import annotations

import pytest
import torch

from wanrender.kernels import quant_rows as qr
from wanrender.kernels.linear import quantize_rows
from wanrender.models.vae import ChannelRMSNorm, ResBlock, TimeCache, VAEConfig, WanVAE


def _resblock(seed: int = 0) -> ResBlock:
    torch.manual_seed(seed)
    block = ResBlock(8, 8).eval()
    for m in block.modules():
        if isinstance(m, ChannelRMSNorm):
            m.gamma.data.uniform_(0.5, 1.5)
    return block


def test_a_block_hands_norm_and_silu_to_the_kernel_in_one_call() -> None:
    block = _resblock()
    x = torch.randn(1, 8, 3, 6, 5)
    with torch.no_grad():
        ref = block(x, TimeCache())
        calls = []
        for norm in (m for m in block.modules() if isinstance(m, ChannelRMSNorm)):

            def stand_in(
                t, gamma, scale, silu, reference, out=None
            ):  # the module's ops: what the Triton kernel computes
                calls.append((silu, out is not None))
                return reference(t) if out is None else out.copy_(reference(t))

            norm.kernel = stand_in
        got = block(x, TimeCache())
    # both norms of the block, each fused with its SiLU and written into its conv's frame buffer
    assert calls == [(True, True), (True, True)]
    assert torch.equal(got, ref)


def test_a_kernel_that_declines_leaves_the_ops() -> None:
    block = _resblock(1)
    x = torch.randn(1, 8, 2, 4, 4)
    with torch.no_grad():
        ref = block(x, TimeCache())
        for m in block.modules():
            if isinstance(m, ChannelRMSNorm):
                m.kernel = lambda *a: None
        assert torch.equal(block(x, TimeCache()), ref)


def test_no_vae_kernels_off_cuda() -> None:
    from wanrender.kernels.vae_norm import ChannelNormKernel, enable_vae_kernels

    vae = WanVAE(VAEConfig.preset("demo")).eval()
    assert enable_vae_kernels(vae) == 0
    assert all(m.kernel is None for m in vae.modules() if isinstance(m, ChannelRMSNorm))
    x = torch.randn(1, 8, 2, 4, 4, dtype=torch.bfloat16)
    assert ChannelNormKernel()(x, torch.ones(8), 8**0.5, True, None) is None  # a CPU tensor: the ops


def test_the_row_quantiser_declines_the_cpu_and_falls_back_on_a_mismatch(caplog) -> None:
    rq = qr.RowQuant()
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    assert not rq.usable(x)
    q, s = rq(x, quantize_rows)  # the reference's result
    rq_, rs_ = quantize_rows(x)
    assert torch.equal(q.view(torch.uint8), rq_.view(torch.uint8)) and torch.equal(s, rs_)
    wrong = rq_.view(torch.uint8).clone()
    wrong[0, 0] ^= 1
    rq._check(x, wrong.view(qr.FP8), rs_, quantize_rows)
    assert rq.broken and "differ" in caplog.text
    assert not rq.usable(x.cuda() if torch.cuda.is_available() else x)


# ---------------------------------------------------------------------------- on a GPU


def _rows(m: int, k: int, dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-4, 3, m)[:, None]
    x[1] = 0.0  # an all-zero row: amax clamps to 1e-12
    x[2, :4] = torch.tensor([448.0, -1e-3, 3e-5, -7.5])
    return x.to(dtype).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("k", [16, 80, 5120, 13824])
def test_gpu_row_quantiser_gives_quantize_rows_bytes(k) -> None:
    dtype = torch.bfloat16  # what the DiT's activations are on a GPU; fp16 rows are declined
    assert not qr.RowQuant().usable(torch.zeros(2, k, dtype=torch.float16, device="cuda"))
    x = _rows(300, k, dtype)
    q, s = qr.quant_rows_triton(x)
    rq, rs = quantize_rows(x)
    assert torch.equal(s, rs)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
    # A row-strided view (a slice of a wider tensor) gives the same as its copy.
    wide = _rows(64, 2 * k, dtype, seed=1)
    q2, s2 = qr.quant_rows_triton(wide[:, :k])
    rq2, rs2 = quantize_rows(wide[:, :k].contiguous())
    assert torch.equal(s2, rs2) and torch.equal(q2.view(torch.uint8), rq2.view(torch.uint8))


@pytest.mark.gpu
def test_gpu_fp8_linear_is_the_same_with_the_fused_quantiser(monkeypatch) -> None:
    from wanrender.kernels import linear
    from wanrender.models.common import Linear

    torch.manual_seed(0)
    layer = Linear(512, 256).cuda()
    torch.nn.init.normal_(layer.weight, std=0.02)
    torch.nn.init.normal_(layer.bias, std=0.02)  # Linear leaves it uninitialised (NaN never equals NaN)
    linear.enable_fp8(layer)
    x = torch.randn(3, 77, 512, device="cuda", dtype=torch.bfloat16)
    fused = linear.fp8_rowwise(layer, x)
    assert qr.row_quant() is not None and qr.row_quant().broken is None
    monkeypatch.setattr(linear, "row_quant", lambda: None)
    assert torch.equal(fused, linear.fp8_rowwise(layer, x))


@pytest.mark.gpu
@pytest.mark.parametrize("c", [96, 192, 384])
@pytest.mark.parametrize("silu", [False, True])
def test_gpu_vae_norm_within_one_ulp(c, silu) -> None:
    from wanrender.kernels.vae_norm import channel_rms_norm

    torch.manual_seed(c)
    norm = ChannelRMSNorm(c, 3).cuda().to(torch.bfloat16)
    norm.gamma.data.uniform_(0.5, 1.5)
    x = (torch.randn(1, c, 4, 24, 40, device="cuda") * 3).to(torch.bfloat16)
    with torch.no_grad():
        ref = norm(x, silu=silu)
        got = channel_rms_norm(x, norm.gamma, norm.scale, silu)
    # bf16 keeps 8 significant bits: one unit in the last place is at most 2^-7 relative.
    rel = ((got.float() - ref.float()).abs() / ref.float().abs().clamp_min(1e-6)).max().item()
    assert rel <= 2.0**-7 + 1e-6
    assert (got != ref).float().mean().item() < 0.01  # the odd rounding, not a different formula


def test_the_vae_norm_kernel_takes_both_dense_layouts_only() -> None:
    from wanrender.kernels.vae_norm import pixel_strides

    x = torch.randn(2, 8, 3, 4, 5)
    assert pixel_strides(x) == (60, 1)
    assert pixel_strides(x.contiguous(memory_format=torch.channels_last_3d)) == (1, 8)
    assert pixel_strides(torch.randn(2, 8, 4, 5).contiguous(memory_format=torch.channels_last)) == (1, 8)
    assert pixel_strides(x[:, :, :, :, :3]) is None  # a crop: pixels not at one stride
    assert pixel_strides(x.transpose(3, 4)) is None
    assert pixel_strides(x[:, ::2]) is None  # every other channel


def test_the_norm_writes_into_a_frame_buffer_only_where_laid_out_alike() -> None:
    from wanrender.kernels.vae_norm import writes_into

    cl = torch.channels_last_3d
    x = torch.randn(1, 8, 4, 5, 6).contiguous(memory_format=cl)
    buf = torch.empty(1, 8, 6, 5, 6).contiguous(memory_format=cl)
    assert writes_into(x, buf[:, :, 2:])  # behind two remembered frames, one sample
    assert not writes_into(
        x.contiguous(), torch.empty(1, 8, 6, 5, 6)[:, :, 2:]
    )  # channels-first: channel stride differs
    two = torch.empty(2, 8, 6, 5, 6).contiguous(memory_format=cl)[:, :, 2:]
    assert not writes_into(torch.randn(2, 8, 4, 5, 6).contiguous(memory_format=cl), two)  # batch stride differs
    assert not writes_into(x, buf[:, :, 1:])  # another shape
    assert not writes_into(x, buf[:, :, 2:].half())


@pytest.mark.gpu
def test_gpu_vae_norm_writes_into_a_frame_buffer() -> None:
    from wanrender.kernels.vae_norm import channel_rms_norm

    torch.manual_seed(5)
    norm = ChannelRMSNorm(96, 3).cuda().to(torch.bfloat16)
    x = (
        (torch.randn(1, 96, 4, 24, 40, device="cuda") * 3)
        .to(torch.bfloat16)
        .contiguous(memory_format=torch.channels_last_3d)
    )
    buf = torch.zeros(1, 96, 6, 24, 40, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d
    )
    got = channel_rms_norm(x, norm.gamma, norm.scale, True, out=buf[:, :, 2:])
    assert got.data_ptr() == buf[:, :, 2:].data_ptr()
    assert torch.equal(buf[:, :, 2:], channel_rms_norm(x, norm.gamma, norm.scale, True))
    assert not buf[:, :, :2].any()  # the remembered frames' slots untouched
    # a channels-first buffer: laid out unlike x, so the kernel's result arrives by a copy
    from wanrender.kernels.vae_norm import ChannelNormKernel

    first = torch.zeros(1, 96, 6, 24, 40, device="cuda", dtype=torch.bfloat16)
    xf = x.contiguous()
    got = ChannelNormKernel()(xf, norm.gamma, norm.scale, True, lambda t: norm(t, silu=True), first[:, :, 2:])
    assert got is not None and got.data_ptr() == first[:, :, 2:].data_ptr()
    assert torch.equal(first[:, :, 2:], channel_rms_norm(xf, norm.gamma, norm.scale, True))


@pytest.mark.gpu
@pytest.mark.parametrize("silu", [False, True])
def test_gpu_vae_norm_channels_last_matches_channels_first(silu) -> None:
    from wanrender.kernels.vae_norm import channel_rms_norm

    torch.manual_seed(7)
    norm = ChannelRMSNorm(192, 3).cuda().to(torch.bfloat16)
    norm.gamma.data.uniform_(0.5, 1.5)
    x = (torch.randn(1, 192, 4, 24, 40, device="cuda") * 3).to(torch.bfloat16)
    first = channel_rms_norm(x, norm.gamma, norm.scale, silu)
    last = channel_rms_norm(x.contiguous(memory_format=torch.channels_last_3d), norm.gamma, norm.scale, silu)
    assert last.is_contiguous(memory_format=torch.channels_last_3d)
    assert torch.equal(first, last)  # the same per-pixel arithmetic, only addresses differ


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_vae_decode_with_the_fused_norm_matches(channels_last) -> None:
    from wanrender.kernels.vae_norm import enable_vae_kernels
    from wanrender.models.random_init import init_random_
    from wanrender.pipeline import i2v

    vae = WanVAE(VAEConfig.preset("wan2.1")).to("cuda", torch.bfloat16).eval()
    init_random_(vae, seed=3)
    lat = torch.randn(1, 16, 3, 32, 40, generator=torch.Generator().manual_seed(4))
    ref = i2v.decode(vae, lat)
    assert enable_vae_kernels(vae) > 0
    got = i2v.decode(vae.set_channels_last(channels_last), lat)
    diff = abs(got.astype("int16") - ref.astype("int16"))
    assert diff.max() <= 3 and diff.mean() < 0.05  # the convolutions' and norm's summation order


def _attention():
    from wanrender.models.dit import Attention, DiTConfig, rope_tables

    cfg = DiTConfig.preset("demo")
    torch.manual_seed(0)
    att = Attention(cfg).eval()
    for m in att.modules():
        if isinstance(m, torch.nn.Linear) or hasattr(m, "in_features"):
            torch.nn.init.normal_(m.weight, std=0.05)
            torch.nn.init.zeros_(m.bias)
    for n in (att.norm_q, att.norm_k):
        n.weight.data.uniform_(0.5, 1.5)
    return att, cfg, rope_tables(cfg, (2, 3, 4), torch.device("cpu"))


def test_attention_hands_norm_and_rotation_to_the_kernel() -> None:
    att, cfg, rope = _attention()
    x = torch.randn(2, 24, cfg.dim)
    ctx = torch.randn(2, 7, cfg.dim)
    attn = torch.nn.functional.scaled_dot_product_attention

    def sdpa(q, k, v):
        return attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    with torch.no_grad():
        ref_self, ref_cross = att(x, sdpa, rope=rope), att(x, sdpa, context=ctx)
        seen = []

        def stand_in(y, norm, r, reference):  # the module's ops: what the Triton kernel computes
            seen.append((tuple(y.shape), r is not None))
            return reference(y).flatten(-2)

        att.norm_rope = stand_in
        assert torch.equal(att(x, sdpa, rope=rope), ref_self)
        assert torch.equal(att(x, sdpa, context=ctx), ref_cross)
        att.norm_rope = lambda *a: None  # a kernel that declines: the ops
        assert torch.equal(att(x, sdpa, rope=rope), ref_self)
    assert seen == [
        ((2, 24, cfg.dim), True),
        ((2, 24, cfg.dim), True),
        ((2, 24, cfg.dim), False),
        ((2, 7, cfg.dim), False),
    ]


def test_no_norm_rope_kernel_off_cuda() -> None:
    from wanrender.kernels.qk_norm import NormRope, enable_norm_rope

    att, cfg, rope = _attention()
    assert enable_norm_rope(att) == 0 and att.norm_rope is None
    y = torch.randn(1, 24, cfg.dim, dtype=torch.bfloat16)
    assert NormRope()(y, att.norm_q, rope, None) is None


def test_the_norm_rope_check_takes_the_modules_result_and_rejects_another(caplog) -> None:
    from wanrender.kernels.qk_norm import NormRope

    att, cfg, rope = _attention()
    y = torch.randn(2, 24, cfg.dim).to(torch.bfloat16)

    def reference(t):
        return att._plain_norm_rope(t, att.norm_q, rope)

    right = reference(y).flatten(-2)  # what the kernel returns: [..., L, D]
    fused = NormRope()
    fused._check(y, right, reference)
    assert fused.broken is None and y.device in fused.checked
    wrong = right.clone()
    wrong[0, 0, :8] *= 1.1
    fused = NormRope()
    fused._check(y, wrong, reference)
    assert fused.broken and "tolerance" in caplog.text


@pytest.mark.gpu
@pytest.mark.parametrize("with_rope", [False, True])
def test_gpu_norm_rope_within_two_ulp(with_rope) -> None:
    from wanrender.kernels import excess_error
    from wanrender.kernels.qk_norm import norm_rope_triton
    from wanrender.models.dit import Attention, DiTConfig, rope_tables

    cfg = DiTConfig.preset("i2v-A14B")  # 5120 wide, 40 heads of 128
    att = Attention(cfg).cuda()
    for n in (att.norm_q, att.norm_k):
        n.weight.data.uniform_(0.5, 1.5)
    rope = rope_tables(cfg, (3, 8, 10), torch.device("cuda")) if with_rope else None
    y = (torch.randn(2, 240, cfg.dim, device="cuda") * 4).to(torch.bfloat16)
    with torch.no_grad():
        ref = att._plain_norm_rope(y, att.norm_q, rope)
        got = norm_rope_triton(y, att.norm_q.weight, att.norm_q.eps, rope).unflatten(-1, (cfg.num_heads, -1))
    assert excess_error(got, ref) <= 1.0
    assert (got != ref).float().mean().item() < 0.02  # the odd rounding, not a different formula


@pytest.mark.gpu
def test_gpu_tiny_dit_forward_with_the_fused_kernels() -> None:
    """A demo-size DiT on the GPU in bf16: the fused norms and the quantiser on against
    off, the whole forward within bf16 noise."""
    from wanrender.bench.synthetic import random_dit
    from wanrender.kernels.linear import enable_fp8
    from wanrender.kernels.ln_mod import enable_norm_mod
    from wanrender.kernels.qk_norm import enable_norm_rope

    dev = torch.device("cuda")
    m = random_dit(dev, seed=0, fp8=False, preset="demo")
    enable_fp8(m)
    g = torch.Generator(device="cuda").manual_seed(1)
    cfg = m.cfg
    x = torch.randn(1, 16, 3, 16, 16, generator=g, device="cuda")
    cond = torch.randn(1, cfg.in_channels - 16, 3, 16, 16, generator=g, device="cuda")
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device="cuda") * 0.1
    t = torch.tensor([900.0], device="cuda")
    with torch.no_grad():
        ref = m(x, t, ctx, cond)
        assert enable_norm_rope(m) > 0 and enable_norm_mod(m) > 0
        got = m(x, t, ctx, cond)
    cos = torch.nn.functional.cosine_similarity(got.flatten().double(), ref.flatten().double(), dim=0).item()
    assert cos > 0.9999


def test_kernels_attach_by_the_compute_device_not_where_weights_sit(monkeypatch) -> None:
    """A streamed expert keeps its weights on the host and computes on the GPU: the
    kernels attach by the device the engine computes on. (Triton's import is the only
    stand-in here: CI has no Triton; nothing runs on a GPU.)"""
    import wanrender.kernels as k
    from wanrender.kernels.ln_mod import NormModulate, enable_norm_mod
    from wanrender.kernels.qk_norm import NormRope, enable_norm_rope
    from wanrender.kernels.vae_norm import ChannelNormKernel, enable_vae_kernels

    monkeypatch.setattr(k, "triton_importable", lambda: True)
    block, _, _ = _block()
    assert enable_norm_mod(block) == 0 and enable_norm_mod(block, "cuda") == 1
    assert isinstance(block.norm_mod, NormModulate)
    att, _, _ = _attention()
    assert enable_norm_rope(att) == 0 and att.norm_rope is None  # weights and compute on the CPU
    assert enable_norm_rope(att, "cuda") == 1 and isinstance(att.norm_rope, NormRope)
    vae = WanVAE(VAEConfig.preset("demo")).eval()
    n = enable_vae_kernels(vae, torch.device("cuda"))
    norms = [m for m in vae.modules() if isinstance(m, ChannelRMSNorm)]
    assert n == len(norms) > 0 and all(isinstance(m.kernel, ChannelNormKernel) for m in norms)
    assert len({id(m.kernel) for m in norms}) == 1  # one shared kernel object (one check per device)
    # and they decline host tensors at call time: the module's ops run
    x = torch.randn(1, 8, 2, 4, 4)
    assert norms[0].kernel(x, norms[0].gamma, norms[0].scale, True, None) is None


def _block():
    from wanrender.models.dit import Block, DiTConfig, rope_tables

    cfg = DiTConfig.preset("demo")
    torch.manual_seed(1)
    block = Block(cfg).eval()
    for name, p in block.named_parameters():
        torch.nn.init.normal_(p, std=0.05) if p.dim() > 1 else torch.nn.init.uniform_(p, 0.5, 1.5)
    return block, cfg, rope_tables(cfg, (2, 3, 4), torch.device("cpu"))


@pytest.mark.parametrize("chunks", [1, 3])
def test_a_block_hands_norm_modulate_and_cast_to_the_kernel(chunks) -> None:
    block, cfg, rope = _block()
    x = torch.randn(1, 24, cfg.dim)
    e = torch.randn(1, 6, cfg.dim) * 0.1
    ctx = torch.randn(1, 7, cfg.dim)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        ).transpose(1, 2)

    with torch.no_grad():
        ref = block(x.clone(), e, ctx, rope, sdpa, torch.float32, chunks=chunks)
        seen = []

        def stand_in(t, norm, shift, scale, dtype, reference):  # the block's ops: what the Triton kernel computes
            seen.append((norm is block.norm3, shift is None))
            return reference(t)

        block.norm_mod = stand_in
        got = block(x.clone(), e, ctx, rope, sdpa, torch.float32, chunks=chunks)
    assert torch.equal(got, ref)
    # norm1 (modulated), norm3 (its own affine, no modulation), norm2 (modulated), per chunk
    per = {1: [(False, False), (True, True), (False, False)]}.get(chunks)
    if per is not None:
        assert seen == per
    else:
        assert seen.count((True, True)) == chunks and len(seen) == 4 * chunks  # k/v, q, norm3, norm2 per chunk


def test_the_norm_mod_check_takes_the_blocks_result_and_rejects_another(caplog) -> None:
    from wanrender.kernels.ln_mod import NormModulate

    block, cfg, _ = _block()
    x = torch.randn(1, 24, cfg.dim)
    shift, scale = torch.randn(1, 1, cfg.dim), torch.randn(1, 1, cfg.dim) * 0.2

    def reference(t):
        return block._plain_normed(block.norm1, t, shift, scale, torch.bfloat16)

    right = reference(x)
    fused = NormModulate()
    fused._check(x, right, reference)
    assert fused.broken is None
    wrong = right.clone()
    wrong[0, 0, :4] *= 1.1
    fused = NormModulate()
    fused._check(x, wrong, reference)
    assert fused.broken and "tolerance" in caplog.text
    assert not NormModulate().applies(x, block.norm1, shift, torch.bfloat16)  # a host tensor: the ops


@pytest.mark.gpu
@pytest.mark.parametrize("affine", [False, True])
def test_gpu_norm_mod_within_two_ulp(affine) -> None:
    from wanrender.kernels import excess_error
    from wanrender.kernels.ln_mod import ln_mod_triton
    from wanrender.models.common import FP32LayerNorm
    from wanrender.models.dit import Block

    d = 5120
    norm = FP32LayerNorm(d, 1e-6, elementwise_affine=affine).cuda()
    if affine:
        norm.weight.data.uniform_(0.5, 1.5)
        norm.bias.data.normal_()
    x = torch.randn(2, 300, d, device="cuda") * 3 + 0.5
    mod = (torch.randn(2, 6, d, device="cuda") * 0.3).unsqueeze(2).unbind(1)  # the block's strided views
    shift, scale = (None, None) if affine else (mod[0], mod[1])
    with torch.no_grad():
        ref = Block._plain_normed(norm, x, shift, scale, torch.bfloat16)
        got = ln_mod_triton(x, norm, shift, scale, torch.bfloat16)
    assert excess_error(got, ref) <= 1.0
    assert (got != ref).float().mean().item() < 0.02


def test_the_vae_norm_check_takes_the_modules_result_and_rejects_another(caplog) -> None:
    from wanrender.kernels.vae_norm import ChannelNormKernel

    norm = ChannelRMSNorm(8, 3)
    norm.gamma.data.uniform_(0.5, 1.5)
    x = torch.randn(1, 8, 3, 4, 5, dtype=torch.bfloat16)
    with torch.no_grad():
        right = norm._plain(x, True)
        fused = ChannelNormKernel()
        key = (x.device, False)  # checked per device and layout
        fused._check(key, x, right, lambda t: norm._plain(t, True))
        assert fused.broken is None and fused.checked == {key}
        wrong = right.clone()
        wrong[0, :, 0, 0, 0] *= 1.1
        fused = ChannelNormKernel()
        fused._check(key, x, wrong, lambda t: norm._plain(t, True))
    assert fused.broken and "tolerance" in caplog.text
