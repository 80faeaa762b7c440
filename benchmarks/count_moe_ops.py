"""Count the aten ops (≈ kernel launches) of one SwitchMoE forward+backward, per stage, against a dense FFN.

    PYTHONPATH=. python benchmarks/count_moe_ops.py                       # CPU, small sizes, bf16, top-1: torch paths
    PYTHONPATH=. python benchmarks/count_moe_ops.py --kernels             # the CUDA paths (Triton kernels, interpreted)
    PYTHONPATH=. python benchmarks/count_moe_ops.py --top-k 2 --mask      # another routing case
    PYTHONPATH=. python benchmarks/count_moe_ops.py --device cuda --tokens 16384 --dim 1024 --expert-dim 4096
    PYTHONPATH=. python benchmarks/count_moe_ops.py --list                # every op, in order

A TorchDispatchMode sees every op below autograd, after composite ops are decomposed: what the backend runs. Ops
are sorted into kinds: "kernel" (launches work on the device: an aten op, or a Triton launch), "view" (views,
detach, aliasing: metadata only), "alloc" (empty/empty_like: an allocation, no kernel) and "custom op" (a
mamba_r1 custom op: not a kernel itself, its body is counted). Only kernels are in the totals. The count is per
aten op, not per GPU kernel: sort, topk, cumsum or index ops may launch two or three kernels on CUDA, a Triton
custom op launches one; and a few ops differ by device (F.one_hot checks the index range on CPU only).

Stages: the forward's ops go to the stage whose function is running (the functions SwitchMoE calls, wrapped here
by name); a backward op goes to the stage of the autograd node that runs it (nodes are labelled with the stage
that created them). "glue" is whatever runs between the stages (reshapes, the combine weights, the loss seed).
torch._grouped_mm runs on CPU in this torch; where it does not, pass --backend bmm.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import os
import sys
from collections import Counter, defaultdict
from contextlib import ExitStack, contextmanager

# --kernels runs the CUDA-only Triton paths on CPU through Triton's interpreter, which is read at triton's import.
if "--kernels" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch._library.custom_ops as custom_ops  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from mamba_r1.modules.mlp import MLP  # noqa: E402
from mamba_r1.modules.moe import SwitchMoE  # noqa: E402

STAGES = ("routing", "aux losses", "plan", "permute", "experts", "combine", "layer op", "glue", "accumulate grad")
# (module or class, attribute, stage): the functions SwitchMoE.forward calls, and the ones those call (an inner
# stage takes its own ops; the outer one keeps the rest). Attributes missing from this version of the layer are
# skipped, so the script counts older and newer layouts alike. route_and_plan (routing + plan + losses) counts as
# routing, its torch composition split into its parts; its Triton kernels are all routing.
STAGE_FUNCTIONS = (
    ("mamba_r1.modules.moe:SwitchMoE", "_router_logits", "routing"),
    ("mamba_r1.modules.moe:SwitchMoE", "_capacity", "routing"),
    ("mamba_r1.modules.moe", "route_tokens", "routing"),
    ("mamba_r1.modules.moe", "route_and_plan", "routing"),
    # route_and_permute (router logits, route_and_plan, permute_tokens): routing, but for the permutation it calls;
    # on the kernels' path eagerly its fused node's gather counts as routing too.
    ("mamba_r1.modules.moe", "route_and_permute", "routing"),
    ("mamba_r1.ops.moe_routing", "route_and_plan", "routing"),
    ("mamba_r1.ops.moe_routing", "permute_tokens", "permute"),
    ("mamba_r1.ops.moe_routing", "route_tokens", "routing"),
    ("mamba_r1.modules.moe:SwitchMoE", "_aux", "aux losses"),
    ("mamba_r1.ops.moe_routing", "router_losses_ref", "aux losses"),
    ("mamba_r1.modules.moe", "plan_grouped", "plan"),
    ("mamba_r1.modules.moe", "plan_padded", "plan"),
    ("mamba_r1.ops.moe_routing", "plan_grouped", "plan"),
    ("mamba_r1.ops.moe_routing", "plan_padded", "plan"),
    ("mamba_r1.modules.moe", "permute_tokens", "permute"),
    ("mamba_r1.modules.moe:SwitchExperts", "forward", "experts"),
    ("mamba_r1.modules.moe", "combine_tokens", "combine"),
    ("mamba_r1.modules.moe", "combine", "combine"),
    # On the kernels' path the whole layer is one op (ops/moe_layer.py): its ops and its one node.
    ("mamba_r1.modules.moe", "switch_moe_fused", "layer op"),
)
VIEW_OPS = {"detach", "alias", "lift_fresh", "_unsafe_view", "sym_size", "sym_stride", "sym_numel",
            "_local_scalar_dense"}
ALLOC_OPS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}


def op_kind(func) -> str:
    name = func.__name__.split(".")[0]
    if func.is_view or name in VIEW_OPS:
        return "view"
    if name in ALLOC_OPS:
        return "alloc"
    return "kernel"


def _tensors(obj):
    """Every tensor inside obj: tensors, tuples / lists / NamedTuples, dicts, dataclasses."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, field.name))


class StageCounter(TorchDispatchMode):
    """Records (phase, stage, kind, op) for every op; stages come from `self.stage` (forward) or the running
    autograd node's label (backward)."""

    def __init__(self):
        super().__init__()
        self.stage = "glue"
        self.in_launch = False
        self.node_stage: dict = {}
        self.records: list[tuple[str, str, str, str]] = []

    def label_graph(self, obj, stage: str) -> None:
        """Label every not-yet-labelled autograd node reachable from the tensors in obj."""
        todo = [t.grad_fn for t in _tensors(obj) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or node in self.node_stage:
                continue
            self.node_stage[node] = "accumulate grad" if type(node).__name__ == "AccumulateGrad" else stage
            todo.extend(next_fn for next_fn, _ in node.next_functions)

    @contextmanager
    def in_stage(self, stage: str, args):
        self.label_graph(args, self.stage)  # what reached this stage from outside belongs to the caller
        outer, self.stage = self.stage, stage
        try:
            yield
        finally:
            self.stage = outer

    def where(self) -> tuple[str, str]:
        node = torch._C._current_autograd_node()
        if node is None:
            return "forward", self.stage
        default = "accumulate grad" if type(node).__name__ == "AccumulateGrad" else "glue"
        return "backward", self.node_stage.get(node, default)

    def record_launch(self, name: str) -> None:
        self.records.append((*self.where(), "kernel", f"triton:{name}"))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_launch:
            return func(*args, **kwargs)
        opdef = custom_ops.OPDEFS.get(f"{func.namespace}::{func._opname}")
        if opdef is not None:
            # A custom op is not a kernel itself: run its body with this mode on, so its Triton launches and any
            # aten ops inside it are counted.
            self.records.append((*self.where(), "custom op", str(func)))
            with self:
                return opdef._init_fn(*args, **kwargs)
        self.records.append((*self.where(), op_kind(func), str(func)))
        return func(*args, **kwargs)


def _owner(path: str):
    module_name, _, class_name = path.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, class_name) if class_name else module


@contextmanager
def stages_wrapped(counter: StageCounter):
    """Wrap the STAGE_FUNCTIONS so their forward ops and autograd nodes are labelled, and count Triton launches."""
    def wrap(fn, stage):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with counter.in_stage(stage, (args, kwargs)):
                out = fn(*args, **kwargs)
                counter.label_graph(out, stage)
            return out
        return wrapped

    def count_launch(run):
        @functools.wraps(run)
        def wrapped(self, *args, **kwargs):
            counter.record_launch(getattr(self, "__name__", None) or getattr(self.fn, "__name__", "?"))
            counter.in_launch = True  # the interpreter's own tensor copies are not the kernel's work
            try:
                return run(self, *args, **kwargs)
            finally:
                counter.in_launch = False
        return wrapped

    with ExitStack() as stack:
        for path, name, stage in STAGE_FUNCTIONS:
            owner = _owner(path)
            original = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
            if original is None:
                continue
            setattr(owner, name, wrap(original, stage))
            stack.callback(setattr, owner, name, original)
        try:
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction
        except ImportError:
            pass
        else:
            for cls in (InterpretedFunction, JITFunction):
                stack.callback(setattr, cls, "run", cls.run)
                cls.run = count_launch(cls.run)
        yield


def count_step(step) -> StageCounter:
    counter = StageCounter()
    with stages_wrapped(counter), counter:
        step(counter)
    return counter


def summarize(counter: StageCounter) -> dict:
    table = defaultdict(Counter)  # stage -> Counter of (phase, kind)
    for phase, stage, kind, _ in counter.records:
        table[stage][phase, kind] += 1
    return table


def print_table(title: str, table: dict) -> None:
    print(f"\n{title}")
    print("| stage | fwd kernels | bwd kernels | total kernels | views | allocs | custom ops |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    totals = Counter()
    for stage in STAGES:
        if stage not in table:
            continue
        c = table[stage]
        fwd, bwd = c["forward", "kernel"], c["backward", "kernel"]
        views = c["forward", "view"] + c["backward", "view"]
        allocs = c["forward", "alloc"] + c["backward", "alloc"]
        custom = c["forward", "custom op"] + c["backward", "custom op"]
        totals.update(dict(fwd=fwd, bwd=bwd, views=views, allocs=allocs, custom=custom))
        print(f"| {stage} | {fwd} | {bwd} | {fwd + bwd} | {views} | {allocs} | {custom} |")
    print(f"| **total** | {totals['fwd']} | {totals['bwd']} | **{totals['fwd'] + totals['bwd']}** | "
          f"{totals['views']} | {totals['allocs']} | {totals['custom']} |")


def print_ops(counter: StageCounter) -> None:
    for phase, stage, kind, op in counter.records:
        if kind == "kernel":
            print(f"  {phase:8s} {stage:15s} {op}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--expert-dim", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--backend", choices=["grouped_mm", "bmm", "both"], default="both")
    parser.add_argument("--mask", action="store_true", help="mask out ~30%% of the tokens as padding")
    parser.add_argument("--list", action="store_true", help="print every kernel op in order")
    parser.add_argument("--kernels", action="store_true",
                        help="take the Triton paths the layer takes on CUDA (run by Triton's interpreter on CPU)")
    args = parser.parse_args()
    if args.kernels and torch.device(args.device).type == "cpu":
        import mamba_r1.ops.moe_combine as moe_combine
        import mamba_r1.ops.moe_expert_ffn as moe_expert_ffn
        import mamba_r1.ops.moe_routing as moe_routing

        # The layer's "auto" backends pick the kernels on CUDA tensors: pick them on CPU too.
        moe_routing.resolve_routing_backend = lambda backend, logits, priority: (
            "triton" if priority == "position" and logits.shape[0] > 0 else "torch")
        for module in (moe_routing, moe_combine, moe_expert_ffn):
            module.resolve_backend = lambda op, backend, device: "triton"

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    factory = dict(device=device, dtype=dtype)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.dim, **factory).requires_grad_()
    grad = torch.randn_like(x)
    mask = (torch.rand(args.tokens, device=device) > 0.3) if args.mask else None
    print(f"{args.tokens} tokens, dim {args.dim}, expert_dim {args.expert_dim}, {args.experts} experts, "
          f"top_k {args.top_k}, capacity factor {args.capacity_factor}, {args.dtype}, {device}"
          + (", masked" if mask is not None else ""))

    dense = MLP(args.dim, args.expert_dim * args.top_k, **factory)

    def dense_step(counter):
        dense(x).backward(grad)

    counter = count_step(dense_step)
    print_table("dense FFN (same active FLOPs), forward+backward", summarize(counter))
    if args.list:
        print_ops(counter)

    for backend in (("grouped_mm", "bmm") if args.backend == "both" else (args.backend,)):
        torch.manual_seed(0)
        moe = SwitchMoE(args.dim, num_experts=args.experts, expert_dim=args.expert_dim,
                        capacity_factor=args.capacity_factor, top_k=args.top_k, backend=backend, **factory)
        moe(x, mask=mask)  # warm-up: lazy imports and Triton compilation stay out of the count

        def moe_step(counter, moe=moe):
            out, aux = moe(x, mask=mask, return_aux=True)
            counter.label_graph((out, aux), "glue")
            torch.autograd.backward([out, aux.loss], [grad, None])

        x.grad = None
        moe.zero_grad(set_to_none=True)
        counter = count_step(moe_step)
        paths = "Triton kernels" if args.kernels or device.type == "cuda" else "torch paths"
        print_table(f"SwitchMoE backend={backend} ({paths}), forward+backward (incl. aux loss)", summarize(counter))
        if args.list:
            print_ops(counter)


if __name__ == "__main__":
    main()
