"""Autograd glue of the Triton selective scan: two ``torch.library.custom_op``s (forward, backward) tied together
with ``register_autograd``, so the kernels work under ``torch.compile(fullgraph=True)`` (the ops are opaque to the
compiler and have fake implementations) and pass ``torch.library.opcheck``. Eagerly the same bodies, setup_context
and backward run under a plain autograd.Function (eager_custom_ops.run_op), without the dispatcher's host cost.

What the forward keeps for the backward: the inputs and the float32 state at every chunk start,
(batch, dim, n_chunks, d_state) with n_chunks = ceil(seqlen / CHUNK_L); the backward recomputes the states in between.

Dtypes: the kernels read whatever dtype arrives (float16, bfloat16, float32; mixed is fine, so autocast outputs pass
through untouched) and compute in float32; ``out`` has u's dtype, the last state is float32 and every gradient has
its input's dtype. float64 is refused with a TypeError: this backend has float32 accuracy, use backend="ref" or "torch".
On CPU the kernels run only under Triton's interpreter (TRITON_INTERPRET=1, read by triton when the kernel modules
are first imported), which has no bfloat16: there, half-precision inputs are upcast before the launch and the
results cast back, so bf16 still runs end to end.
"""

from typing import Optional

import torch
from loguru import logger
from torch import Tensor

from mamba_r1.ops.eager_custom_ops import backward_op, eager_function, run_op
from mamba_r1.ops.triton_runtime import check_triton_runtime, for_kernel


def _kernels():
    """Import the kernel modules on first use, so `import mamba_r1` works where triton is not installed."""
    try:
        from mamba_r1.ops.selective_scan import triton_bwd, triton_fwd
    except ImportError as err:
        raise ImportError(
            "selective_scan(backend='triton') needs the 'triton' package (Linux; `pip install triton`), which could "
            f"not be imported ({err}). Use backend='torch' instead."
        ) from err
    return triton_fwd, triton_bwd


def _check_runtime(device: torch.device) -> None:
    """The kernels run on CUDA, or on CPU under Triton's interpreter; say what to do otherwise."""
    triton_fwd, _ = _kernels()
    check_triton_runtime("selective_scan", device, triton_fwd.interpreting())


def _for_kernel(t: Optional[Tensor], interpret: bool) -> Optional[Tensor]:
    """What a kernel can read: time stride 1, and no half precision under the interpreter."""
    if t is None:
        return None
    t = for_kernel(t, interpret)
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _as_groups(BC: Tensor) -> Tensor:
    """(batch, d_state, seqlen) -> (batch, 1, d_state, seqlen); 4-D passes through."""
    return BC.unsqueeze(1) if BC.dim() == 3 else BC


def _selective_scan_fwd(
    u: Tensor,  # (batch, dim, seqlen)
    delta: Tensor,  # (batch, dim, seqlen)
    A: Tensor,  # (dim, d_state)
    B: Tensor,  # (batch, d_state, seqlen) or (batch, groups, d_state, seqlen)
    C: Tensor,  # (batch, d_state, seqlen) or (batch, groups, d_state, seqlen)
    D: Optional[Tensor],  # (dim,)
    z: Optional[Tensor],  # (batch, dim, seqlen)
    delta_bias: Optional[Tensor],  # (dim,)
    initial_state: Optional[Tensor],  # (batch, dim, d_state)
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns out (batch, dim, seqlen) in u's dtype, last state (batch, dim, d_state) float32 and the chunk-start
    checkpoints (batch, dim, n_chunks, d_state) float32."""
    _check_runtime(u.device)
    triton_fwd, _ = _kernels()
    interpret = triton_fwd.interpreting()
    u_k, delta_k, A_k, B_k, C_k, z_k = (_for_kernel(t, interpret) for t in (u, delta, A, B, C, z))
    D_k, bias_k, h0_k = (None if t is None else _for_kernel(t, interpret).contiguous()
                         for t in (D, delta_bias, initial_state))
    out = torch.empty(u.shape, device=u.device, dtype=u_k.dtype)  # (batch, dim, seqlen)
    logger.debug("triton selective scan forward: shape {}, B {}, blocks {}", tuple(u.shape), tuple(B.shape),
                 triton_fwd.block_sizes())
    last_state, ckpt = triton_fwd.selective_scan_fwd_launch(
        u_k, delta_k, A_k, _as_groups(B_k), _as_groups(C_k), D_k, z_k, bias_k, h0_k, delta_softplus, out)
    return out.to(u.dtype), last_state, ckpt


selective_scan_fwd_op = torch.library.custom_op("mamba_r1::selective_scan_fwd", mutates_args=())(_selective_scan_fwd)


@selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus):
    from mamba_r1.ops.selective_scan.triton_fwd import num_chunks

    batch, dim, seqlen = u.shape
    d_state = A.shape[1]
    out = u.new_empty(batch, dim, seqlen)
    last_state = u.new_empty(batch, dim, d_state, dtype=torch.float32)
    ckpt = u.new_empty(batch, dim, num_chunks(seqlen), d_state, dtype=torch.float32)
    return out, last_state, ckpt


def _selective_scan_bwd(
    dout: Tensor,  # (batch, dim, seqlen)
    dlast_state: Optional[Tensor],  # (batch, dim, d_state)
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial_state: Optional[Tensor],
    checkpoints: Tensor,  # (batch, dim, n_chunks, d_state) float32, from the forward
    delta_softplus: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of (u, delta, A, B, C, D, z, delta_bias, initial_state), each shaped and typed like its input; an
    absent optional input gets an empty placeholder (custom ops cannot return None)."""
    _check_runtime(u.device)
    triton_fwd, triton_bwd = _kernels()
    interpret = triton_fwd.interpreting()
    u_k, delta_k, A_k, B_k, C_k, z_k, dout_k = (_for_kernel(t, interpret) for t in (u, delta, A, B, C, z, dout))
    D_k, bias_k, dlast_k = (None if t is None else _for_kernel(t, interpret).contiguous()
                            for t in (D, delta_bias, dlast_state))
    du = torch.empty(u.shape, device=u.device, dtype=u_k.dtype)  # (batch, dim, seqlen)
    ddelta = torch.empty(delta.shape, device=u.device, dtype=delta_k.dtype)
    dz = None if z is None else torch.empty(z.shape, device=u.device, dtype=z_k.dtype)
    grads = triton_bwd.selective_scan_bwd_launch(
        dout_k, dlast_k, u_k, delta_k, A_k, _as_groups(B_k), _as_groups(C_k), D_k, z_k, bias_k, checkpoints,
        delta_softplus, initial_state is not None, du, ddelta, dz)

    def like(grad: Optional[Tensor], t: Optional[Tensor]) -> Tensor:
        if t is None:
            return u.new_empty(0)
        return grad.reshape(t.shape).to(t.dtype)

    return (du.to(u.dtype), ddelta.to(delta.dtype), like(grads["A"], A), like(grads["B"], B), like(grads["C"], C),
            like(grads["D"], D), like(dz, z), like(grads["delta_bias"], delta_bias),
            like(grads["initial_state"], initial_state))


selective_scan_bwd_op = torch.library.custom_op("mamba_r1::selective_scan_bwd", mutates_args=())(_selective_scan_bwd)


@selective_scan_bwd_op.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints, delta_softplus):
    def like(t):
        return u.new_empty(0) if t is None else t.new_empty(t.shape)

    return (like(u), like(delta), like(A), like(B), like(C), like(D), like(z), like(delta_bias), like(initial_state))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus = inputs
    ckpt = output[2]
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt)
    ctx.delta_softplus = delta_softplus


def _backward(ctx, dout, dlast_state, _dckpt):
    u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state = backward_op(
        ctx, selective_scan_bwd_op, _selective_scan_bwd)(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, ckpt, ctx.delta_softplus)
    return (du, ddelta, dA, dB, dC,
            dD if D is not None else None,
            dz if z is not None else None,
            ddelta_bias if delta_bias is not None else None,
            dinitial_state if initial_state is not None else None,
            None)


selective_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_SelectiveScanEager = eager_function("_SelectiveScanEager", _selective_scan_fwd, _setup_context, _backward)


def selective_scan_triton(
    u: Tensor,  # (batch, dim, seqlen)
    delta: Tensor,  # (batch, dim, seqlen)
    A: Tensor,  # (dim, d_state)
    B: Tensor,  # (batch, d_state, seqlen) or (batch, groups, d_state, seqlen)
    C: Tensor,  # (batch, d_state, seqlen) or (batch, groups, d_state, seqlen)
    D: Optional[Tensor] = None,  # (dim,)
    z: Optional[Tensor] = None,  # (batch, dim, seqlen)
    delta_bias: Optional[Tensor] = None,  # (dim,)
    delta_softplus: bool = False,
    initial_state: Optional[Tensor] = None,  # (batch, dim, d_state)
    return_last_state: bool = False,
):
    """The selective scan on the fused Triton kernels; arguments already checked by ``selective_scan``.

    Returns out (batch, dim, seqlen) in u's dtype, and the last state (batch, dim, d_state) float32 if asked.
    """
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
             "initial_state": initial_state}
    for name, t in named.items():
        if t is not None and t.dtype == torch.float64:
            raise TypeError(f"selective_scan(backend='triton') computes in float32 and takes float16, bfloat16 or "
                            f"float32; got {name} of dtype torch.float64. Use backend='ref' or 'torch' for float64.")
    out, last_state, _ = run_op(selective_scan_fwd_op, _SelectiveScanEager, u, delta, A, B, C, D, z, delta_bias,
                                initial_state, bool(delta_softplus))
    if return_last_state:
        return out, last_state
    return out


__all__ = ["selective_scan_triton", "selective_scan_fwd_op", "selective_scan_bwd_op"]
