"""MambaMoEConfig: every architectural choice of a MambaMoE model in one validated dataclass (JSON round-trip)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from mamba_r1.ops.moe_dispatch import DISPATCH_BACKENDS, PRIORITIES
from mamba_r1.ops.selective_scan import BACKENDS as SCAN_BACKENDS

FFN_KINDS = ("moe", "dense", "none")
MIXERS = ("mamba", "attention")
ROPE_SCALINGS = (None, "linear", "ntk", "yarn")
ACTIVATIONS = ("gelu", "silu", "swiglu")


@dataclass
class MambaMoEConfig:
    """Architecture of a hybrid Mamba + MoE language model.

    Layer schedule: layer ``i`` has an attention mixer when ``i in attn_layer_idx`` or, with ``attn_every = k > 0``,
    when ``i % k == k // 2`` (Jamba: one attention layer in each block of 8); every other mixer is a ``MambaBlock``.
    Its FFN is a ``SwitchMoE`` when ``ffn == "moe"`` and ``(i + 1) % moe_every == 0`` (every layer by default, as in
    MoE-Mamba), a dense ``MLP`` (hidden ``mlp_dim``, default ``expert_dim``) on the other layers or when
    ``ffn == "dense"``, and absent when ``ffn == "none"`` (a pure Mamba stack like mamba-ssm's MambaLMHeadModel).
    """

    dim: int = 512
    depth: int = 12
    vocab_size: int | None = None
    max_seq_len: int = 2048
    # Mamba mixer
    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"
    scan_backend: str = "auto"
    # False: dt, B, C are learned constants, not functions of the input (the paper's time-invariant S4-like ablation)
    selective: bool = True
    # FFN schedule and experts
    ffn: str = "moe"
    moe_every: int = 1
    num_experts: int = 8
    expert_dim: int = 2048
    top_k: int = 1
    capacity_factor: float | None = 1.25
    eval_capacity_factor: float | None = 2.0
    min_capacity: int = 4
    jitter_noise: float = 0.0
    load_balance_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    router_priority: str = "position"
    moe_backend: str = "auto"
    activation: str = "gelu"
    ffn_bias: bool = True
    mlp_dim: int | None = None
    # attention layers
    attn_layer_idx: tuple[int, ...] = field(default_factory=tuple)
    attn_every: int = 0
    num_heads: int = 8
    num_kv_heads: int | None = None
    rope_base: float = 10000.0
    rope_scaling: str | None = None
    rope_scaling_factor: float = 1.0
    # embeddings, norms, init, training
    learned_pos_emb: bool = False
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    gradient_checkpointing: bool = False

    def __post_init__(self):
        self.attn_layer_idx = tuple(self.attn_layer_idx)
        positive = ("dim", "depth", "max_seq_len", "d_state", "d_conv", "expand", "moe_every", "num_experts",
                    "expert_dim", "top_k", "num_heads")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        for name in ("vocab_size", "mlp_dim", "num_kv_heads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be None or an int >= 1; got {value!r}")
        if self.dt_rank != "auto" and (isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int)
                                       or self.dt_rank < 1):
            raise ValueError(f"dt_rank must be 'auto' or an int >= 1; got {self.dt_rank!r}")
        if not isinstance(self.selective, bool):
            raise ValueError(f"selective must be a bool; got {self.selective!r}")
        for name, allowed in (("scan_backend", SCAN_BACKENDS), ("moe_backend", DISPATCH_BACKENDS),
                              ("router_priority", PRIORITIES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a finite number > 0, or None for no dropping; got {value!r}")
        if isinstance(self.min_capacity, bool) or not isinstance(self.min_capacity, int) or self.min_capacity < 0:
            raise ValueError(f"min_capacity must be an int >= 0; got {self.min_capacity!r}")
        if not 0.0 <= self.jitter_noise < 1.0:
            raise ValueError(f"jitter_noise must be in [0, 1); got {self.jitter_noise!r}")
        for name in ("load_balance_coef", "z_loss_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}; got {self.ffn!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts={self.num_experts}; got {self.top_k}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; got {self.activation!r}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling must be one of {ROPE_SCALINGS}; got {self.rope_scaling!r}")
        if isinstance(self.attn_every, bool) or not isinstance(self.attn_every, int) or self.attn_every < 0:
            raise ValueError(f"attn_every must be an int >= 0 (0 = no periodic attention); got {self.attn_every!r}")
        for i in self.attn_layer_idx:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.depth:
                raise ValueError(f"attn_layer_idx must hold layer indices in [0, depth={self.depth}); got "
                                 f"{self.attn_layer_idx!r}")
        if self.has_attention:
            kv = self.num_kv_heads or self.num_heads
            if self.dim % self.num_heads != 0:
                raise ValueError(f"dim must be divisible by num_heads for attention layers; got dim={self.dim}, "
                                 f"num_heads={self.num_heads}")
            if self.num_heads % kv != 0:
                raise ValueError(f"num_heads must be a multiple of num_kv_heads; got num_heads={self.num_heads}, "
                                 f"num_kv_heads={kv}")
            if (self.dim // self.num_heads) % 2 != 0:
                raise ValueError(f"dim / num_heads (the head dim) must be even for rotary embeddings; got "
                                 f"dim={self.dim}, num_heads={self.num_heads}")
            if not self.rope_base > 1:
                raise ValueError(f"rope_base must be > 1; got {self.rope_base!r}")
            if self.rope_scaling is None and self.rope_scaling_factor != 1.0:
                raise ValueError(f"rope_scaling_factor must be 1.0 when rope_scaling is None; got "
                                 f"{self.rope_scaling_factor!r}")
            if self.rope_scaling is not None and not self.rope_scaling_factor >= 1:
                raise ValueError(f"rope_scaling_factor must be >= 1 with rope_scaling={self.rope_scaling!r}; got "
                                 f"{self.rope_scaling_factor!r}")
        for name in ("norm_eps", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)!r}")

    # ---------------------------------------------------------------- the layer schedule

    def mixer_kind(self, layer: int) -> str:
        periodic = self.attn_every > 0 and layer % self.attn_every == self.attn_every // 2
        return "attention" if layer in self.attn_layer_idx or periodic else "mamba"

    def ffn_kind(self, layer: int) -> str:
        if self.ffn == "moe":
            return "moe" if (layer + 1) % self.moe_every == 0 else "dense"
        return self.ffn

    @property
    def has_attention(self) -> bool:
        return any(self.mixer_kind(i) == "attention" for i in range(self.depth))

    @property
    def layer_schedule(self) -> list[tuple[str, str]]:
        """(mixer, ffn) per layer, e.g. [("mamba", "moe"), ("attention", "moe"), ...]."""
        return [(self.mixer_kind(i), self.ffn_kind(i)) for i in range(self.depth)]

    # ---------------------------------------------------------------- serialisation

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["attn_layer_idx"] = list(self.attn_layer_idx)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> MambaMoEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MambaMoEConfig fields: {unknown}")
        return cls(**d)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> MambaMoEConfig:
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            text = Path(path_or_text).read_text()
        return cls.from_dict(json.loads(text))
