"""The attention op shared by the U-Net and the VAE, with two interchangeable backends.

- "sdpa" (default): `torch.nn.functional.scaled_dot_product_attention`, the fast fused kernel for training
  and reference inference. Like diffusers' `AttnProcessor2_0` it ignores `upcast`.
- "math": plain `softmax(q @ k^T * dim_head**-0.5) @ v`. With `upcast`, q @ k^T and the softmax run in
  float32 and the probabilities are cast back (diffusers' classic `AttnProcessor`, the SD2 repo's
  `_ATTN_PRECISION="fp32"`). Export picks it: it traces to MatMul/Mul/Softmax/MatMul, a pattern ONNX
  Runtime's and TensorRT's attention fusions recognise, and it keeps fp16 SD 2.1-v finite.

    with attention_backend("math"):
        torch.onnx.export(unet, ...)
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ldm_deploy.errors import UsageError

BACKENDS = ("sdpa", "math")
_backend = "sdpa"


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use backend `name` ("sdpa" or "math") for every attention call inside the block."""
    global _backend
    if name not in BACKENDS:
        raise UsageError(f"unknown attention backend {name!r}", hint=f"choose one of {', '.join(BACKENDS)}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def current_backend() -> str:
    return _backend


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """Multi-head attention over (B, N, heads*d) queries and (B, M, heads*d) keys/values -> (B, N, heads*d)."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, heads, N|M, d)
    if _backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        scale = q.shape[-1] ** -0.5
        if upcast:
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale      # (B, heads, N, M)
        out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)
    return out.transpose(1, 2).flatten(2)                               # (B, N, heads*d)
