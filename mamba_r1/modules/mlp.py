"""The dense feed-forward block: what a layer without experts uses, and the yardstick an MoE layer is timed against."""

from __future__ import annotations

import torch
import torch.nn as nn

from mamba_r1.ops.moe_dispatch import check_activation, ffn_activation, projection_width


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` with act one of gelu (exact erf), silu, swiglu: the same activation code as the experts
    of ``SwitchMoE``, so a dense layer and a one-expert MoE layer compute the same function.

    For swiglu ``fc1`` projects to ``2 * hidden_dim`` features laid out ``[gate | up]``: output features
    ``0 .. hidden_dim-1`` are the gate (through silu), ``hidden_dim .. 2*hidden_dim-1`` the up projection, and
    ``fc2`` reads their product, ``hidden_dim`` wide.
    """

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu", bias: bool = True, device=None,
                 dtype=None):
        super().__init__()
        if dim < 1 or hidden_dim < 1:
            raise ValueError(f"dim and hidden_dim must be >= 1; got dim={dim}, hidden_dim={hidden_dim}")
        check_activation(activation)
        self.dim, self.hidden_dim, self.activation = dim, hidden_dim, activation
        factory = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(dim, projection_width(hidden_dim, activation), bias=bias, **factory)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., dim) -> (..., dim)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must be (..., dim) with dim={self.dim}; got shape {tuple(x.shape)}")
        return self.fc2(ffn_activation(self.fc1(x), self.activation))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, hidden_dim={self.hidden_dim}, activation={self.activation!r}"
