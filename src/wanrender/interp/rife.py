"""RIFE 4.25/4.26 frame interpolation (the IFNet of Practical-RIFE), written for wanrender.

Architecture facts (checked against Practical-RIFE's ``train_log/IFNet_HDv3.py``
for 4.25/4.26, saibyo 0.14.0's ``ifnet.py`` and ComfyUI-Frame-Interpolation's
4.26 arch): five IFBlocks ``block0..block4`` with widths 192/128/96/64/32, each
``conv0`` (two stride-2 conv+LeakyReLU) -> ``convblock`` (8 residual convs with
a learnt per-channel ``beta``) -> ``lastconv`` (4x4 transposed conv to 52
channels + PixelShuffle(2), i.e. 13 maps at half resolution: 4 flow, 1 mask,
8 features passed to the next block). An ``encode`` head (three convs, then a
transposed conv to 4 channels) gives features of both frames that the blocks
see warped. Block i works at 1/scale_list[i] resolution with scale_list =
(16, 8, 4, 2, 1) / scale. The checkpoint also carries ``teacher.*`` and
``caltime.*`` modules used only in training.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from wanrender.errors import ModelFileError, WanrenderError
from wanrender.interp.flow import check_pair, check_t

LAYOUT_NAME = "RIFE 4.25/4.26 IFNet"
_TRAINING_ONLY = ("teacher.", "caltime.")
_N_BLOCKS = 5
_BLOCK_OUT = 4 * 13  # before PixelShuffle(2): 4 flow + 1 mask + 8 feature maps
_FEAT = 8
# The scale_list convention of Practical-RIFE: other values break the exact
# down/up-sampling round trip inside the blocks.
ALLOWED_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


# --- the network ------------------------------------------------------------------


def _conv_act(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.LeakyReLU(0.2, inplace=True))


class _ResConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))
        self.relu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x) * self.beta + x)


class _IFBlock(nn.Module):
    def __init__(self, cin: int, c: int) -> None:
        super().__init__()
        self.conv0 = nn.Sequential(_conv_act(cin, c // 2), _conv_act(c // 2, c))
        self.convblock = nn.Sequential(*[_ResConv(c) for _ in range(8)])
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, _BLOCK_OUT, 4, 2, 1), nn.PixelShuffle(2))

    def forward(
        self, x: torch.Tensor, flow: torch.Tensor | None, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        if flow is not None:
            # Flow is in pixels, so it shrinks with the image.
            flow = F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear", align_corners=False) / scale
            x = torch.cat((x, flow), 1)
        tmp = self.lastconv(self.convblock(self.conv0(x)))
        tmp = F.interpolate(tmp, scale_factor=scale, mode="bilinear", align_corners=False)
        return tmp[:, :4] * scale, tmp[:, 4:5], tmp[:, 5:]


class _Head(nn.Module):
    def __init__(self, out: int) -> None:
        super().__init__()
        self.cnn0 = nn.Conv2d(3, 16, 3, 2, 1)
        self.cnn1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(16, out, 4, 2, 1)
        self.relu = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.cnn0(x))
        x = self.relu(self.cnn1(x))
        x = self.relu(self.cnn2(x))
        return self.cnn3(x)


class IFNet(nn.Module):
    """Inference-only IFNet; ``forward`` returns the blended in-between frame."""

    def __init__(self, widths: Sequence[int] = (192, 128, 96, 64, 32), head_channels: int = 4) -> None:
        super().__init__()
        if len(widths) != _N_BLOCKS:
            raise ValueError(f"IFNet needs {_N_BLOCKS} block widths, got {len(widths)}")
        self.widths = tuple(int(w) for w in widths)
        self.head_channels = int(head_channels)
        first = 7 + 2 * head_channels  # both frames, t, both feature maps
        rest = 6 + 1 + 1 + _FEAT + 2 * head_channels + 4  # warped frames, t, mask, feat, warped features, flow
        for i, width in enumerate(self.widths):
            self.add_module(f"block{i}", _IFBlock(first if i == 0 else rest, width))
        self.encode = _Head(head_channels)
        self._grids: dict[tuple[Any, ...], torch.Tensor] = {}

    def _warp(self, img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        """Backward warp: out(x) = img(x + flow(x)), bilinear, edges clamped.

        Always evaluated in fp32: a half-precision sampling grid in [-1, 1]
        is off by up to ~0.5 px at 832 px width, which shows as shimmer.
        """
        n, _, h, w = flow.shape
        key = (flow.device, n, h, w)
        grid = self._grids.get(key)
        if grid is None:
            if len(self._grids) > 8:
                self._grids.clear()
            gx = torch.linspace(-1.0, 1.0, w, device=flow.device).view(1, 1, 1, w).expand(n, 1, h, w)
            gy = torch.linspace(-1.0, 1.0, h, device=flow.device).view(1, 1, h, 1).expand(n, 1, h, w)
            grid = self._grids[key] = torch.cat((gx, gy), 1)
        flow32 = flow.float()
        # align_corners=True maps -1/+1 to the centres of the edge pixels, so one
        # pixel is 2/(size-1) in grid units.
        norm = torch.cat((flow32[:, 0:1] / ((w - 1.0) / 2.0), flow32[:, 1:2] / ((h - 1.0) / 2.0)), 1)
        coords = (grid + norm).permute(0, 2, 3, 1)
        out = F.grid_sample(img.float(), coords, mode="bilinear", padding_mode="border", align_corners=True)
        return out.to(img.dtype)

    def forward(
        self,
        img0: torch.Tensor,
        img1: torch.Tensor,
        timestep: torch.Tensor,
        scale_list: Sequence[float] = (16, 8, 4, 2, 1),
    ) -> torch.Tensor:
        """img0/img1: [B,3,H,W] in [0,1], H and W multiples of 64/scale; timestep: [B,1,H,W]."""
        f0 = self.encode(img0)
        f1 = self.encode(img1)
        blocks = [getattr(self, f"block{i}") for i in range(_N_BLOCKS)]
        flow, mask, feat = blocks[0](torch.cat((img0, img1, f0, f1, timestep), 1), None, scale_list[0])
        warped0 = self._warp(img0, flow[:, :2])
        warped1 = self._warp(img1, flow[:, 2:4])
        for block, scale in zip(blocks[1:], scale_list[1:], strict=True):
            wf0 = self._warp(f0, flow[:, :2])
            wf1 = self._warp(f1, flow[:, 2:4])
            x = torch.cat((warped0, warped1, wf0, wf1, timestep, mask, feat), 1)
            dflow, mask, feat = block(x, flow, scale)
            flow = flow + dflow
            warped0 = self._warp(img0, flow[:, :2])
            warped1 = self._warp(img1, flow[:, 2:4])
        m = torch.sigmoid(mask)
        return warped0 * m + warped1 * (1 - m)


# --- checkpoints --------------------------------------------------------------------


@dataclass(frozen=True)
class RifeConfig:
    widths: tuple[int, ...]
    head_channels: int


def _read_checkpoint(path: Path) -> Any:
    if not path.is_file():
        raise ModelFileError(path, "no such file", "run `wanrender models fetch rife` or pass the right path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many kinds here
        hint = "not a PyTorch state dict"
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                if any(n.endswith("constants.pkl") or "/code/" in n for n in zf.namelist()):
                    hint = "a TorchScript archive (e.g. FILM's film_net_*.pt), not a RIFE state dict"
        raise ModelFileError(path, hint, f"use a {LAYOUT_NAME} checkpoint (flownet.pkl)") from err


def normalize_state_dict(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap, drop training-only modules and strip DataParallel's ``module.`` prefix."""
    if "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = str(key)
        if k.startswith("module."):
            k = k[len("module.") :]
        if k.startswith(_TRAINING_ONLY) or not isinstance(value, torch.Tensor):
            continue
        out[k] = value
    return out


def _describe_other_layout(keys: set[str], sd: Mapping[str, torch.Tensor]) -> str:
    """Best guess at what a non-4.25/4.26 checkpoint is, for the error message."""
    tops = {k.split(".")[0] for k in keys}
    if {"extract", "predict_flow", "fuse"} <= tops:
        return "FILM (frame-interpolation), not RIFE"
    if "contextnet" in tops or "unet" in tops:
        return "an older RIFE (v3.x or 4.0-4.3, with contextnet/unet refinement)"
    if "encode" not in tops and "block0" in tops:
        return "an older RIFE 4.x without the encode feature head (4.0-4.6)"
    if "encode.0.weight" in keys:
        return "a RIFE 4.7-4.12 (encode head as a plain Sequential)"
    if "encode" in tops and "block4" not in tops and "block3" in tops:
        lastconv = sd.get("block3.lastconv.0.weight")
        if lastconv is not None and lastconv.shape[1] == _BLOCK_OUT:
            return "a RIFE 4.21-4.24 style net with four IFBlocks"
        return "a RIFE 4.13-4.18 style net with four IFBlocks"
    return f"an unrecognised model (top-level modules: {', '.join(sorted(tops)[:8]) or 'none'})"


def infer_config(sd: Mapping[str, torch.Tensor]) -> RifeConfig:
    """Read block widths and head size off the tensors; raise if the layout is not 4.25/4.26."""
    keys = set(sd)
    need = [f"block{i}.conv0.1.0.weight" for i in range(_N_BLOCKS)]
    need += [f"block{i}.lastconv.0.weight" for i in range(_N_BLOCKS)] + ["encode.cnn3.weight"]
    if any(k not in keys for k in need) or f"block{_N_BLOCKS}.conv0.0.0.weight" in keys:
        raise WanrenderError(
            f"checkpoint looks like {_describe_other_layout(keys, sd)}, not {LAYOUT_NAME}"
            " — use the 4.25/4.26 flownet.pkl (`wanrender models fetch rife`)"
        )
    for i in range(_N_BLOCKS):
        if sd[f"block{i}.lastconv.0.weight"].shape[1] != _BLOCK_OUT:
            raise WanrenderError(
                f"checkpoint block{i} predicts {sd[f'block{i}.lastconv.0.weight'].shape[1]} maps, not {_BLOCK_OUT}:"
                f" not {LAYOUT_NAME} — use the 4.25/4.26 flownet.pkl"
            )
    widths = tuple(int(sd[f"block{i}.conv0.1.0.weight"].shape[0]) for i in range(_N_BLOCKS))
    return RifeConfig(widths=widths, head_channels=int(sd["encode.cnn3.weight"].shape[1]))


def load_ifnet(source: str | os.PathLike[str] | Mapping[str, Any]) -> IFNet:
    """Build an fp32 CPU IFNet from a checkpoint path or an in-memory state dict."""
    origin = "state dict"
    if isinstance(source, Mapping):
        raw: Any = source
    else:
        origin = str(source)
        raw = _read_checkpoint(Path(source))
    if not isinstance(raw, Mapping):
        raise WanrenderError(
            f"{origin}: holds a {type(raw).__name__}, not a state dict — use a {LAYOUT_NAME} checkpoint"
        )
    sd = normalize_state_dict(raw)
    cfg = infer_config(sd)
    net = IFNet(cfg.widths, cfg.head_channels)
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1].strip()[:200]
        raise WanrenderError(
            f"{origin}: tensors do not fit {LAYOUT_NAME} ({first}) — use the 4.25/4.26 flownet.pkl"
        ) from err
    return net.eval()


# --- running it on frames -----------------------------------------------------------


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pad_multiple(scale: float) -> int:
    """Frame sides are padded to this: block0 works at 1/(64/scale) of the padded size."""
    return int(round(max(64.0, 64.0 / scale)))


class RifeInterpolator:
    """Frame pairs in, in-between frames out, on CPU or GPU.

    ``batch_pairs`` neighbouring pairs (times every requested t) run as one
    batch; frames are padded (edge-replicated) to a multiple of
    :func:`pad_multiple` and cropped back, so any size works.
    """

    name = "rife"

    def __init__(
        self,
        weights: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        device: str | torch.device | None = None,
        dtype: str | None = None,
        scale: float = 1.0,
        batch_pairs: int | None = None,
    ) -> None:
        if scale not in ALLOWED_SCALES:
            raise WanrenderError(
                f"scale {scale} is not supported — use one of {ALLOWED_SCALES} (0.5 for 4K, 1.0 up to 1080p)"
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise WanrenderError("device 'cuda' was asked for but no CUDA GPU is visible — use device='cpu'")
        if dtype is None:
            dtype = "fp16" if self.device.type == "cuda" else "fp32"
        if dtype not in _DTYPES:
            raise WanrenderError(f"dtype {dtype!r} is unknown — use one of {sorted(_DTYPES)}")
        if dtype == "fp16" and self.device.type == "cpu":
            raise WanrenderError("fp16 needs a GPU — use dtype='fp32' (or 'bf16') on CPU")
        self.dtype_name = dtype
        self.dtype = _DTYPES[dtype]
        self.scale = float(scale)
        self.batch_pairs = int(batch_pairs) if batch_pairs else (8 if self.device.type == "cuda" else 1)
        if self.batch_pairs < 1:
            raise WanrenderError(f"batch_pairs must be at least 1, got {batch_pairs}")
        if weights is None:
            from wanrender.interp.weights import find_rife_weights

            weights = find_rife_weights()
        self.net = load_ifnet(weights).to(self.device, self.dtype)

    @property
    def scale_list(self) -> list[float]:
        return [s / self.scale for s in (16.0, 8.0, 4.0, 2.0, 1.0)]

    def _to_tensor(self, frames: np.ndarray) -> torch.Tensor:
        # Upload as uint8 (4x less traffic than float) and convert on the device.
        t = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device, non_blocking=True)
        t = t.permute(0, 3, 1, 2).to(self.dtype) / 255.0
        h, w = t.shape[2:]
        m = pad_multiple(self.scale)
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            # Edge replication rather than zeros: flow that points past the
            # right/bottom border then samples plausible colours, not black.
            t = F.pad(t, (0, pw, 0, ph), mode="replicate")
        return t

    @torch.inference_mode()
    def interpolate_pairs(self, img0s: np.ndarray, img1s: np.ndarray, ts: Sequence[float]) -> np.ndarray:
        """uint8 [B,H,W,3] x2 -> uint8 [B,len(ts),H,W,3]."""
        b, h, w, _ = img0s.shape
        x0, x1 = self._to_tensor(img0s), self._to_tensor(img1s)
        jobs = [(i, k) for i in range(b) for k in range(len(ts))]
        out = np.empty((b, len(ts), h, w, 3), np.uint8)
        step = max(self.batch_pairs, 1)
        for start in range(0, len(jobs), step):
            chunk = jobs[start : start + step]
            pick = torch.tensor([i for i, _ in chunk], device=self.device)
            tval = torch.tensor([ts[k] for _, k in chunk], device=self.device, dtype=self.dtype)
            a, c = x0.index_select(0, pick), x1.index_select(0, pick)
            timestep = tval.view(-1, 1, 1, 1).expand(-1, 1, a.shape[2], a.shape[3])
            mid = self.net(a, c, timestep, self.scale_list)[:, :, :h, :w]
            mid = (mid.float().clamp_(0, 1) * 255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            for j, (i, k) in enumerate(chunk):
                out[i, k] = mid[j]
        return out

    def interpolate_pair(self, img0: np.ndarray, img1: np.ndarray, t: float = 0.5) -> np.ndarray:
        """One in-between frame at time ``t`` in (0, 1)."""
        check_pair(img0, img1)
        return self.interpolate_pairs(img0[None], img1[None], [check_t(t)])[0, 0]
