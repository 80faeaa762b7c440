"""Shared test settings: Triton's CPU interpreter, tolerances per dtype, the relative-error measure."""

import os

import torch

# Triton reads TRITON_INTERPRET when it is first imported: set it before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Relative error ||out - ref|| / ||ref|| against the float64 reference (TARGETS.md).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}
# Gradients pass through a reverse recurrence and reductions over seqlen: one more order of accumulation error.
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Test tensors are tiny: a second OpenMP thread only adds synchronisation, and on a shared 2-core runner a
# descheduled thread stalls every parallel region (measured: the model tests take 101 s with 2 threads under load,
# 5 s with 1).
torch.set_num_threads(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN anywhere gives inf so it can never pass."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = b.norm().item()
    return (a - b).norm().item() / max(denom, 1e-30)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from an empty dynamo cache: the compile tests trace SwitchMoE.forward and MambaBlock.forward
    with other modules and patched backends, and the recompiles of one code object add up across the suite until
    dynamo's recompile limit (8) refuses the next test's fullgraph compile (seen on the GPU run, 2026-11-30)."""
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def autograd_node_names(out) -> set[str]:
    """Names of every node in out's autograd graph."""
    names, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(node.name())
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names
