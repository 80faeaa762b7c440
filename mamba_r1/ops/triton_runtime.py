"""What every Triton-backed op shares: the guarded triton import, backend resolution for the decode-style ops, and
the check that a kernel can run where its tensors are.

Triton kernels run on CUDA, or on CPU under Triton's interpreter (TRITON_INTERPRET=1, read when triton decorates a
kernel, i.e. when the kernel's module is first imported), which is how CI tests them. The interpreter has no
bfloat16: half-precision inputs are upcast before a launch there (``for_kernel``).
"""

from __future__ import annotations

import contextlib

import torch

# Guarded because triton is Linux-only: without it the torch paths still work and a triton call says what is missing.
try:
    import triton
    import triton.language as tl

    jit = triton.jit
    IMPORT_ERROR = None
except ImportError as _err:  # pragma: no cover - exercised only where triton is absent
    triton = tl = None
    IMPORT_ERROR = _err

    def jit(fn):
        """Stand-in decorator: the kernel stays a plain function that check_triton_runtime never lets run."""
        return fn


HALF_DTYPES = (torch.float16, torch.bfloat16)
# Backends of the ops whose plain-PyTorch path is also their reference (state update, conv).
BACKENDS = ("auto", "torch", "triton")


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA tensors, "torch" otherwise; anything outside BACKENDS is a ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


_graph_kernels_on = False


@contextlib.contextmanager
def graph_kernels():
    """Inside this block, backend="auto" of the launch-bound ops (small_batch_linear, add_rms_norm) takes their Triton
    kernels on CUDA. generation's CUDA-graph decode step runs its warm-up and its capture in it: the kernels are
    compiled and loaded during the warm-up, and a replay launches nothing from Python."""
    global _graph_kernels_on
    previous, _graph_kernels_on = _graph_kernels_on, True
    try:
        yield
    finally:
        _graph_kernels_on = previous


def resolve_graph_backend(op: str, backend: str, device: torch.device) -> str:
    """For kernels that only pay off without launch overhead: "auto" -> "triton" on CUDA inside ``graph_kernels()``,
    "torch" otherwise; "torch" / "triton" as given.

    Triton's Python launcher costs tens of microseconds per call, an aten op a few: measured on an H200 (2026-11-30,
    bench_decode.py), the decode step's small-batch projections and fused add + norm took the CUDA-graphed step from
    0.667 to 0.587 ms per token, while launched eagerly they took it from 7.3 to 11.7 ms.
    """
    name = resolve_backend(op, backend, device)
    if backend == "auto" and name == "triton" and not _graph_kernels_on:
        return "torch"
    return name


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """True when autograd would record this call: grad mode on and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_triton_runtime(op: str, device: torch.device, interpreting: bool) -> None:
    """A Triton kernel runs on CUDA, or on CPU under Triton's interpreter; say what to do otherwise."""
    if triton is None:
        raise ImportError(f"{op}(backend='triton') needs the 'triton' package (Linux; `pip install triton`), which "
                          f"could not be imported ({IMPORT_ERROR}). Use backend='torch' instead.")
    if device.type == "cuda":
        return
    if device.type != "cpu":
        raise ValueError(f"{op}(backend='triton') runs on CUDA (or CPU under TRITON_INTERPRET=1); got tensors on "
                         f"{device}. Use backend='torch'.")
    if not interpreting:
        raise RuntimeError(
            f"{op}(backend='triton') got CPU tensors, but Triton's CPU interpreter is off. Use backend='torch' on "
            "CPU, or set the environment variable TRITON_INTERPRET=1 before anything imports triton (and before "
            "mamba_r1 is imported)."
        )


def built_for_interpreter(kernel) -> bool:
    """True when ``kernel`` was decorated for Triton's CPU interpreter: TRITON_INTERPRET=1 was set when triton
    decorated it (at its module's import); setting the variable later changes nothing."""
    return type(kernel).__name__ == "InterpretedFunction"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launch grids: triton.cdiv's value, but a plain function (triton's is a ConstexprFunction,
    ~1.4 µs a call on the host, and an eager SwitchMoE step made ~19 such calls)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (0 for 0), as triton.next_power_of_2 gives it, as a plain function."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def for_kernel(t: torch.Tensor | None, interpreting: bool) -> torch.Tensor | None:
    """What a kernel can read: any float dtype on GPU; no half precision under the interpreter."""
    if t is not None and interpreting and t.dtype in HALF_DTYPES:
        return t.float()
    return t


__all__ = ["BACKENDS", "HALF_DTYPES", "built_for_interpreter", "cdiv", "check_triton_runtime", "for_kernel",
           "graph_kernels", "jit", "needs_autograd", "next_power_of_2", "resolve_backend", "resolve_graph_backend",
           "tl", "triton"]
