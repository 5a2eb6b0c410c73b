"""Stage-by-stage parity with ComfyUI's own modules, on the CPU (issue #14).

ComfyUI is never part of this repository: the script imports it from the folder
given with ``--comfy`` (a checkout or an extracted tree) and only calls it. Its
small dependencies (einops, psutil, torchsde, ...) may live in a separate folder
given with ``--deps``, so no shared environment has to change.

Every stage builds one of our modules with seeded random weights, loads the same
state dict into ComfyUI's module (both use the official Wan key names) and
compares one computation in fp32:

- ``schedule``: the ``simple`` sigmas at shift 5 (4 steps), the KSamplerAdvanced
  slices, and the seed-42 noise at the real latent shape (81 x 832x1216);
- ``dit``: one forward of the I2V expert at full width (dim 5120, 40 heads,
  ffn 13824, in 36) with ``--layers`` blocks on a ``--grid`` latent (FxHxW);
- ``vae``: the full-size Wan 2.1 VAE: encode of the I2V conditioning video (image,
  then gray frames; ComfyUI's ``WanImageToVideo`` + ``process_latent_in``) against
  our ``image_condition``, and decode of a random latent (``--frames`` x ``--size``);
- ``drift`` (ours only, no ComfyUI): how far our bf16 path drifts from our fp32
  path over the 4-step two-expert loop, with full-width random blocks streamed one
  at a time (values drawn like ``wanrender models random``). This bounds what a
  numerics-only difference can do with random weights;
- ``codec`` (ours only): the same decoded frames of a random full-size VAE, written
  once as ComfyUI's SaveVideo writes them (libx264 defaults, yuv420p, 8-bit by
  truncation) and once by our writer (crf 18, rounding): PSNR between the two MP4s.
  Random weights give noise-like frames that H.264 cannot keep, so comparing MP4s
  measures the codecs, not the renders.

  PYTHONPATH=src python benchmarks/comfy_parity_cpu.py --comfy /tmp/comfy --deps /tmp/comfydeps --stage dit \
      --layers 2 --grid 21x16x24

Results measured on 2 CPU cores are in docs/pitfalls.md ("Parity with ComfyUI").
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float | None = None) -> float:
    """PSNR of ``a`` against reference ``b`` over ``b``'s value range (or the given one)."""
    a, b = a.double(), b.double()
    rng = peak_to_peak if peak_to_peak is not None else (b.max() - b.min()).item()
    mse = ((a - b) ** 2).mean().item()
    return 10 * math.log10(rng * rng / mse) if mse > 0 else float("inf")


def report(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    print(f"{name}: PSNR {psnr(ours, ref):.2f} dB, max abs diff {(ours - ref).abs().max().item():.3e}", flush=True)


def boot_comfy(comfy: str, deps: str | None) -> None:
    """Make ComfyUI importable as a library on a CPU-only torch."""
    sys.path[:0] = [comfy] + ([deps] if deps else [])
    import comfy.options

    # ComfyUI parses sys.argv when its cli_args module is first imported.
    comfy.options.enable_args_parsing()
    argv, sys.argv = sys.argv, ["comfy", "--cpu", "--use-pytorch-cross-attention"]
    try:
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = argv


def _stub_torchvision() -> None:
    """comfy.samplers imports every model family, and one of them (Cosmos) imports
    torchvision at import time only. A CPU environment without torchvision gets an
    empty stand-in module: nothing this script runs touches it."""
    import importlib.util
    import types

    if importlib.util.find_spec("torchvision") is None:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms})  # type: ignore[attr-defined]


def grid(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.lower().split("x"))


def stage_schedule() -> None:
    _stub_torchvision()
    import comfy.model_sampling as ms
    from comfy.sample import prepare_noise
    from comfy.samplers import calculate_sigmas

    from wanrender.pipeline.i2v import initial_noise, latent_shape
    from wanrender.pipeline.schedules import simple_sigmas

    class FlowSampling(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    sampling = FlowSampling(None)
    sampling.set_parameters(shift=5.0, multiplier=1000)
    ref = calculate_sigmas(sampling, "simple", 4).float()
    ours = simple_sigmas(4, 5.0)
    print(f"sigmas ComfyUI {ref.tolist()} ours {ours.tolist()} identical: {torch.equal(ref, ours)}")
    shape = latent_shape(81, 832, 1216)
    ref_noise, our_noise = prepare_noise(torch.zeros(shape), 42), initial_noise(42, shape)
    print(f"noise {tuple(shape)} seed 42 identical: {torch.equal(ref_noise, our_noise)}")


def stage_dit(layers: int, size: tuple[int, ...], dim: int) -> None:
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    from wanrender.models.dit import DiTConfig, WanDiT
    from wanrender.models.random_init import init_random_

    cfg = DiTConfig(dim=dim, ffn_dim=13824 if dim == 5120 else 2 * dim, num_heads=dim // 128, num_layers=layers)
    ours = init_random_(WanDiT(cfg).eval(), seed=1, fan_in=True)
    # Wan 2.2's I2V experts have no CLIP image branch: ComfyUI detects them as "t2v" with in_dim 36.
    ref = WanModel(model_type="t2v", in_dim=cfg.in_channels, dim=dim, ffn_dim=cfg.ffn_dim, num_heads=cfg.num_heads,
                   num_layers=layers, out_dim=cfg.out_channels, text_dim=cfg.text_dim,
                   operations=comfy.ops.disable_weight_init).eval()  # fmt: skip
    missing, unexpected = ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    g = torch.Generator().manual_seed(0)
    f, h, w = size
    x = torch.randn(1, 16, f, h, w, generator=g)
    cond = torch.randn(1, 20, f, h, w, generator=g)
    ctx = torch.zeros(1, 512, cfg.text_dim)
    ctx[:, :20] = 0.1 * torch.randn(1, 20, cfg.text_dim, generator=g)  # a prompt, then zero padding
    t = torch.tensor([937.5])
    t0 = time.time()
    a = ours(x, t, ctx, cond)
    b = ref(torch.cat([x, cond], 1), t, ctx)
    report(f"DiT dim {dim} x {layers} layers, latent {f}x{h}x{w} ({time.time() - t0:.0f} s)", a, b)


def stage_vae(frames: int, size: tuple[int, ...]) -> None:
    from comfy.latent_formats import Wan21
    from comfy.ldm.wan.vae import WanVAE as ComfyVAE

    from wanrender.models.random_init import init_random_
    from wanrender.models.vae import VAEConfig, WanVAE
    from wanrender.pipeline.i2v import image_condition

    h, w = size
    ours = init_random_(WanVAE(VAEConfig()).eval(), seed=3, fan_in=True)
    ref = ComfyVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                   temperal_downsample=[False, True, True]).eval()  # fmt: skip
    ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    fmt = Wan21()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, h, w, generator=g)
    pixels = torch.full((1, 3, frames, h, w), 0.5)  # WanImageToVideo: gray after the start image
    pixels[:, :, 0] = image
    with torch.no_grad():
        ref_latent = fmt.process_in(ref.encode(pixels * 2 - 1))
        cond = image_condition(ours, image, frames)
        report(f"VAE encode, I2V condition {frames}x{h}x{w}", cond[:, 4:], ref_latent)
        mask = torch.zeros_like(cond[:, :4])
        mask[:, :, 0] = 1  # ComfyUI: 1 - concat_mask, repeated to 4 channels
        print(f"I2V mask identical: {torch.equal(cond[:, :4], mask)}")
        z = torch.randn(1, 16, (frames - 1) // 4 + 1, h // 8, w // 8, generator=g)
        report(f"VAE decode {frames}x{h}x{w}", ours.decode(z), ref.decode(fmt.process_out(z)).clamp(-1, 1))


def stage_drift(layers: int, size: tuple[int, ...]) -> None:
    from wanrender.models import dit as D
    from wanrender.models.random_init import is_gain
    from wanrender.pipeline.schedules import simple_sigmas

    cfg = D.DiTConfig(num_layers=1)
    model = D.WanDiT(cfg).eval()
    block = model.blocks[0]

    def fill(module: torch.nn.Module, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        for name, p in sorted(module.named_parameters()):
            x = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.02 * x if is_gain(name) else (0.01 if name.endswith(".bias") else 0.02) * x)

    f, h, w = size
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 16, f, h, w, generator=g)
    cond = torch.cat([torch.zeros(1, 4, f, h, w), torch.randn(1, 16, f, h, w, generator=g)], 1)
    cond[:, :4, 0] = 1
    ctx = torch.zeros(1, 512, cfg.text_dim)
    ctx[:, :24] = 0.2 * torch.randn(1, 24, cfg.text_dim, generator=g)
    dtypes = (torch.float32, torch.bfloat16)

    def velocity(xs: dict, sigma: float, expert: int) -> dict:
        fill(model, 1000 * expert)
        states = {}
        for dt in dtypes:
            model.compute_dtype = dt
            tokens, grid_ = model.embed_tokens(xs[dt], cond)
            temb, e = model.embed_time(torch.tensor([sigma * 1000]))
            states[dt] = [tokens, temb, e, model.embed_text(ctx), D.rope_tables(cfg, grid_, tokens.device), grid_]
        head = {k: v.clone() for k, v in model.head.state_dict().items()}
        for i in range(layers):  # one block in memory: its weights are redrawn per layer
            fill(block, 1000 * expert + 1 + i)
            for dt, s in states.items():
                s[0] = block(s[0], s[2], s[3], s[4], model.attention, dt)
        model.head.load_state_dict(head)
        out = {}
        for dt, s in states.items():
            model.compute_dtype = dt
            out[dt] = D.unpatchify(model.head(s[0], s[1]), s[5], cfg.patch_size, cfg.out_channels)
        return out

    sig = [float(s) for s in simple_sigmas(4, 5.0)]
    xs = {dt: noise * sig[0] for dt in dtypes}
    with torch.no_grad():
        for i in range(4):
            v = velocity(xs, sig[i], 1 if i < 2 else 2)
            xs = {dt: xs[dt] + (sig[i + 1] - sig[i]) * v[dt] for dt in dtypes}
            print(f"step {i + 1}: velocity bf16 vs fp32 PSNR {psnr(v[dtypes[1]], v[dtypes[0]]):.2f} dB, "
                  f"latent {psnr(xs[dtypes[1]], xs[dtypes[0]]):.2f} dB", flush=True)  # fmt: skip


def stage_codec(size: tuple[int, ...]) -> None:
    from fractions import Fraction

    import av
    import numpy as np

    from wanrender.media.video import iter_video, write_video
    from wanrender.models.random_init import is_gain
    from wanrender.models.vae import VAEConfig, WanVAE
    from wanrender.pipeline.i2v import to_uint8

    h, w = size
    vae = WanVAE(VAEConfig()).eval()
    g = torch.Generator().manual_seed(7)
    for name, p in sorted(vae.named_parameters()):  # drawn like `wanrender models random`
        x = torch.randn(p.shape, generator=g)
        p.copy_(1 + 0.02 * x if is_gain(name) else (0.01 if name.endswith(".bias") else 0.02) * x)
    video = vae.decode(torch.randn(1, 16, 21, h // 8, w // 8, generator=g))
    ours = to_uint8(video)
    theirs = ((video[0].permute(1, 2, 3, 0) + 1) / 2 * 255).clamp(0, 255).byte().numpy()

    def db(a: np.ndarray, b: np.ndarray) -> float:
        return psnr(torch.from_numpy(a), torch.from_numpy(b), 255.0)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        ours_mp4, theirs_mp4 = Path(tmp, "ours.mp4"), Path(tmp, "comfy.mp4")
        write_video(ours, ours_mp4, fps=16)
        with av.open(str(theirs_mp4), mode="w") as out:
            stream = out.add_stream("h264", rate=Fraction(16))
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for frame in theirs:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")))
            out.mux(stream.encode(None))
        a = np.stack(list(iter_video(theirs_mp4)[1]))
        b = np.stack(list(iter_video(ours_mp4)[1]))
    print(
        f"frames, rounding vs truncation: {db(theirs, ours):.2f} dB; each MP4 vs its own frames: "
        f"{db(a, theirs):.2f} / {db(b, ours):.2f} dB; MP4 vs MP4: {db(a, b):.2f} dB (first frame {db(a[0], b[0]):.2f} dB)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", help="a ComfyUI source tree (not needed for drift and codec)")
    ap.add_argument("--deps", help="a folder with ComfyUI's extra Python dependencies")
    ap.add_argument("--stage", choices=("schedule", "dit", "vae", "drift", "codec"), required=True)
    ap.add_argument("--layers", type=int, default=1, help="DiT blocks (dit, drift)")
    ap.add_argument("--dim", type=int, default=5120, help="DiT width (dit); heads = dim / 128")
    ap.add_argument("--grid", type=grid, default=(21, 8, 8), help="latent FxHxW (dit, drift)")
    ap.add_argument("--frames", type=int, default=81, help="pixel frames (vae)")
    ap.add_argument("--size", type=grid, default=(32, 48), help="pixel HxW (vae, codec)")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.stage not in ("drift", "codec"):
        if not args.comfy:
            ap.error(f"--stage {args.stage} needs --comfy PATH")
        boot_comfy(args.comfy, args.deps)
    if args.stage == "schedule":
        stage_schedule()
    elif args.stage == "dit":
        stage_dit(args.layers, args.grid, args.dim)
    elif args.stage == "vae":
        stage_vae(args.frames, args.size)
    elif args.stage == "drift":
        stage_drift(args.layers, args.grid)
    else:
        stage_codec(args.size)


if __name__ == "__main__":
    main()
