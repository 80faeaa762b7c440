"""MambaBlock: the Mamba-1 mixer (Gu & Dao, 2023) with padding masks, chunked prefill and O(1) decoding.

Data flow for one row (parameter names follow mamba-ssm's ``Mamba`` so readers and checkpoints map one to one):
    x (seqlen, d_model) --in_proj--> x_in, z                              (seqlen, d_inner) each
    x_in --causal depthwise conv1d (kernel d_conv)--> SiLU --> u          (seqlen, d_inner)
    u --x_proj--> dt_low (dt_rank), B, C (d_state each);  dt_low --dt_proj weight--> delta (d_inner)
    selective_scan(u, delta, A = -exp(A_log), B, C, D, z, delta_bias = dt_proj.bias, softplus) --out_proj--> y

Recurrent state between calls (``MambaState``): the last d_conv - 1 conv inputs and the SSM state h.

``selective=False`` is the paper's ablation (Table 1, "Mamba" architecture with an S4 layer): dt, B and C become
learned parameters shared by every position (dt per channel, B and C per state), so the SSM is time-invariant; the
rest of the block, and the scan / step paths, are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from mamba_r1.ops.causal_conv1d import MAX_TRITON_WIDTH, causal_conv1d, causal_conv1d_update
from mamba_r1.ops.channel_major_linear import channel_major_linear
from mamba_r1.ops.decode_linear import small_batch_linear
from mamba_r1.ops.selective_scan import BACKENDS, selective_scan
from mamba_r1.ops.state_update import selective_state_update

DT_INITS = ("random", "constant")
# The decode ops have no "ref" backend: their torch path is the reference. "auto" = fused Triton kernels on CUDA.
STEP_BACKENDS = {"auto": "auto", "ref": "torch", "torch": "torch", "triton": "triton"}


@dataclass
class MambaState:
    """What a MambaBlock carries from one call to the next.

    conv_state: (batch, d_inner, d_conv - 1) in the activation dtype: the last d_conv - 1 inputs of the conv.
    ssm_state:  (batch, d_inner, d_state) float32: the selective-scan state h.
    """

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


class MambaBlock(nn.Module):
    """The Mamba-1 mixer: ``forward(x, mask=None, state=None)`` for sequences, ``step(x_t, state)`` for decoding.

    Padded positions (mask False) leave both states untouched and output exactly zero, so a row's real-token outputs
    and final state do not depend on how it was padded.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        scan_backend: str = "auto",
        layer_idx: int | None = None,
        selective: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not expand > 0 or int(expand * d_model) < 1:
            raise ValueError(f"expand must be > 0 with int(expand * d_model) >= 1; got expand={expand!r}")
        if dt_rank != "auto" and (not isinstance(dt_rank, int) or dt_rank < 1):
            raise ValueError(f"dt_rank must be 'auto' or a positive int; got {dt_rank!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"dt_min and dt_max must satisfy 0 < dt_min <= dt_max; got {dt_min!r}, {dt_max!r}")
        if dt_init not in DT_INITS:
            raise ValueError(f"dt_init must be one of {DT_INITS}; got {dt_init!r}")
        if scan_backend not in BACKENDS:
            raise ValueError(f"scan_backend must be one of {BACKENDS}; got {scan_backend!r}")
        if not isinstance(selective, bool):
            raise ValueError(f"selective must be a bool; got {selective!r}")
        factory = dict(device=device, dtype=dtype)
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.scan_backend = scan_backend
        self.layer_idx = layer_idx
        self.selective = selective

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        # No built-in padding: forward prepends the left context itself (zeros, or the carried conv state).
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, bias=conv_bias,
                                **factory)
        if selective:
            self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
            # The bias is passed to the scan as delta_bias (added before the softplus there), not applied by the Linear.
            self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        else:
            # S4D's initialisation for the time-invariant ablation: B = 1, C ~ N(0, 1); dt as in the selective case.
            self.dt_bias = nn.Parameter(torch.empty(self.d_inner, **factory))  # (d_inner,)
            self.B = nn.Parameter(torch.ones(d_state, **factory))  # (d_state,)
            self.C = nn.Parameter(torch.randn(d_state, **factory))  # (d_state,)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self._init_dt(dt_init, dt_scale, dt_min, dt_max, dt_init_floor)

        # S4D-real: A[d, n] = -(n + 1) for every channel, stored as a log so A stays negative under training.
        # Kept float32 whatever `dtype` is: exp(dt * A) over long sequences needs the mantissa.
        A = repeat(torch.arange(1, d_state + 1, dtype=torch.float32, device=device), "state -> dim state",
                   dim=self.d_inner)
        self.A_log = nn.Parameter(torch.log(A).contiguous())  # (d_inner, d_state)
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, dtype=torch.float32, device=device))  # (d_inner,)
        self.D._no_weight_decay = True

    @torch.no_grad()
    def _init_dt(self, dt_init: str, dt_scale: float, dt_min: float, dt_max: float, dt_init_floor: float):
        """Mamba paper's dt initialisation: softplus(dt bias) is log-uniform in [dt_min, dt_max]."""
        if self.selective:
            std = self.dt_rank ** -0.5 * dt_scale
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj.weight, std)
            else:
                nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt_bias = self.dt_proj.bias if self.selective else self.dt_bias  # (d_inner,)
        log_dt = (torch.rand(self.d_inner, device=dt_bias.device) * (math.log(dt_max) - math.log(dt_min))
                  + math.log(dt_min))
        dt = torch.exp(log_dt).clamp(min=dt_init_floor)
        # Inverse of softplus: dt + log(1 - exp(-dt)), written with expm1 to stay accurate for small dt.
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # Tells a model-level initialiser not to overwrite this bias (mamba-ssm's convention).
        dt_bias._no_reinit = True

    def _ssm_params(
        self, u: torch.Tensor,  # (batch, d_inner, seqlen)
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """delta (batch, d_inner, seqlen) before its bias, B and C (batch, d_state, seqlen), and the bias (d_inner,).

        Selective: all three are projections of u. Otherwise delta is zero (dt = softplus(bias) per channel) and B,
        C are the same at every position, so nothing about the SSM depends on the input.
        """
        if not self.selective:
            batch, _, seqlen = u.shape
            B = repeat(self.B.to(u.dtype), "state -> batch state seqlen", batch=batch, seqlen=seqlen)
            C = repeat(self.C.to(u.dtype), "state -> batch state seqlen", batch=batch, seqlen=seqlen)
            return torch.zeros_like(u), B.contiguous(), C.contiguous(), self.dt_bias.float()
        x_dbl = channel_major_linear(self.x_proj.weight, u)  # (batch, dt_rank + 2 * d_state, seqlen)
        # B, C: (batch, d_state, seqlen) views with time stride 1, read in place by the scan.
        dt_low, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = channel_major_linear(self.dt_proj.weight, dt_low)  # (batch, d_inner, seqlen)
        return delta, B, C, self.dt_proj.bias.float()

    # ------------------------------------------------------------------ state

    def allocate_state(self, batch_size: int, device=None, dtype=None) -> MambaState:
        """Zero state for ``batch_size`` rows; dtype is the conv state's (activations'), the SSM state is float32."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv - 1, device=device, dtype=dtype)
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=torch.float32)
        return MambaState(conv_state=conv_state, ssm_state=ssm_state)

    def _check_state(self, state, batch: int) -> None:
        if not isinstance(state, MambaState):
            raise TypeError(f"state must be a MambaState (see allocate_state); got {type(state).__name__}")
        expected = (batch, self.d_inner, self.d_conv - 1)
        if tuple(state.conv_state.shape) != expected:
            raise ValueError(f"state.conv_state must be (batch, d_inner, d_conv - 1) = {expected}; "
                             f"got {tuple(state.conv_state.shape)}")
        expected = (batch, self.d_inner, self.d_state)
        if tuple(state.ssm_state.shape) != expected:
            raise ValueError(f"state.ssm_state must be (batch, d_inner, d_state) = {expected}; "
                             f"got {tuple(state.ssm_state.shape)}")
        if state.ssm_state.dtype != torch.float32:
            raise TypeError(f"state.ssm_state must be float32; got dtype {state.ssm_state.dtype}")

    def _check_forward_args(self, x, mask, state) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"x must be a floating-point torch.Tensor; got {got}")
        if x.dim() != 3 or x.shape[-1] != self.d_model or x.shape[1] < 1:
            raise ValueError(f"x must be (batch, seqlen, d_model) with d_model={self.d_model} and seqlen >= 1; "
                             f"got shape {tuple(x.shape)}")
        batch, seqlen, _ = x.shape
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise TypeError(f"mask must be a bool tensor (True = real token); got {got}")
            if tuple(mask.shape) != (batch, seqlen):
                raise ValueError(f"mask must be (batch, seqlen) = {(batch, seqlen)}; got {tuple(mask.shape)}")
        if state is not None:
            self._check_state(state, batch)

    # ------------------------------------------------------------------ sequences

    def forward(
        self,
        x: torch.Tensor,  # (batch, seqlen, d_model)
        mask: torch.Tensor | None = None,  # (batch, seqlen) bool, True = real token
        state: MambaState | None = None,
    ):
        """Returns y (batch, seqlen, d_model), or ``(y, new_state)`` when ``state`` is given.

        ``state`` is read, not modified; ``new_state`` holds fresh tensors (the state after the last real token).
        """
        self._check_forward_args(x, mask, state)
        if mask is not None:
            # Pad embeddings may be anything (even uninitialised memory); zeros keep NaN/inf out of 0 * x products.
            x = x.masked_fill(~mask[..., None], 0.0)
        # Channel-major from here on: every (batch, d_inner, seqlen) operand of the conv and the scan has time stride 1.
        # xz: (batch, 2 * d_inner, seqlen)
        xz = channel_major_linear(self.in_proj.weight, x.transpose(1, 2), self.in_proj.bias)
        x_in, z = xz.chunk(2, dim=1)  # (batch, d_inner, seqlen) views each
        u, conv_state = self._causal_conv(x_in, mask, None if state is None else state.conv_state)

        delta, B, C, delta_bias = self._ssm_params(u)
        if mask is not None:
            # softplus(-inf) = 0 exactly: dt = 0 makes the step the identity on h (decay exp(0) = 1, input 0).
            delta = delta.masked_fill(~mask[:, None, :], float("-inf"))

        scanned = selective_scan(
            u, delta, -torch.exp(self.A_log.float()), B, C, D=self.D.float(), z=z,
            delta_bias=delta_bias, delta_softplus=True,
            initial_state=None if state is None else state.ssm_state, return_last_state=state is not None,
            backend=self.scan_backend,
        )
        out, ssm_state = scanned if state is not None else (scanned, None)  # out: (batch, d_inner, seqlen)
        if ssm_state is not None:
            # A backend may return a view into a per-chunk buffer; the carried state lives for a whole generation.
            ssm_state = ssm_state.clone(memory_format=torch.contiguous_format)
        # (batch, seqlen, d_model): out read transposed by the GEMM, no copy.
        y = channel_major_linear(self.out_proj.weight, out, self.out_proj.bias, time_major_out=True)
        if mask is not None:
            y = y.masked_fill(~mask[..., None], 0.0)
        if state is None:
            return y
        return y, MambaState(conv_state=conv_state, ssm_state=ssm_state)

    def _causal_conv(
        self,
        x_in: torch.Tensor,  # (batch, d_inner, seqlen)
        mask: torch.Tensor | None,  # (batch, seqlen) bool
        context: torch.Tensor | None,  # (batch, d_inner, d_conv - 1): inputs before x_in[..., 0]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SiLU of the causal depthwise conv over real tokens only. Returns (u (batch, d_inner, seqlen), new conv state
        or None).

        Without a mask: the fused conv + SiLU op (Triton on CUDA: reads x_in in place, no padded copy). With a mask,
        each row is compacted so its real tokens come first in order; the conv then never sees a pad between two real
        tokens, and the pads (all at the end) cannot reach real outputs through a causal kernel.
        """
        batch, d_inner, seqlen = x_in.shape
        width = self.d_conv - 1
        weight, bias = self.conv1d.weight, self.conv1d.bias  # (d_inner, 1, d_conv), (d_inner,)
        if mask is None:
            backend = STEP_BACKENDS[self.scan_backend]
            if backend == "triton" and self.d_conv > MAX_TRITON_WIDTH:
                backend = "torch"  # the fused kernel unrolls its taps up to MAX_TRITON_WIDTH
            u = causal_conv1d(x_in, weight, bias, silu=True, initial_state=context if width else None,
                              backend=backend)
            if context is None:
                return u, None
            # The new state is the last `width` inputs, reaching back into the context when seqlen < width; a copy,
            # not a slice, so the state carried through a generation does not pin the whole (.., seqlen) buffer.
            inputs = x_in if seqlen >= width else torch.cat([context.to(x_in.dtype), x_in], dim=-1)
            return u, inputs[..., inputs.shape[-1] - width:].clone(memory_format=torch.contiguous_format)

        # Stable sort on "is pad" puts real tokens first, keeping their order.
        order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)  # (batch, seqlen)
        x_in = x_in.gather(-1, repeat(order, "batch seqlen -> batch dim seqlen", dim=d_inner))
        if context is None:
            context = x_in.new_zeros(batch, d_inner, width)
        padded = torch.cat([context.to(x_in.dtype), x_in], dim=-1)  # (batch, d_inner, width + seqlen)
        out = F.conv1d(padded, weight, bias, groups=d_inner)  # (batch, d_inner, seqlen)

        # The new state is the last `width` real inputs, reaching back into the context when a row has fewer.
        last = mask.sum(-1)[:, None] + torch.arange(width, device=x_in.device)  # (batch, width) into `padded`
        conv_state = padded.gather(-1, repeat(last, "batch width -> batch dim width", dim=d_inner))

        inverse = torch.argsort(order, dim=-1)  # position of each original token in the compacted row
        out = out.gather(-1, repeat(inverse, "batch seqlen -> batch dim seqlen", dim=d_inner))
        return F.silu(out), conv_state

    # ------------------------------------------------------------------ decoding

    def step(self, x_t: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaState]:
        """One token: x_t (batch, d_model) -> y_t (batch, d_model). Updates ``state`` in place and returns it.

        Fixed shapes and no allocation that grows with the position, so a decode loop can be CUDA-graphed.
        """
        if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point():
            got = x_t.dtype if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise TypeError(f"x_t must be a floating-point torch.Tensor; got {got}")
        if x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            raise ValueError(f"x_t must be (batch, d_model) with d_model={self.d_model}; got shape {tuple(x_t.shape)}")
        self._check_state(state, x_t.shape[0])

        # Two fused kernels between in_proj, x_proj and out_proj on CUDA (dt_proj runs inside the state update; about
        # two dozen small kernels before). Parameters
        # go in as they are, in any dtype: the kernels cast as they load, so no per-step conversion kernel runs.
        backend = STEP_BACKENDS[self.scan_backend]
        # The projections stream their weights once at small batch (small_batch_linear; F.linear otherwise).
        x_in, z = small_batch_linear(x_t, self.in_proj.weight, self.in_proj.bias,
                                     backend).chunk(2, dim=-1)  # (batch, d_inner) each
        u = causal_conv1d_update(x_in, state.conv_state, self.conv1d.weight[:, 0, :], self.conv1d.bias, silu=True,
                                 backend=backend)  # (batch, d_inner)

        dt_weight = None
        if self.selective:
            # dt_low, B, C: strided views into x_proj's output, read in place; dt_proj's matmul runs inside the
            # state-update kernel (dt = dt_low @ dt_proj.weight.T), its bias as dt_bias.
            dt, B, C = small_batch_linear(u, self.x_proj.weight, None, backend).split(
                [self.dt_rank, self.d_state, self.d_state], dim=-1)
            dt_weight, dt_bias = self.dt_proj.weight, self.dt_proj.bias
        else:
            batch = u.shape[0]
            dt, dt_bias = torch.zeros_like(u), self.dt_bias
            # As in forward's _ssm_params (rounded to the activation dtype), broadcast over rows without a copy.
            B = self.B.to(u.dtype).expand(batch, -1)  # (batch, d_state)
            C = self.C.to(u.dtype).expand(batch, -1)
        # A_log goes in raw: the kernel takes -exp of it as it loads, so nothing derived from a parameter outlives
        # the step (a captured CUDA graph stays valid across in-place weight updates).
        y = selective_state_update(state.ssm_state, u, dt, self.A_log, B, C, D=self.D, z=z, dt_bias=dt_bias,
                                   dt_softplus=True, backend=backend, A_is_log=True,
                                   dt_weight=dt_weight)  # (batch, d_inner)
        return small_batch_linear(y, self.out_proj.weight, self.out_proj.bias, backend), state

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, selective={self.selective}, scan_backend={self.scan_backend!r}, "
                f"layer_idx={self.layer_idx}")


__all__ = ["MambaBlock", "MambaState"]
