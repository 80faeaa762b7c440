"""RMSNorm (Zhang & Sennrich, 2019): scale by the root mean square over the last axis, then a learned gain."""

from __future__ import annotations

import torch
from torch import nn

from mamba_r1.ops.rms_norm import float32_rms_norm


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x**2, -1) + eps) * weight``, computed in float32, returned in x's dtype.

    Float32 inside because the mean of squares over a wide feature axis loses most of its bits in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int; got {dim!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0; got {eps!r}")
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))  # (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., dim) -> (..., dim)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (..., dim) with dim={self.dim}; got shape {tuple(x.shape)}")
        return float32_rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


__all__ = ["RMSNorm"]
