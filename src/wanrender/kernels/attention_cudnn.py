"""cuDNN's fp8 attention (``cudnn-fp8``): the vendor's Hopper kernel through NVIDIA's
``nvidia-cudnn-frontend`` Python graph API (a PyPI wheel, nothing to build), with our
smoothing and scaling around it (``cudnn_fp8_math``).

``cudnn_fp8_attention(q, k, v)`` takes and returns ``[B, L, H, D]`` tensors (bf16/fp16,
views allowed), non-causal, no mask, softmax scale ``1/sqrt(D)``:

1. ``cudnn_fp8_math.prepare``: K and V minus their per-channel means, V normalised
   per channel, Q/K/V quantised to fp8 e4m3 with per-tensor descales (on the device:
   no host synchronisation);
2. one cuDNN graph per (shape, device), built on first use and cached: ``sdpa_fp8``
   with fp8 in and out (on Hopper its output must be fp8), fp32 softmax and
   accumulation, no softmax stats. Q, K, V and O stay in the ``[B, L, H, D]`` memory
   layout: the graph's logical ``[B, H, L, D]`` dims get the strides of that layout,
   so nothing is transposed. It runs on torch's current stream, with a workspace
   from torch's allocator;
3. ``cudnn_fp8_math.finish``: O back to bf16 with V's gain and mean restored.

The frontend is imported only when a graph is first built. It loads libcudnn by name;
torch is made to load its own first, and the two versions must agree (no second
cuDNN). ``can_run`` lists the reasons it cannot run without importing it.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from wanrender.kernels import cudnn_fp8_math as fm

log = logging.getLogger(__name__)

PACKAGE = "nvidia-cudnn-frontend"
# cuDNN's fp8 SDPA forward on Hopper arrived in 9.1 (the frontend's own fp8 sample
# gates on it); measured with 9.19.
MIN_CUDNN = 90100
SUPPORTED_HEAD_DIMS = (64, 128)


def _version_text(v: int) -> str:
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def can_run(
    device: str = "cuda",
    capability: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.bfloat16,
    head_dim: int = 128,
) -> list[str]:
    """Why the kernel cannot run here ([] when it can). ``capability`` None on a CUDA
    target: the current device's."""
    reasons: list[str] = []
    if device != "cuda":
        reasons.append("needs a CUDA GPU")
    elif not torch.cuda.is_available() and capability is None:
        reasons.append("no CUDA device available")
    else:
        cap = capability if capability is not None else torch.cuda.get_device_capability()
        if cap < (9, 0):
            reasons.append(f"needs compute capability >= 9.0 for fp8 attention (this GPU: {cap[0]}.{cap[1]})")
    if dtype not in (torch.bfloat16, torch.float16):
        reasons.append(f"needs bf16/fp16 (got {dtype})")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        reasons.append(f"head dim {head_dim} not supported (only {SUPPORTED_HEAD_DIMS})")
    if importlib.util.find_spec("cudnn") is None:
        reasons.append(f"package '{PACKAGE}' is not installed (pip install 'wanrender[cudnn]')")
    if device == "cuda" and torch.cuda.is_available():
        version = torch.backends.cudnn.version()
        if version is None:
            reasons.append("this torch has no cuDNN")
        elif version < MIN_CUDNN:
            reasons.append(f"needs cuDNN >= {_version_text(MIN_CUDNN)} (torch has {_version_text(version)})")
    return reasons


@functools.cache
def _frontend() -> Any:
    """The ``cudnn`` module, bound to the libcudnn torch already uses."""
    torch_version = torch.backends.cudnn.version()  # makes torch load its libcudnn before the frontend looks
    import cudnn

    theirs = int(cudnn.backend_version())
    if torch_version is None or theirs != torch_version:
        raise RuntimeError(
            f"{PACKAGE} loaded cuDNN {_version_text(theirs)} but torch uses "
            f"{_version_text(torch_version) if torch_version else 'none'}: install the frontend next to torch's "
            "nvidia-cudnn wheel so both use one library"
        )
    if theirs < MIN_CUDNN:
        raise RuntimeError(
            f"cuDNN {_version_text(theirs)} is too old for fp8 attention (needs {_version_text(MIN_CUDNN)})"
        )
    return cudnn


@functools.cache
def _handle(device_index: int) -> Any:
    cudnn = _frontend()
    with torch.cuda.device(device_index):
        return cudnn.create_handle()


@dataclass(frozen=True)
class _Graph:
    graph: Any
    tensors: dict[str, Any]
    workspace: int


# (batch, length, heads, head_dim, device index) -> a built graph, or why it could not be built.
_GRAPHS: dict[tuple[int, ...], _Graph | str] = {}


def _build(key: tuple[int, ...]) -> _Graph:
    b, length, h, d, device_index = key
    cudnn = _frontend()
    dt = cudnn.data_type
    g = cudnn.pygraph(io_data_type=dt.FP8_E4M3, intermediate_data_type=dt.FLOAT, compute_data_type=dt.FLOAT,
                      handle=_handle(device_index))  # fmt: skip
    dims = (b, h, length, d)
    stride = (length * h * d, d, h * d, 1)  # [B, L, H, D] memory seen as [B, H, L, D]
    t = {n: g.tensor(name=n, dim=dims, stride=stride, data_type=dt.FP8_E4M3) for n in ("q", "k", "v")}
    for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
        t[n] = g.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=dt.FLOAT)
    args = {n: t[n] for n in t}
    common = dict(attn_scale=1.0 / math.sqrt(d), use_causal_mask=False)
    try:
        o, _, amax_s, amax_o = g.sdpa_fp8(**args, **common, generate_stats=False)
    except TypeError:  # frontends before generate_stats: the same switch, negated
        o, _, amax_s, amax_o = g.sdpa_fp8(**args, **common, is_inference=True)
    o.set_output(True).set_dim(dims).set_stride(stride).set_data_type(dt.FP8_E4M3)
    for a in (amax_s, amax_o):
        a.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(dt.FLOAT)
    t.update(o=o, amax_s=amax_s, amax_o=amax_o)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return _Graph(g, t, int(g.get_workspace_size()))


def graph_for(b: int, length: int, h: int, d: int, device: torch.device) -> _Graph | str:
    """The cached graph for this shape, built on first use, or the reason it cannot be."""
    key = (b, length, h, d, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _GRAPHS:
        try:
            _GRAPHS[key] = _build(key)
        except Exception as e:  # the frontend raises its own error types; any of them means "not for this shape"
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("cudnn-fp8: no cuDNN graph for %s (%s); exact SDPA instead", key[:4], reason)
            _GRAPHS[key] = reason
    return _GRAPHS[key]


def graph_cache_size() -> int:
    return sum(isinstance(g, _Graph) for g in _GRAPHS.values())


@functools.cache
def _p_scales(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.tensor([fm.P_SCALE], dtype=torch.float32, device=device)
    return s, 1.0 / s


def sdpa_fp8(prep: fm.Prepared, entry: _Graph) -> torch.Tensor:
    """The cuDNN graph on prepared inputs: fp8 O codes ``[B, L, H, D]`` (the twin of
    ``cudnn_fp8_math.sdpa_fp8_emulated``)."""
    dev = prep.q8.device
    cudnn = _frontend()
    handle = _handle(dev.index if dev.index is not None else torch.cuda.current_device())
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(dev).cuda_stream)
    o8 = torch.empty(prep.q8.shape, dtype=fm.FP8, device=dev)
    amax = torch.empty(2, dtype=torch.float32, device=dev)
    scale_s, descale_s = _p_scales(dev)
    t = entry.tensors
    scalars = {n: getattr(prep, n).reshape(1).float().contiguous() for n in ("descale_q", "descale_k", "descale_v")}
    pack = {t["q"]: prep.q8, t["k"]: prep.k8, t["v"]: prep.v8, t["o"]: o8, t["scale_s"]: scale_s,
            t["descale_s"]: descale_s, t["scale_o"]: prep.scale_o.reshape(1).float().contiguous(),
            t["amax_s"]: amax[0:1], t["amax_o"]: amax[1:2], **{t[n]: x for n, x in scalars.items()}}  # fmt: skip
    workspace = torch.empty(max(entry.workspace, 1), dtype=torch.uint8, device=dev)
    # The pointers above must outlive the launch: the tensors are kept until it is queued.
    entry.graph.execute(pack, workspace, handle=handle)
    return o8


def cudnn_fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp8 self-attention through cuDNN, ``[B, L, H, D]`` in and out (contiguous)."""
    b, length, h, d = q.shape
    reasons = can_run("cuda" if q.is_cuda else q.device.type, None, q.dtype, d)
    if reasons:
        raise RuntimeError("cudnn_fp8_attention cannot run: " + "; ".join(reasons))
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"cudnn_fp8_attention is for self-attention (got q {tuple(q.shape)}, k {tuple(k.shape)})")
    q8, k8, v8, dq, dk, dv, _, v_mean, _ = fm.prepare_parts(q, k, v)
    return core(q, k, v, q8, k8, v8, dq, dk, dv, v_mean)


def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor,
         dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, v_mean: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The cuDNN graph and the post-pass on inputs already prepared (by
    ``cudnn_fp8_math.prepare_parts``, default scheme); exact SDPA on q, k, v where cuDNN
    builds no graph for the shape."""
    b, length, h, d = q.shape
    entry = graph_for(b, length, h, d, q.device)
    if isinstance(entry, str):
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).contiguous()
    prep = fm.Prepared(q8, k8, v8, dq, dk, dv, 1.0 / dv, v_mean, None)
    return fm.finish(sdpa_fp8(prep, entry), prep, q.dtype).contiguous()


@functools.cache
def core_op():
    """:func:`core` as a custom op (opaque to torch.compile), so that the pre-pass
    before it stays in the compiled graph and fuses there."""

    @torch.library.custom_op("wanrender::cudnn_fp8_core", mutates_args=())
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q8: torch.Tensor, k8: torch.Tensor,
           v8: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
           v_mean: torch.Tensor) -> torch.Tensor:  # fmt: skip
        return core(q, k, v, q8, k8, v8, dq, dk, dv, v_mean)

    @op.register_fake
    def _(q, k, v, q8, k8, v8, dq, dk, dv, v_mean) -> torch.Tensor:
        return q.new_empty(q.shape)

    return op
