"""selective_scan(): argument checks in one place, then dispatch to a backend.

Backends (all compute the same function, see ref.py for the math):
  "ref"    the sequential recurrence, the specification;
  "torch"  a chunked scan in plain PyTorch, the fast path on CPU;
  "triton" fused Triton forward and backward kernels (CUDA, or CPU under TRITON_INTERPRET=1);
  "auto"   triton for CUDA tensors, torch otherwise.
"""

from __future__ import annotations

import torch

from mamba_r1.ops.selective_scan.ref import selective_scan_ref

BACKENDS = ("auto", "ref", "torch", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a real floating-point tensor (float16, bfloat16, float32 or float64); "
                        f"got dtype {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], layout: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must be {layout} = {expected}; got {tuple(t.shape)}")


def check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    """Validate selective_scan's inputs; raise ValueError/TypeError naming the argument, expected and given."""
    _check_float("u", u)
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, dim, seqlen); got shape {tuple(u.shape)}")
    batch, dim, seqlen = u.shape
    if seqlen == 0:
        raise ValueError(f"u must have seqlen >= 1; got shape {tuple(u.shape)}")
    _check_float("delta", delta)
    _check_shape("delta", delta, (batch, dim, seqlen), "(batch, dim, seqlen)")
    _check_float("A", A)
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (dim, d_state) with dim={dim}; got shape {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, BC in (("B", B), ("C", C)):
        _check_float(name, BC)
        if BC.dim() == 3:
            _check_shape(name, BC, (batch, d_state, seqlen), "(batch, d_state, seqlen)")
        elif BC.dim() == 4:
            groups = BC.shape[1]
            if groups < 1 or dim % groups != 0:
                raise ValueError(f"{name} has {groups} groups, which must divide dim={dim}; got shape {tuple(BC.shape)}")
            _check_shape(name, BC, (batch, groups, d_state, seqlen), "(batch, groups, d_state, seqlen)")
        else:
            raise ValueError(f"{name} must be (batch, d_state, seqlen) or (batch, groups, d_state, seqlen) with "
                             f"batch={batch}, d_state={d_state}, seqlen={seqlen}; got shape {tuple(BC.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _check_float(name, t)
            _check_shape(name, t, (dim,), "(dim,)")
    if z is not None:
        _check_float("z", z)
        _check_shape("z", z, (batch, dim, seqlen), "(batch, dim, seqlen)")
    if initial_state is not None:
        _check_float("initial_state", initial_state)
        _check_shape("initial_state", initial_state, (batch, dim, d_state), "(batch, dim, d_state)")
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
             "initial_state": initial_state}
    for name, t in named.items():
        if t is not None and t.device != u.device:
            raise ValueError(f"{name} is on {t.device} but u is on {u.device}; all inputs must be on one device")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def selective_scan(
    u: torch.Tensor,  # (batch, dim, seqlen)
    delta: torch.Tensor,  # (batch, dim, seqlen)
    A: torch.Tensor,  # (dim, d_state)
    B: torch.Tensor,  # (batch, d_state, seqlen) or (batch, groups, d_state, seqlen)
    C: torch.Tensor,  # (batch, d_state, seqlen) or (batch, groups, d_state, seqlen)
    D: torch.Tensor | None = None,  # (dim,)
    z: torch.Tensor | None = None,  # (batch, dim, seqlen)
    delta_bias: torch.Tensor | None = None,  # (dim,)
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,  # (batch, dim, d_state), float32
    return_last_state: bool = False,
    backend: str = "auto",
):
    """Mamba's selective scan (same layout and meaning as mamba-ssm's ``selective_scan_fn``, plus an initial state).

    Returns ``out`` (batch, dim, seqlen) in u's dtype, or ``(out, last_state)`` with last_state (batch, dim, d_state)
    in float32 when ``return_last_state=True``. Differentiable in every tensor input on every backend. On CUDA the
    Triton backward adds the gradients of B and C over channels with float32 atomics (as mamba-ssm's kernel does), so
    those two may differ in their last bits from run to run; every other output and gradient is reproducible.
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    kwargs = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, initial_state=initial_state,
                  return_last_state=return_last_state)
    name = resolve_backend(backend, u.device)
    if name == "ref":
        return selective_scan_ref(u, delta, A, B, C, **kwargs)
    if name == "torch":
        from mamba_r1.ops.selective_scan.chunked import selective_scan_chunked

        return selective_scan_chunked(u, delta, A, B, C, **kwargs)
    from mamba_r1.ops.selective_scan.autograd import selective_scan_triton

    return selective_scan_triton(u, delta, A, B, C, **kwargs)


__all__ = ["selective_scan", "selective_scan_ref", "check_scan_args", "BACKENDS"]
