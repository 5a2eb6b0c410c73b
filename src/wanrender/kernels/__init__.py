"""Hand-written GPU kernels (Triton) for the hot spots of the renderer.

Modules here import Triton lazily, inside functions, so importing them works on a
machine without a GPU or without Triton; each exposes ``can_run()`` listing the
reasons it cannot run on the current machine.

- ``attention_sage8``: SageAttention-style 8-bit attention (smoothed, block-quantised
  fp8/int8 Q·K^T, fp8 P·V) for the DiT's self-attention.
- ``attention_cudnn``: cuDNN's fp8 attention through NVIDIA's frontend (imported
  lazily), around the scheme of ``cudnn_fp8_math`` (plain PyTorch, with its twin).
"""
