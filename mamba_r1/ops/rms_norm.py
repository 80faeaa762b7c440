"""The pre-norm residual step of decoding in one kernel: residual = residual + delta, then RMSNorm of the new residual.

Between two layers of a decode step the residual stream takes the previous branch's output and the next layer's
norm reads the sum: an add kernel and a norm kernel per norm, about 2.3 us of a 26 us layer on an H200 (with the
CUDA graph's gap between them). Backends:
  "torch"  ``add_rms_norm_ref``: ``residual + delta`` in the residual's dtype, then ``float32_rms_norm``, the
           specification and the differentiable path;
  "triton" one kernel, one program per row: the sum in float32, rounded to the residual's dtype (as the torch path
           stores it), the norm of that rounded value in float32, both outputs written. Inference only: with
           autograd recording, or rows wider than MAX_TRITON_DIM, the torch path runs;
  "auto"   triton on CUDA inside ``graph_kernels()`` (a CUDA-graph decode step); torch otherwise (eagerly, the
           Triton launcher's overhead outweighs the saved kernel: see ``resolve_graph_backend``).
Runs on CPU under Triton's interpreter too (TRITON_INTERPRET=1), where half precision is upcast first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba_r1.ops.triton_runtime import (
    BACKENDS,
    built_for_interpreter,
    check_triton_runtime,
    for_kernel,
    needs_autograd,
    next_power_of_2,
    resolve_graph_backend,
    tl,
)
from mamba_r1.ops.triton_runtime import jit as _jit

# Widest row one program holds in registers (a model's dim).
MAX_TRITON_DIM = 16384


def float32_rms_norm(
    x: torch.Tensor,  # (..., dim)
    weight: torch.Tensor,  # (dim,)
    eps: float,
) -> torch.Tensor:  # (..., dim) in x's dtype
    """``x / sqrt(mean(x**2, -1) + eps) * weight`` accumulated in float32, returned in x's dtype. On CUDA with x and
    weight of one dtype that is F.rms_norm's fused kernel as given (it accumulates half inputs in float32 itself: one
    kernel instead of four, which matters when decoding); elsewhere the float32 copies are explicit."""
    dim = x.shape[-1]
    if x.is_cuda and x.dtype == weight.dtype:
        return F.rms_norm(x, (dim,), weight, eps).to(x.dtype)
    return F.rms_norm(x.float(), (dim,), weight.float(), eps).to(x.dtype)


def add_rms_norm_ref(
    residual: torch.Tensor,  # (rows, dim)
    delta: torch.Tensor | None,  # (rows, dim), or None: no add
    weight: torch.Tensor,  # (dim,)
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # normed (rows, dim) in residual's dtype, new residual (rows, dim)
    """The specification: the new residual in the residual's dtype, its RMSNorm computed in float32."""
    new_residual = residual if delta is None else residual + delta
    return float32_rms_norm(new_residual, weight, eps), new_residual


@_jit
def _add_rms_norm_kernel(
    residual_ptr, delta_ptr, weight_ptr, normed_ptr, new_residual_ptr,  # (rows, dim) each but weight (dim,)
    dim, eps,
    stride_residual, stride_delta, stride_normed, stride_new,  # row strides; the feature axis is contiguous
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    h = tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        total = h.to(tl.float32) + tl.load(delta_ptr + row * stride_delta + offs, mask=mask, other=0.0).to(tl.float32)
        h = total.to(new_residual_ptr.dtype.element_ty)  # rounded as the torch path stores it
        tl.store(new_residual_ptr + row * stride_new + offs, h, mask=mask)
    h = h.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / dim + eps)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(normed_ptr + row * stride_normed + offs, (h * inv_rms * w).to(normed_ptr.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    """Whether this module's kernels run on Triton's CPU interpreter (see built_for_interpreter)."""
    return built_for_interpreter(_add_rms_norm_kernel)


def _add_rms_norm_triton(residual, delta, weight, eps):
    interpreting = _interpreting()
    check_triton_runtime("add_rms_norm", residual.device, interpreting)
    residual_k, delta_k, weight_k = (for_kernel(t, interpreting) for t in (residual, delta, weight))
    rows, dim = residual.shape
    normed = torch.empty(rows, dim, device=residual.device, dtype=residual_k.dtype)  # (rows, dim)
    new_residual = torch.empty_like(normed) if delta is not None else residual_k  # (rows, dim)
    if rows > 0:
        block = next_power_of_2(dim)
        _add_rms_norm_kernel[(rows,)](
            residual_k, delta_k if delta_k is not None else residual_k, weight_k, normed, new_residual,
            dim, eps,
            residual_k.stride(0), (delta_k if delta_k is not None else residual_k).stride(0), normed.stride(0),
            new_residual.stride(0),
            HAS_DELTA=delta is not None, BLOCK=block, num_warps=1 if interpreting else min(8, max(1, block // 256)),
        )
    if normed.dtype != residual.dtype:  # interpreter upcast
        normed = normed.to(residual.dtype)
        new_residual = new_residual.to(residual.dtype) if delta is not None else residual
    return normed, new_residual


def add_rms_norm(
    residual: torch.Tensor,  # (rows, dim)
    delta: torch.Tensor | None,  # (rows, dim), or None: just the norm
    weight: torch.Tensor,  # (dim,)
    eps: float = 1e-5,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:  # normed (rows, dim) in residual's dtype, new residual (rows, dim)
    """``residual + delta`` and its RMSNorm (``y = h / sqrt(mean(h**2) + eps) * weight``, float32 inside), on one
    kernel where it applies (see the module docstring)."""
    if not isinstance(residual, torch.Tensor) or residual.dim() != 2 or not residual.is_floating_point():
        got = f"{tuple(residual.shape)} {residual.dtype}" if isinstance(residual, torch.Tensor) else type(residual)
        raise ValueError(f"residual must be a floating-point (rows, dim) tensor; got {got}")
    dim = residual.shape[1]
    if delta is not None and tuple(delta.shape) != tuple(residual.shape):
        raise ValueError(f"delta must be shaped like residual {tuple(residual.shape)}; got {tuple(delta.shape)}")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (dim,):
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be (dim,) = ({dim},); got {got}")
    name = resolve_graph_backend("add_rms_norm", backend, residual.device)
    fits = (dim <= MAX_TRITON_DIM and residual.stride(-1) == 1 and (delta is None or delta.stride(-1) == 1)
            and not needs_autograd(residual, delta, weight) and not torch.is_autocast_enabled(residual.device.type))
    if name == "torch" or not fits:
        return add_rms_norm_ref(residual, delta, weight, eps)
    return _add_rms_norm_triton(residual, delta, weight, eps)


__all__ = ["BACKENDS", "MAX_TRITON_DIM", "add_rms_norm", "add_rms_norm_ref", "float32_rms_norm"]
