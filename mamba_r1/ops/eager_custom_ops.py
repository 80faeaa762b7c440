"""Custom ops that skip the dispatcher when nobody traces them.

Every MoE kernel (moe_routing.py, moe_combine.py, moe_expert_ffn.py) is a torch custom op with a fake and a
registered autograd, which torch.compile, export and opcheck use. Eagerly, ``run_op`` runs the op's Python body under
a plain autograd.Function with the op's own setup_context and backward (``eager_function``), and that backward calls
the backward op's body (``backward_op``): the same kernels, without the dispatcher's per-call host cost.
"""

from __future__ import annotations

import torch


def tracing() -> bool:
    """Whether torch.compile / export is tracing: then the custom ops run, eagerly their Python bodies. Callers look
    it up through this module (``eager_custom_ops.tracing()``), so tests can send eager calls down the traced wiring
    by patching it here: patching torch.compiler.is_compiling itself while a custom op runs leaves dynamo unable to
    trace is_compiling for the rest of the process."""
    return torch.compiler.is_compiling()


def run_op(op, eager, *args):
    """Call a custom op. Eagerly, its Python body runs under ``eager`` (a plain autograd.Function with the same
    setup_context and backward, from eager_function): the dispatcher and custom_op's autograd wrapper cost some
    20 µs of host time per call and backward on a 2-core CPU, many times that on a slow host, and the layer is
    host-bound there (benchmarks/moe_breakdown.py). Under torch.compile / export the op itself, whose schema and fake
    the tracer needs."""
    if tracing():
        return op(*args)
    return eager.apply(*args)


def backward_op(ctx, op, body):
    """What a backward calls: the backward op's Python body when its forward ran eagerly (run_op), the op itself when
    the forward was traced, or when a backward is being traced (compiled autograd)."""
    return body if getattr(ctx, "eager", False) and not tracing() else op


def eager_function(name: str, body, setup_context, backward) -> type[torch.autograd.Function]:
    """An autograd.Function running a custom op's body with the op's own setup_context and backward."""

    def forward(ctx, *args):
        ctx.eager = True
        output = body(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


__all__ = ["backward_op", "eager_function", "run_op", "tracing"]
