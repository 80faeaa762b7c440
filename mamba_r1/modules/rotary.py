"""Rotary position embedding (RoPE) with linear, NTK-aware and YaRN context scaling.

RoPE rotates each pair of features (x_i, x_{i + dim/2}) of a query or key by the angle `position * inv_freq_i`, so the
dot product of a rotated query and key depends only on their position difference. The "rotate half" pairing of
GPT-NeoX / Llama is used: the first and second halves of the rotated features form the pairs.

Scaling, for running past the context length `max_seq_len` the model was trained on (factor s):
  "linear" position interpolation: every frequency divided by s (positions / s);
  "ntk"    NTK-aware: base raised to base * s^(dim / (dim - 2)), which leaves the highest frequency alone and
           divides the lowest by exactly s;
  "yarn"   YaRN ("NTK-by-parts"): a frequency that turns r = max_seq_len / wavelength times over the original
           context is kept when r > beta_fast, divided by s when r < beta_slow, and blended linearly in r in between;
           cos/sin are multiplied by 0.1 * ln(s) + 1, which scales the attention logits by its square (the paper's
           temperature sqrt(1/t)).
"""

from __future__ import annotations

import math

import torch
from loguru import logger
from torch import nn

SCALINGS = (None, "linear", "ntk", "yarn")
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2 * cos.shape[-1] features of x; the rest (partial rotary) pass through.

    x: (batch, heads, seqlen, head_dim); cos, sin: float32, broadcastable to (batch, heads, seqlen, rotary_dim / 2).
    Arithmetic runs in float32 (float64 stays float64) whatever x's dtype; the result has x's dtype.
    """
    half = cos.shape[-1]
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x1, x2 = x[..., :2 * half].to(compute_dtype).chunk(2, dim=-1)
    # addcmul fuses a product into the sum: a decode step is launch-bound, so fewer kernels is faster.
    rotated = [torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin)]
    if x.shape[-1] > 2 * half:
        rotated.append(x[..., 2 * half:].to(compute_dtype))
    return torch.cat(rotated, dim=-1).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding for queries and keys `(batch, heads, seqlen, head_dim)`.

    Args:
        dim: number of rotated features per head (even); heads may be wider, the extra features pass through.
        base: RoPE base; the frequencies are base^(-2i/dim), i = 0 .. dim/2 - 1.
        max_seq_len: context length the model is trained on: the initial size of the cos/sin cache and, for
            "yarn", the original context the frequency ramp is measured against.
        scaling: None, "linear", "ntk" or "yarn" (see the module docstring).
        scaling_factor: context extension factor s >= 1; must be 1 when scaling is None.
        device: where the cos/sin cache is first built.

    The cos/sin cache is float32, grows on demand past max_seq_len, and is rebuilt in float32 if a dtype cast of
    the module (e.g. `.to(torch.bfloat16)`) reached it.
    """

    def __init__(self, dim: int, base: float = 10000, max_seq_len: int = 2048, scaling: str | None = None,
                 scaling_factor: float = 1.0, device: torch.device | str | None = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2 or dim % 2 != 0:
            raise ValueError(f"dim must be an even int >= 2 (the rotated head dimension); got {dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not 1 < base < math.inf:
            raise ValueError(f"base must be a finite number > 1; got {base!r}")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be an int >= 1; got {max_seq_len!r}")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}; got {scaling!r}")
        if (isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float))
                or not math.isfinite(scaling_factor)):
            raise ValueError(f"scaling_factor must be a finite number; got {scaling_factor!r}")
        if scaling is None and scaling_factor != 1.0:
            raise ValueError(f"scaling_factor must be 1.0 when scaling is None (pick a scaling to use it); "
                             f"got {scaling_factor!r}")
        if scaling is not None and scaling_factor < 1.0:
            raise ValueError(f"scaling_factor must be >= 1 (a context extension factor) with scaling={scaling!r}; "
                             f"got {scaling_factor!r}")
        if scaling == "ntk" and dim < 4:
            raise ValueError(f"scaling='ntk' needs dim >= 4 (its base exponent is dim / (dim - 2)); got dim={dim}")
        self.dim = dim
        self.base = float(base)
        self.max_seq_len = max_seq_len
        self.scaling = scaling
        self.scaling_factor = float(scaling_factor)
        # YaRN's temperature: multiplying both cos and sin by it scales q.k by its square.
        self.attention_scaling = 0.1 * math.log(self.scaling_factor) + 1.0 if scaling == "yarn" else 1.0
        device = torch.device("cpu") if device is None else torch.device(device)
        self.register_buffer("inv_freq", self._inv_freq_float64().to(device, torch.float32), persistent=False)
        cos, sin = self._build_tables(max_seq_len, device)
        self.register_buffer("cos_cached", cos, persistent=False)  # (positions, dim / 2) float32
        self.register_buffer("sin_cached", sin, persistent=False)  # (positions, dim / 2) float32

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, base={self.base:g}, max_seq_len={self.max_seq_len}, scaling={self.scaling!r}, "
                f"scaling_factor={self.scaling_factor:g}")

    def _inv_freq_float64(self) -> torch.Tensor:
        """The (scaled) inverse frequencies, (dim / 2,) float64 on CPU: computed once per cache build, exactly."""
        exponents = torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim  # (dim / 2,)
        if self.scaling == "ntk":
            base = self.base * self.scaling_factor ** (self.dim / (self.dim - 2))
            return base ** -exponents
        inv_freq = self.base ** -exponents
        if self.scaling == "linear":
            return inv_freq / self.scaling_factor
        if self.scaling == "yarn":
            rotations = self.max_seq_len * inv_freq / (2 * math.pi)  # turns over the original context
            keep = ((rotations - YARN_BETA_SLOW) / (YARN_BETA_FAST - YARN_BETA_SLOW)).clamp(0.0, 1.0)
            return keep * inv_freq + (1.0 - keep) * inv_freq / self.scaling_factor
        return inv_freq

    def _build_tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Angles reach length * inv_freq, thousands of radians: build in float64 so the float32 table is exact to
        # its last bit; backends without float64 (MPS) build on the CPU.
        build_device = device if device.type in ("cpu", "cuda") else torch.device("cpu")
        positions = torch.arange(length, dtype=torch.float64, device=build_device)  # (length,)
        angles = torch.outer(positions, self._inv_freq_float64().to(build_device))  # (length, dim / 2)
        cos = (angles.cos() * self.attention_scaling).to(device, torch.float32)
        sin = (angles.sin() * self.attention_scaling).to(device, torch.float32)
        return cos, sin

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `(>= length, dim / 2)` float32 on `device`, growing (doubling) the cache when too short."""
        cached = self.cos_cached
        if cached.shape[0] >= length and cached.device == device and cached.dtype == torch.float32:
            return self.cos_cached, self.sin_cached
        new_length = max(length, 2 * cached.shape[0]) if cached.shape[0] < length else cached.shape[0]
        logger.debug("RotaryEmbedding: building cos/sin cache for {} positions on {}", new_length, device)
        # Growth often happens while decoding under torch.inference_mode(); a cache built there would be an
        # inference tensor that a later training forward could not save for backward.
        with torch.inference_mode(False):
            self.cos_cached, self.sin_cached = self._build_tables(new_length, device)
            self.inv_freq = self._inv_freq_float64().to(device, torch.float32)
        return self.cos_cached, self.sin_cached

    def cos_sin(self, position_ids: torch.Tensor, max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `(batch, seqlen, dim / 2)` float32 for integer `position_ids (batch, seqlen)`.

        `max_position` is a host-side bound on position_ids: it sizes the cache without reading the tensor back
        from the device (no synchronisation, so cached decoding stays asynchronous). Trusted: callers that cannot
        bound the positions go through forward(), which checks them.
        """
        cos, sin = self.tables(max_position + 1, position_ids.device)
        return cos[position_ids], sin[position_ids]

    def forward(self, q: torch.Tensor, k: torch.Tensor, offset: int | torch.Tensor = 0,
                position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate q and k by position.

        q: (batch, q_heads, seqlen, head_dim); k: (batch, k_heads, seqlen, head_dim), head_dim >= dim.
        offset: int, or (batch,) integer tensor: token t of row b sits at position offset[b] + t (cached decoding).
        position_ids: (batch, seqlen) integer tensor of explicit per-row positions (e.g. left padding); replaces
            offset, which must then stay 0.
        Returns (q_rot, k_rot) in the dtypes of q and k.
        """
        self._check_qk(q, k)
        batch, _, seqlen, _ = q.shape
        if position_ids is not None:
            if not (isinstance(offset, int) and not isinstance(offset, bool) and offset == 0):
                raise ValueError("give either offset or position_ids, not both; got offset="
                                 f"{offset if isinstance(offset, int) else tuple(offset.shape)} with position_ids")
            positions = self._check_position_ids(position_ids, batch, seqlen)  # (batch, seqlen)
            if positions.device != q.device:
                raise ValueError(f"position_ids is on {positions.device} but q is on {q.device}")
        elif isinstance(offset, torch.Tensor):
            offset = self._check_offset_tensor(offset, batch)  # (batch,)
            if offset.device != q.device:
                raise ValueError(f"offset is on {offset.device} but q is on {q.device}")
            steps = torch.arange(seqlen, device=offset.device)
            positions = offset[:, None] + steps  # (batch, seqlen)
        elif isinstance(offset, int) and not isinstance(offset, bool):
            if offset < 0:
                raise ValueError(f"offset must be >= 0; got {offset}")
            cos, sin = self.tables(offset + seqlen, q.device)
            # One (seqlen, dim / 2) slice broadcasts over batch and heads: no gather on the common path.
            cos, sin = cos[offset:offset + seqlen], sin[offset:offset + seqlen]
            return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:
            raise TypeError(f"offset must be an int or a (batch,) integer tensor; got {type(offset).__name__}")
        if positions.numel() == 0:
            return q, k
        low, high = torch.aminmax(positions)
        if int(low) < 0:
            raise ValueError(f"positions must be >= 0; got a minimum of {int(low)}")
        cos, sin = self.cos_sin(positions, int(high))  # (batch, seqlen, dim / 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (batch, 1, seqlen, dim / 2): broadcast over heads
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _check_qk(self, q: torch.Tensor, k: torch.Tensor) -> None:
        for name, t in (("q", q), ("k", k)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
            if t.dim() != 4 or t.shape[-1] < self.dim:
                raise ValueError(f"{name} must be (batch, heads, seqlen, head_dim) with head_dim >= dim={self.dim}; "
                                 f"got shape {tuple(t.shape)}")
        if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
            raise ValueError(f"q and k must share batch, seqlen and head_dim; got q {tuple(q.shape)}, "
                             f"k {tuple(k.shape)}")
        if q.device != k.device:
            raise ValueError(f"q is on {q.device} but k is on {k.device}; both must be on one device")

    @staticmethod
    def _check_offset_tensor(offset: torch.Tensor, batch: int) -> torch.Tensor:
        if offset.dtype.is_floating_point or offset.dtype.is_complex or offset.dtype == torch.bool:
            raise TypeError(f"offset must be an integer tensor; got dtype {offset.dtype}")
        if tuple(offset.shape) != (batch,):
            raise ValueError(f"offset must be (batch,) = ({batch},); got shape {tuple(offset.shape)}")
        return offset.long()

    @staticmethod
    def _check_position_ids(position_ids: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
        if not isinstance(position_ids, torch.Tensor):
            raise TypeError(f"position_ids must be a torch.Tensor; got {type(position_ids).__name__}")
        if position_ids.dtype.is_floating_point or position_ids.dtype.is_complex or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must be an integer tensor; got dtype {position_ids.dtype}")
        if position_ids.dim() != 2 or position_ids.shape[1] != seqlen or position_ids.shape[0] not in (1, batch):
            raise ValueError(f"position_ids must be (batch, seqlen) = ({batch}, {seqlen}) or (1, {seqlen}); "
                             f"got shape {tuple(position_ids.shape)}")
        return position_ids.long()
