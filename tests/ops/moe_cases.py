"""Shared by the MoE kernel tests: hypothesis routing cases, their inputs and plans, and forcing the kernels' path."""

import torch
from hypothesis import strategies as st

import mamba_r1.ops.moe_combine as moe_combine
import mamba_r1.ops.moe_expert_ffn as moe_expert_ffn
import mamba_r1.ops.moe_routing as moe_routing
from mamba_r1.ops.moe_routing import route_and_plan
from tests.conftest import DEVICE

DTYPES = [torch.float32, torch.bfloat16]


@st.composite
def route_cases(draw):
    num_experts = draw(st.integers(1, 16))
    return dict(
        tokens=draw(st.integers(1, 45)),
        num_experts=num_experts,
        top_k=draw(st.integers(1, min(2, num_experts))),
        capacity=draw(st.one_of(st.none(), st.integers(0, 6))),
        capacity_in_tensor=draw(st.booleans()),
        masked=draw(st.booleans()),
        layout=draw(st.sampled_from(moe_routing.LAYOUTS)),
        seed=draw(st.integers(0, 2**16)),
    )


def route_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"])
    logits = torch.randn(case["tokens"], case["num_experts"], generator=gen) * 2
    valid = torch.rand(case["tokens"], generator=gen) > 0.3 if case["masked"] else None
    capacity = case["capacity"]
    if capacity is not None and case["capacity_in_tensor"]:
        capacity = torch.tensor(capacity, device=DEVICE)
    buffer = case["tokens"] if case["capacity"] is None else max(1, min(case["capacity"], case["tokens"]))
    return logits.to(DEVICE), None if valid is None else valid.to(DEVICE), capacity, buffer


def route(case, backend, logits=None):
    default_logits, valid, capacity, buffer = route_inputs(case)
    logits = default_logits if logits is None else logits
    return route_and_plan(logits, case["top_k"], capacity, valid, "position", case["layout"], buffer,
                          load_balance_coef=0.3, z_loss_coef=0.07, backend=backend)



def force_triton(monkeypatch, routing: bool = True) -> None:
    """Send combine and the expert FFN (and, with ``routing``, route_and_plan / route_and_permute) to the Triton
    kernels whatever the device: on CPU they then run under the interpreter."""
    for module in (moe_routing, moe_combine, moe_expert_ffn):
        monkeypatch.setattr(module, "resolve_backend", lambda op, backend, device: "triton")
    if routing:
        monkeypatch.setattr(moe_routing, "resolve_routing_backend", lambda backend, logits, priority: "triton")
