"""Linear layers at decoding's batch sizes: y = x @ weight.T + bias for a few rows, streaming the weight once.

A decode step at batch 1 runs three projections per Mamba layer (in_proj, x_proj, out_proj) and the head. cuBLAS
picks general GEMM kernels for them that took 2.5-5.6 us each on an H200 (in_proj, 768 -> 3072 in bf16, moved its
4.7 MB weight at 0.84 TB/s; `benchmarks/profile_gpu.py decode`): at a few rows the product is a read of the weight,
and that is what the kernel here is shaped for. Backends:
  "torch"  ``F.linear``, the reference;
  "triton" one kernel: each program owns BLOCK_N output features and walks K, a (BLOCK_K, BLOCK_N) tile of the weight
           and the rows padded to 16 feeding ``tl.dot`` (float32 accumulation), the bias added before one rounding.
           For up to MAX_TRITON_ROWS rows, x and weight of one dtype, no autograd; otherwise F.linear runs;
  "auto"   triton on CUDA inside ``graph_kernels()`` (a CUDA-graph decode step), where it applies; torch
           otherwise (eagerly, the Triton launcher's overhead outweighs the kernel: see ``resolve_graph_backend``).
Runs on CPU under Triton's interpreter too (TRITON_INTERPRET=1), where half precision is upcast first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba_r1.ops.triton_runtime import (
    BACKENDS,
    built_for_interpreter,
    cdiv,
    check_triton_runtime,
    for_kernel,
    needs_autograd,
    resolve_graph_backend,
    tl,
)
from mamba_r1.ops.triton_runtime import jit as _jit

# Rows the kernel takes (tl.dot pads them to BLOCK_M = 16): decoding's small batches. Larger batches are GEMMs
# cuBLAS does well.
MAX_TRITON_ROWS = 16
# Output features per program and the K step. Untimed first choice: 16 features keep in_proj (3072 outputs) at 192
# programs on 132 SMs; benchmarks/bench_decode_linear.py times them against F.linear.
BLOCK_N_CUDA, BLOCK_K_CUDA, WARPS_CUDA, STAGES_CUDA = 16, 256, 4, 3
BLOCK_N_INTERPRET, BLOCK_K_INTERPRET = 16, 16


@_jit
def _small_batch_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,  # x (M, K), weight (N, K), bias (N,), out (M, N): any strides
    M, N, K,
    stride_x_m, stride_x_k, stride_w_n, stride_w_k, stride_out_m, stride_out_n,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, N_STAGES: tl.constexpr,
):
    """One program per BLOCK_N output features; every row of x (M <= BLOCK_M) at once."""
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=N_STAGES):
        k = k0 + offs_k
        mask_k = k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_x_m + k[None, :] * stride_x_k,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        w_t = tl.load(w_ptr + k[:, None] * stride_w_k + offs_n[None, :] * stride_w_n,
                      mask=mask_k[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_K, BLOCK_N): weight transposed
        if IEEE:  # float32 weights: full-precision products, not TF32
            acc = tl.dot(x, w_t, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w_t, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_out_m + offs_n[None, :] * stride_out_n,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _interpreting() -> bool:
    """Whether this module's kernels run on Triton's CPU interpreter (see built_for_interpreter)."""
    return built_for_interpreter(_small_batch_linear_kernel)


def _small_batch_linear_triton(
    x: torch.Tensor,  # (rows, K)
    weight: torch.Tensor,  # (N, K)
    bias: torch.Tensor | None,  # (N,)
) -> torch.Tensor:  # (rows, N) in x's dtype
    interpreting = _interpreting()
    check_triton_runtime("small_batch_linear", x.device, interpreting)
    x_k, w_k, b_k = (for_kernel(t, interpreting) for t in (x, weight, bias))
    rows, k_dim = x.shape
    n_dim = weight.shape[0]
    out = torch.empty(rows, n_dim, device=x.device, dtype=x_k.dtype)  # (rows, N)
    block_n, block_k = (BLOCK_N_INTERPRET, BLOCK_K_INTERPRET) if interpreting else (BLOCK_N_CUDA, BLOCK_K_CUDA)
    _small_batch_linear_kernel[(cdiv(n_dim, block_n),)](
        x_k, w_k, b_k if b_k is not None else w_k, out,
        rows, n_dim, k_dim,
        x_k.stride(0), x_k.stride(1), w_k.stride(0), w_k.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, IEEE=w_k.dtype == torch.float32,
        BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, N_STAGES=1 if interpreting else STAGES_CUDA,
        num_warps=1 if interpreting else WARPS_CUDA,
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


def small_batch_linear(
    x: torch.Tensor,  # (rows, in_features)
    weight: torch.Tensor,  # (out_features, in_features)
    bias: torch.Tensor | None = None,  # (out_features,)
    backend: str = "auto",
) -> torch.Tensor:  # (rows, out_features)
    """``F.linear(x, weight, bias)`` for 2-D ``x``, on the Triton kernel where it applies (see the module docstring):
    at most MAX_TRITON_ROWS rows, x, weight and bias of one floating dtype, no autograd, 16-row tl.dot inputs."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D tensor (rows, in_features); got {got}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be (out_features, in_features={x.shape[1]}); got {got}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (out_features,) = ({weight.shape[0]},); got {tuple(bias.shape)}")
    name = resolve_graph_backend("small_batch_linear", backend, x.device)
    fits = (x.shape[0] <= MAX_TRITON_ROWS and x.is_floating_point() and x.dtype == weight.dtype
            and (bias is None or bias.dtype == x.dtype) and x.numel() > 0 and weight.shape[0] > 0
            and not needs_autograd(x, weight, bias) and not torch.is_autocast_enabled(x.device.type))
    if name == "torch" or not fits:
        return F.linear(x, weight, bias)
    return _small_batch_linear_triton(x, weight, bias)


__all__ = ["BACKENDS", "MAX_TRITON_ROWS", "small_batch_linear"]
