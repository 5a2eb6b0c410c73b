"""Full-size parity with ComfyUI on a GPU, stage by stage, on lossless tensors (issue #14).

ComfyUI is never part of this repository: ``--side comfy`` imports it from the folder
given with ``--comfy`` and runs its own node code (the loaders of ``comfy.sd``,
``CLIPTextEncode``, ``WanImageToVideo``, ``ModelSamplingSD3``, the two
``KSamplerAdvanced`` nodes, ``VAEDecode``) on the files of ``wanrender models random
--size full``. ``--side ours`` renders the same request through ``Runner.render``.
Each side saves what it computed at every stage; ``--compare`` prints PSNR and
cosine per stage:

- ``text``: the positive text embedding [1, 512, 4096];
- ``cond``: the image-condition latent (normalised, 16 channels) and the mask;
- ``noise``: the seed-42 noise;
- ``pass1``: the latent after the high-noise pass (leftover noise included);
- ``final``: the latent after the low-noise pass;
- ``frames``: the decoded frames, 8-bit (ours rounded; ComfyUI's float output x 255).

Latents are compared in the model's normalised space (ComfyUI returns them
``process_latent_out``; we map them back with its own ``Wan21.process_in``).
``--feed DIR`` (ComfyUI side) replaces its text embedding and condition latent by
ours, so sampling and decoding are compared from identical inputs.

  python benchmarks/gpu_comfy_parity.py --side comfy --comfy /tmp/comfy --models M --image in.png --save /tmp/p/comfy
  python benchmarks/gpu_comfy_parity.py --side ours --models M --image in.png --save /tmp/p/ours
  python benchmarks/gpu_comfy_parity.py --compare /tmp/p/ours /tmp/p/comfy
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

PROMPT = "an astronaut waves at the camera, slow dolly-in"


def boot_comfy(comfy: str, flags: list[str]) -> None:
    import importlib.util
    import types

    sys.path.insert(0, comfy)
    import comfy.options

    comfy.options.enable_args_parsing()
    argv, sys.argv = sys.argv, ["comfy", "--disable-api-nodes", *flags]
    try:
        import comfy.cli_args  # noqa: F401  (parses sys.argv once)
    finally:
        sys.argv = argv
    import transformers  # noqa: F401  (before any stand-in: it probes torchvision at import)

    if importlib.util.find_spec("torchvision") is None:  # imported by unrelated model families only
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")  # type: ignore[attr-defined]
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tv.transforms})  # type: ignore[attr-defined]


def load_image(path: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    img = Image.open(path).convert("RGB")  # as ComfyUI's LoadImage: [1, H, W, 3] in [0, 1]
    return torch.from_numpy(np.array(img).astype(np.float32) / 255.0)[None]


def side_comfy(a) -> None:
    boot_comfy(a.comfy, a.comfy_flags.split() if a.comfy_flags else [])
    import comfy.latent_formats
    import comfy.model_management as mm
    import comfy.sd
    import nodes
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from comfy_extras.nodes_wan import WanImageToVideo

    from wanrender.models.inventory import resolve_files

    files = resolve_files(Path(a.models))
    out: dict = {}
    w, h = (int(v) for v in a.size.split("x"))
    t0 = time.perf_counter()
    clip = comfy.sd.load_clip(ckpt_paths=[str(files.text_encoder)], clip_type=comfy.sd.CLIPType.WAN)
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(files.vae)))
    high = ModelSamplingSD3().patch(comfy.sd.load_diffusion_model(str(files.high)), a.shift)[0]
    low = ModelSamplingSD3().patch(comfy.sd.load_diffusion_model(str(files.low)), a.shift)[0]
    print(f"comfy: loaded in {time.perf_counter() - t0:.1f} s; unet dtype {high.model.get_dtype()}, "
          f"manual cast {high.model.manual_cast_dtype}, vae dtype {vae.vae_dtype}", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    pos = nodes.CLIPTextEncode().encode(clip, PROMPT)[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    res = WanImageToVideo.execute(pos, neg, vae, w, h, a.frames, 1, start_image=load_image(a.image))
    pos, neg, latent = getattr(res, "result", None) or res.args
    fmt = comfy.latent_formats.Wan21()
    if a.feed:
        fed = torch.load(Path(a.feed) / "stages.pt")
        pos = [[fed["text"].to(pos[0][0].dtype), dict(pos[0][1], concat_latent_image=fmt.process_out(fed["cond"]))]]
        print("comfy: text embedding and condition latent fed from", a.feed, flush=True)
    out["text"] = pos[0][0].float().cpu()
    out["cond"] = fmt.process_in(pos[0][1]["concat_latent_image"].float().cpu())
    mask = pos[0][1]["concat_mask"].float().cpu()  # ComfyUI marks the kept frames with 0
    out["mask"] = (1.0 - mask).expand(-1, 4, -1, -1, -1).contiguous()
    print(f"comfy: text + condition {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    ks = nodes.KSamplerAdvanced()
    mid = ks.sample(high, "enable", a.seed, a.steps, 1.0, "euler", "simple", pos, neg, latent, 0, a.switch,
                    "enable")[0]  # fmt: skip
    fin = ks.sample(low, "disable", a.seed, a.steps, 1.0, "euler", "simple", pos, neg, mid, a.switch, 10000,
                    "disable")[0]  # fmt: skip
    torch.cuda.synchronize()
    out["pass1"] = fmt.process_in(mid["samples"].float().cpu())
    out["final"] = fmt.process_in(fin["samples"].float().cpu())
    print(f"comfy: sampling {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    images = nodes.VAEDecode().decode(vae, fin)[0]  # [T, H, W, 3] in [0, 1]
    out["frames"] = (images.float().cpu() * 255.0).clamp(0, 255)
    print(f"comfy: VAE decode {time.perf_counter() - t0:.1f} s; frames {tuple(images.shape)}", flush=True)
    mm.unload_all_models()
    save(a.save, out)


def side_ours(a) -> None:
    from wanrender.engine import Engine
    from wanrender.models.inventory import resolve_files
    from wanrender.pipeline import i2v
    from wanrender.request import from_preset
    from wanrender.runner import Runner

    out: dict = {}
    passes: list[torch.Tensor] = []
    enc, cond_fn, sample_fn = Engine.encode_prompts, i2v.image_condition, i2v.run_pass

    def encode_prompts(self, prompt, negative):
        ctx, n = enc(self, prompt, negative)
        out["text"] = ctx.float().cpu()
        return ctx, n

    def image_condition(vae, image, frames):
        c = cond_fn(vae, image, frames)
        out["mask"], out["cond"] = c[:, :4].float().cpu(), c[:, 4:].float().cpu()
        return c

    def run_pass(*args, **kw):
        x = sample_fn(*args, **kw)
        passes.append(x.float().cpu())
        return x

    Engine.encode_prompts, i2v.image_condition, i2v.run_pass = encode_prompts, image_condition, run_pass
    w, h = (int(v) for v in a.size.split("x"))
    req = from_preset("turbo", Path(a.image), PROMPT, frames=a.frames, width=w, height=h, seed=a.seed, steps=a.steps,
                      switch=a.switch, shift_high=a.shift, shift_low=a.shift, lora_strength_high=0.0,
                      lora_strength_low=0.0, precision=a.precision, attention=a.attention, compile="off",
                      memory="resident", out=Path(a.save) / "ours.mp4")  # fmt: skip
    t0 = time.perf_counter()
    res = Runner("cuda").render(req, resolve_files(Path(a.models)))
    print(f"ours: render {time.perf_counter() - t0:.1f} s (load included); timings "
          f"{ {k: round(v, 2) for k, v in res.timings.items()} }", flush=True)  # fmt: skip
    out["pass1"], out["final"] = passes[0], passes[1]
    out["frames"] = torch.from_numpy(res.frames).float()
    save(a.save, out)


def side_decode(a) -> None:
    """Decode another save's final latent with one side's VAE only: separates the VAE
    decode from the sampling."""
    lat = torch.load(Path(a.latent_from) / "stages.pt")["final"]
    if a.crop:  # a spatial crop of the latent (latent units), small enough to decode untiled everywhere
        ch, cw = (int(v) for v in a.crop.split("x"))
        lat = lat[..., :ch, :cw].contiguous()
    if a.side == "comfy-decode":
        boot_comfy(a.comfy, a.comfy_flags.split())
        import comfy.latent_formats
        import comfy.sd
        import comfy.utils

        from wanrender.models.inventory import resolve_files

        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(resolve_files(Path(a.models)).vae)))
        images = vae.decode(comfy.latent_formats.Wan21().process_out(lat))
        frames = (images.reshape(-1, *images.shape[-3:]).float().cpu() * 255.0).clamp(0, 255)
    else:
        from wanrender.models.inventory import resolve_files
        from wanrender.models.loading import load_vae
        from wanrender.pipeline import i2v

        vae = load_vae(resolve_files(Path(a.models)).vae, device="cuda", dtype=getattr(torch, a.vae_dtype))
        frames = torch.from_numpy(i2v.decode(vae, lat.cuda())).float()
    save(a.save, {"final": lat, "frames": frames})


def save(folder: str, out: dict) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(out, Path(folder) / "stages.pt")
    print("saved", ", ".join(f"{k} {tuple(v.shape)}" for k, v in out.items()), flush=True)


def psnr(a: torch.Tensor, ref: torch.Tensor, peak: float | None = None) -> float:
    a, ref = a.double(), ref.double()
    rng = peak if peak is not None else (ref.max() - ref.min()).item()
    mse = ((a - ref) ** 2).mean().item()
    return 10 * math.log10(rng * rng / mse) if mse > 0 else float("inf")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def compare(ours_dir: str, ref_dir: str) -> None:
    o, r = torch.load(Path(ours_dir) / "stages.pt"), torch.load(Path(ref_dir) / "stages.pt")
    print(f"{'stage':8} {'shape':>24} {'PSNR dB':>9} {'cosine':>10} {'max abs':>10}   ({ours_dir} vs {ref_dir})")
    for k in ("text", "mask", "cond", "pass1", "final", "frames"):
        if k not in o or k not in r:
            print(f"{k:8} missing")
            continue
        a, b = o[k], r[k].reshape(o[k].shape) if r[k].numel() == o[k].numel() else r[k]
        if a.shape != b.shape:
            print(f"{k:8} shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
            continue
        peak = 255.0 if k == "frames" else None
        print(f"{k:8} {str(tuple(a.shape)):>24} {psnr(a, b, peak):9.2f} {cosine(a, b):10.6f} "
              f"{(a - b).abs().max().item():10.3e}")  # fmt: skip
    if "frames" in o and "frames" in r:
        per = [psnr(o["frames"][i], r["frames"][i], 255.0) for i in range(o["frames"].shape[0])]
        print(f"frames: first {per[0]:.2f} dB, min {min(per):.2f} dB (frame {per.index(min(per))}), "
              f"last {per[-1]:.2f} dB")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=("comfy", "ours", "comfy-decode", "ours-decode"))
    ap.add_argument("--vae-dtype", default="bfloat16", help="ours-decode: bfloat16 or float32")
    ap.add_argument("--crop", help="decode sides: crop the latent to HxW (latent units) first")
    ap.add_argument("--latent-from", help="decode sides: the save whose final latent to decode")
    ap.add_argument("--compare", nargs=2, metavar=("OURS", "REF"))
    ap.add_argument("--comfy", help="a ComfyUI tree (never committed)")
    ap.add_argument("--comfy-flags", default="", help="ComfyUI command-line flags, e.g. '--bf16-unet'")
    ap.add_argument("--feed", help="ComfyUI side: take the text embedding and condition latent from this save")
    ap.add_argument("--models")
    ap.add_argument("--image")
    ap.add_argument("--save")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--size", default="832x1216")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--switch", type=int, default=2)
    ap.add_argument("--shift", type=float, default=5.0)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--attention", default="sdpa-cudnn")
    a = ap.parse_args()
    if a.compare:
        compare(*a.compare)
    elif a.side == "comfy":
        side_comfy(a)
    elif a.side == "ours":
        side_ours(a)
    elif a.side in ("comfy-decode", "ours-decode"):
        side_decode(a)
    else:
        ap.error("give --side or --compare")


if __name__ == "__main__":
    main()
