"""Causal self-attention (multi-head or grouped-query) with RoPE and a preallocated KV cache.

The optional attention mixer of the hybrid model (Jamba-style: one attention layer among Mamba layers). It follows the
mixer protocol of MambaBlock so the model can treat every mixer alike:
  forward(x, mask=None, state=None) -> y, or (y, state) when a state is given (continue from it: chunked prefill);
  allocate_state(batch_size, device=None, dtype=None, max_seqlen=None) -> an empty KVCache;
  step(x_t, state) -> (y_t, state), the state updated in place.

Padding: `mask (batch, seqlen)` bool, True = real token. The RoPE position of a token is the number of real tokens
before it in its row, and a padded key is never attended to, so a left-padded row gives the same outputs on its real
tokens as the same row without padding; outputs at padded positions are exactly zero.

The KV cache is slot-based: every call appends `seqlen` slots to every row (real or padded tokens alike), and a per-row
key mask marks which slots hold real tokens. So a row's positions, which count real tokens only, never exceed the
number of filled slots: that host-side bound sizes the RoPE table without reading positions back from the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from loguru import logger
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mamba_r1.modules.rotary import RotaryEmbedding, apply_rotary

# cuDNN attention builds an execution plan for every new shape (about 70 ms each on an H100 with torch 2.11: a
# 100-token decode took 71 ms per step with it, 0.9 ms once the plans existed), and a growing cache gives every call
# a new key length. The cached paths therefore leave it out; the uncached paths, whose shapes repeat in training,
# keep SDPA's default choice.
_VARYING_SHAPE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, in preallocated buffers that grow (doubling) when full."""

    k: torch.Tensor  # (batch, kv_heads, capacity, head_dim)
    v: torch.Tensor  # (batch, kv_heads, capacity, head_dim)
    key_mask: torch.Tensor  # (batch, capacity) bool: True where a filled slot holds a real token
    next_position: torch.Tensor  # (batch,) int64: RoPE position of each row's next real token
    filled: int = 0  # slots written so far, the same for every row

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def reserve(self, length: int) -> None:
        """Make room for `length` slots, copying the filled ones into buffers of max(length, 2 * capacity)."""
        if length <= self.capacity:
            return
        new_capacity = max(length, 2 * self.capacity)
        logger.debug("KVCache: growing from {} to {} slots", self.capacity, new_capacity)
        batch, kv_heads, _, head_dim = self.k.shape
        k = self.k.new_zeros(batch, kv_heads, new_capacity, head_dim)
        v = self.v.new_zeros(batch, kv_heads, new_capacity, head_dim)
        key_mask = self.key_mask.new_zeros(batch, new_capacity)
        k[:, :, :self.filled] = self.k[:, :, :self.filled]
        v[:, :, :self.filled] = self.v[:, :, :self.filled]
        key_mask[:, :self.filled] = self.key_mask[:, :self.filled]
        self.k, self.v, self.key_mask = k, v, key_mask

    def append(self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Write `k, v (batch, kv_heads, seqlen, head_dim)` into the next slots; `mask (batch, seqlen)` or None."""
        seqlen = k.shape[2]
        start, end = self.filled, self.filled + seqlen
        self.reserve(end)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Attention of this call saves a view of the buffers for backward; a later call writing into them in
            # place would invalidate it, so under autograd each call writes into fresh copies.
            self.k, self.v = self.k.clone(), self.v.clone()
        self.k[:, :, start:end] = k.to(self.k.dtype)
        self.v[:, :, start:end] = v.to(self.v.dtype)
        if mask is None:
            self.key_mask[:, start:end] = True
            self.next_position += seqlen
        else:
            self.key_mask[:, start:end] = mask
            self.next_position += mask.sum(dim=1)
        self.filled = end


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention, the specification the scaled_dot_product_attention paths are tested against.

    q: (batch, heads, q_len, head_dim); k, v: (batch, kv_heads, k_len, head_dim), heads a multiple of kv_heads,
    query head h reading kv head h // (heads // kv_heads); allowed: (batch, q_len, k_len) bool.
    Returns (batch, heads, q_len, head_dim); a query row with no allowed key gives zeros.
    """
    groups = q.shape[1] // k.shape[1]
    k = repeat(k, "batch kv_heads keys head_dim -> batch (kv_heads groups) keys head_dim", groups=groups)
    v = repeat(v, "batch kv_heads keys head_dim -> batch (kv_heads groups) keys head_dim", groups=groups)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (batch, heads, q_len, k_len)
    allowed = allowed[:, None]  # (batch, 1, q_len, k_len)
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with every key masked: softmax of -inf is NaN
    return weights @ v


class CausalSelfAttention(nn.Module):
    """Causal multi-head / grouped-query self-attention with RoPE, on F.scaled_dot_product_attention.

    Args:
        dim: model width.
        num_heads: query heads.
        num_kv_heads: key/value heads (GQA), dividing num_heads; default num_heads (MHA).
        head_dim: per-head width; default dim // num_heads (dim must then be divisible by num_heads).
        rotary: apply RoPE to queries and keys; False gives no position encoding (as in Jamba's attention layers).
        rope_base, rope_scaling, rope_scaling_factor: RotaryEmbedding's base, scaling and scaling_factor.
        max_seq_len: trained context (RoPE table, YaRN's original length) and the default KV cache capacity.
        bias: biases on the input and output projections.
        dropout: dropout on the attention weights, in training mode only.
        layer_idx: position of the layer in the model, kept for the generation cache.

    Parameters: `in_proj` (dim -> (num_heads + 2 * num_kv_heads) * head_dim, laid out [q | k | v], each
    "(heads head_dim)") and `out_proj` (num_heads * head_dim -> dim).
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int | None = None, head_dim: int | None = None,
                 rotary: bool = True, rope_base: float = 10000, rope_scaling: str | None = None,
                 rope_scaling_factor: float = 1.0, max_seq_len: int = 2048, bias: bool = False, dropout: float = 0.0,
                 layer_idx: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads), ("max_seq_len", max_seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
            raise ValueError(f"num_kv_heads must be an int >= 1 or None; got {num_kv_heads!r}")
        if num_heads % num_kv_heads != 0:
            raise ValueError(f"num_heads must be a multiple of num_kv_heads; got num_heads={num_heads}, "
                             f"num_kv_heads={num_kv_heads}")
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"dim must be divisible by num_heads when head_dim is not given; got dim={dim}, "
                                 f"num_heads={num_heads}")
            head_dim = dim // num_heads
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be an int >= 1 or None; got {head_dim!r}")
        if rotary and head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for rotary embeddings; got head_dim={head_dim}")
        if not rotary and rope_scaling is not None:
            raise ValueError(f"rope_scaling needs rotary=True; got rope_scaling={rope_scaling!r} with rotary=False")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1); got {dropout!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.dropout = float(dropout)
        self.layer_idx = layer_idx
        factory = {"device": device, "dtype": dtype}
        self.in_proj = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(num_heads * head_dim, dim, bias=bias, **factory)
        self.rotary = (RotaryEmbedding(head_dim, base=rope_base, max_seq_len=max_seq_len, scaling=rope_scaling,
                                       scaling_factor=rope_scaling_factor, device=device) if rotary else None)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dropout={self.dropout}, layer_idx={self.layer_idx}")

    # ------------------------------------------------------------------ public protocol

    def allocate_state(self, batch_size: int, device: torch.device | str | None = None,
                       dtype: torch.dtype | None = None, max_seqlen: int | None = None) -> KVCache:
        """An empty KV cache with room for `max_seqlen` (default max_seq_len) slots; it grows if exceeded."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        capacity = self.max_seq_len if max_seqlen is None else max_seqlen
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"max_seqlen must be an int >= 1 or None; got {max_seqlen!r}")
        weight = self.in_proj.weight
        device = weight.device if device is None else torch.device(device)
        dtype = weight.dtype if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype; got {dtype}")
        shape = (batch_size, self.num_kv_heads, capacity, self.head_dim)
        return KVCache(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            key_mask=torch.zeros(batch_size, capacity, device=device, dtype=torch.bool),
            next_position=torch.zeros(batch_size, device=device, dtype=torch.long),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                state: KVCache | None = None) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """x: (batch, seqlen, dim); mask: (batch, seqlen) bool or None; state: a KVCache to continue from.

        Returns y (batch, seqlen, dim), or (y, state) when a state is given (the same object, updated in place).
        """
        self._check_input(x, mask)
        if state is not None:
            self._check_state(state, x)
            return self._forward_cached(x, mask, state), state
        if mask is None:
            return self._forward_causal(x)
        return self._forward_masked(x, mask)

    def step(self, x_t: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """One token per row: x_t (batch, dim) -> y_t (batch, dim); the state is updated in place."""
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must be (batch, dim) with dim={self.dim}; got {shape}")
        if state is None:
            raise ValueError("state must be a KVCache from allocate_state(); got None")
        y, state = self.forward(x_t.unsqueeze(1), state=state)
        return y.squeeze(1), state

    # ------------------------------------------------------------------ paths

    def _forward_causal(self, x: torch.Tensor) -> torch.Tensor:
        """No padding, no cache: SDPA's is_causal fast path (flash attention on GPU)."""
        q, k, v = self._project(x)
        if self.rotary is not None:
            q, k = self.rotary(q, k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self._dropout_p(), is_causal=True,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        return self._merge(out)

    def _forward_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._project(x)
        seqlen = x.shape[1]
        if self.rotary is not None:
            positions = (mask.cumsum(dim=1) - 1).clamp_(min=0)  # (batch, seqlen): real tokens before each
            q, k = self._rotate(q, k, positions, max_position=seqlen - 1)
        slots = torch.arange(seqlen, device=x.device)
        causal = slots[:, None] >= slots[None, :]  # (seqlen, seqlen)
        allowed = causal & mask[:, None, :]  # (batch, seqlen, seqlen)
        y = self._merge(self._attend(q, k, v, allowed))
        return y.masked_fill(~mask[..., None], 0.0)

    def _forward_cached(self, x: torch.Tensor, mask: torch.Tensor | None, state: KVCache) -> torch.Tensor:
        q, k, v = self._project(x)
        seqlen = x.shape[1]
        start = state.filled
        if self.rotary is not None:
            if mask is None:
                steps = torch.arange(seqlen, device=x.device)
            else:
                steps = (mask.cumsum(dim=1) - 1).clamp_(min=0)
            positions = state.next_position[:, None] + steps  # (batch, seqlen)
            # Positions count real tokens, so they stay below the slot count: a bound known without a sync.
            q, k = self._rotate(q, k, positions, max_position=start + seqlen - 1)
        state.append(k, v, mask)
        end = state.filled
        keys = state.k[:, :, :end].to(q.dtype)  # (batch, kv_heads, end, head_dim)
        values = state.v[:, :, :end].to(q.dtype)
        with sdpa_kernel(_VARYING_SHAPE_BACKENDS):
            if seqlen == 1 and mask is None:
                # Decoding one real token: it sees every real slot so far, itself included, so the key mask alone is
                # the attention mask; broadcasting it skips the causal and empty-row work of a launch-bound step.
                key_mask = state.key_mask[:, None, None, :end]  # (batch, 1, 1, end)
                return self._merge(self._sdpa_folded(q, keys, values, key_mask))
            query_slots = torch.arange(start, end, device=x.device)
            key_slots = torch.arange(end, device=x.device)
            causal = query_slots[:, None] >= key_slots[None, :]  # (seqlen, end)
            allowed = causal & state.key_mask[:, None, :end]  # (batch, seqlen, end)
            y = self._merge(self._attend(q, keys, values, allowed, fold_groups=True))
        return y if mask is None else y.masked_fill(~mask[..., None], 0.0)

    # ------------------------------------------------------------------ pieces

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (batch, seqlen, dim) -> q (batch, heads, seqlen, head_dim), k, v (batch, kv_heads, seqlen, head_dim)."""
        qkv = self.in_proj(x)  # (batch, seqlen, (heads + 2 kv_heads) head_dim)
        q_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
        pattern = "batch seqlen (heads head_dim) -> batch heads seqlen head_dim"
        return (rearrange(q, pattern, head_dim=self.head_dim), rearrange(k, pattern, head_dim=self.head_dim),
                rearrange(v, pattern, head_dim=self.head_dim))

    def _rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                max_position: int) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary.cos_sin(positions, max_position)  # (batch, seqlen, head_dim / 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                fold_groups: bool = False) -> torch.Tensor:
        """SDPA with an explicit boolean mask.

        q: (batch, heads, q_len, head_dim); k, v: (batch, kv_heads, k_len, head_dim); allowed: (batch, q_len, k_len).
        Returns (batch, heads, q_len, head_dim).
        """
        # A padded query before its row's first real token has no key; softmax over nothing is NaN, which would also
        # poison gradients. Let it see every key: its output is finite and zeroed by the caller.
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        groups = self.num_heads // self.num_kv_heads
        if fold_groups and groups > 1:
            # Without cuDNN, only the folded layout reaches a fused kernel: memory-efficient attention rejects
            # enable_gqa with a mask (torch 2.11).
            allowed = repeat(allowed, "batch seqlen keys -> batch (groups seqlen) keys", groups=groups)
            return self._sdpa_folded(q, k, v, allowed.unsqueeze(1))
        # With SDPA's default choice, enable_gqa beat both folding and repeating k/v (H100, bf16, batch 8 x 2048,
        # 16 heads / 4 kv heads: forward 1.52 ms vs 2.03 and 1.61 ms).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed.unsqueeze(1), dropout_p=self._dropout_p(),
                                              enable_gqa=groups > 1)

    def _sdpa_folded(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """SDPA with the query heads that share a kv head folded into the query length.

        q: (batch, heads, q_len, head_dim); k, v: (batch, kv_heads, k_len, head_dim);
        attn_mask: bool, broadcastable to (batch, kv_heads, groups * q_len, k_len), rows ordered "(groups q_len)".
        Returns (batch, heads, q_len, head_dim).
        """
        # Folding lets every SDPA backend (memory-efficient attention with a mask included) serve GQA without
        # repeating k and v in memory.
        groups = self.num_heads // self.num_kv_heads
        q = rearrange(q, "batch (kv_heads groups) seqlen head_dim -> batch kv_heads (groups seqlen) head_dim",
                      groups=groups)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self._dropout_p())
        return rearrange(out, "batch kv_heads (groups seqlen) head_dim -> batch (kv_heads groups) seqlen head_dim",
                         groups=groups)

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        """out (batch, heads, seqlen, head_dim) -> y (batch, seqlen, dim) through the output projection."""
        return self.out_proj(rearrange(out, "batch heads seqlen head_dim -> batch seqlen (heads head_dim)"))

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    # ------------------------------------------------------------------ checks

    def _check_input(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor; got dtype {x.dtype}")
        if x.dim() != 3 or x.shape[-1] != self.dim or x.shape[1] < 1:
            raise ValueError(f"x must be (batch, seqlen, dim) with dim={self.dim}, seqlen >= 1; "
                             f"got shape {tuple(x.shape)}")
        weight = self.in_proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x must have the parameters' dtype {weight.dtype} (or run under autocast); "
                            f"got dtype {x.dtype}")
        if mask is None:
            return
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor or None; got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = real token); got dtype {mask.dtype}")
        if tuple(mask.shape) != tuple(x.shape[:2]):
            raise ValueError(f"mask must be (batch, seqlen) = {tuple(x.shape[:2])}; got shape {tuple(mask.shape)}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")

    def _check_state(self, state: KVCache, x: torch.Tensor) -> None:
        if not isinstance(state, KVCache):
            raise TypeError(f"state must be a KVCache from allocate_state(); got {type(state).__name__}")
        expected = (x.shape[0], self.num_kv_heads, self.head_dim)
        given = (state.batch_size, state.k.shape[1], state.k.shape[3])
        if given != expected:
            raise ValueError(f"state must hold (batch, kv_heads, head_dim) = {expected}; got {given}")
        if state.k.device != x.device:
            raise ValueError(f"state is on {state.k.device} but x is on {x.device}")

