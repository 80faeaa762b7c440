"""MambaMoE: the hybrid model. Reads top to bottom: one residual layer, the model, its loss, save/load, the factory.

Each layer is ``x + mixer(norm(x))`` then ``x + ffn(norm(x))``: the mixer a MambaBlock or causal attention, the FFN a
SwitchMoE, a dense MLP or absent (see MambaMoEConfig for the schedule). Inference state lives in generation.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from loguru import logger
from torch.utils.checkpoint import checkpoint

from mamba_r1.config import MambaMoEConfig
from mamba_r1.generation import GenerationMixin, InferenceCache
from mamba_r1.modules.attention import CausalSelfAttention
from mamba_r1.modules.mamba import STEP_BACKENDS, MambaBlock
from mamba_r1.modules.mlp import MLP
from mamba_r1.modules.moe import MoEAux, SwitchMoE
from mamba_r1.modules.norm import RMSNorm
from mamba_r1.ops.decode_linear import small_batch_linear
from mamba_r1.ops.rms_norm import add_rms_norm

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class MambaMoELayer(nn.Module):
    """Pre-norm mixer + pre-norm FFN, both residual."""

    def __init__(self, config: MambaMoEConfig, layer_idx: int, device=None, dtype=None):
        super().__init__()
        c, factory = config, dict(device=device, dtype=dtype)
        self.layer_idx = layer_idx
        self.mixer_kind = c.mixer_kind(layer_idx)
        self.mixer_norm = RMSNorm(c.dim, eps=c.norm_eps, **factory)
        if self.mixer_kind == "attention":
            self.mixer = CausalSelfAttention(c.dim, c.num_heads, c.num_kv_heads, rope_base=c.rope_base,
                                             rope_scaling=c.rope_scaling, rope_scaling_factor=c.rope_scaling_factor,
                                             max_seq_len=c.max_seq_len, layer_idx=layer_idx, **factory)
        else:
            self.mixer = MambaBlock(c.dim, d_state=c.d_state, d_conv=c.d_conv, expand=c.expand, dt_rank=c.dt_rank,
                                    scan_backend=c.scan_backend, selective=c.selective, layer_idx=layer_idx,
                                    **factory)
        kind = c.ffn_kind(layer_idx)
        self.ffn_norm = RMSNorm(c.dim, eps=c.norm_eps, **factory) if kind != "none" else None
        if kind == "moe":
            self.ffn = SwitchMoE(c.dim, c.num_experts, c.expert_dim, capacity_factor=c.capacity_factor,
                                 eval_capacity_factor=c.eval_capacity_factor, min_capacity=c.min_capacity,
                                 top_k=c.top_k, jitter_noise=c.jitter_noise, load_balance_coef=c.load_balance_coef,
                                 z_loss_coef=c.z_loss_coef, activation=c.activation, bias=c.ffn_bias,
                                 priority=c.router_priority, backend=c.moe_backend, **factory)
        elif kind == "dense":
            self.ffn = MLP(c.dim, c.mlp_dim or c.expert_dim, activation=c.activation, bias=c.ffn_bias, **factory)
        else:
            self.ffn = None

    def forward(
        self,
        x: torch.Tensor,  # (batch, seqlen, dim)
        mask: torch.Tensor | None = None,  # (batch, seqlen) bool
        state=None,  # MambaState | KVCache | None
    ):
        """Returns (x, aux or None, new_state or None)."""
        h = self.mixer_norm(x)
        if state is None:
            x = x + self.mixer(h, mask=mask)
            new_state = None
        else:
            mixed, new_state = self.mixer(h, mask=mask, state=state)
            x = x + mixed
        aux = None
        if isinstance(self.ffn, SwitchMoE):
            out, aux = self.ffn(self.ffn_norm(x), mask=mask, return_aux=True)
            x = x + out
        elif self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x, aux, new_state

    def step(self, residual: torch.Tensor, state, pending: torch.Tensor | None = None, backend: str = "torch"):
        """One token. ``residual`` (batch, dim) is the residual stream and ``pending`` (batch, dim) the previous
        layer's last branch output, not yet added: the add runs fused with this layer's first norm
        (ops.add_rms_norm; ``backend`` picks its kernel). Returns (residual, branch output, state), the branch output
        left for the caller to add (or to hand to the next layer as its ``pending``); the state is updated in place."""
        normed, residual = add_rms_norm(residual, pending, self.mixer_norm.weight, self.mixer_norm.eps, backend)
        y, state = self.mixer.step(normed, state)  # (batch, dim)
        if self.ffn is not None:
            normed, residual = add_rms_norm(residual, y, self.ffn_norm.weight, self.ffn_norm.eps, backend)
            y = self.ffn(normed)
        return residual, y, state


@dataclass
class LMLoss:
    """What ``MambaMoE.loss`` returns: ``loss`` (to backpropagate) = ``lm_loss`` + ``aux.loss`` when there are experts."""

    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux: MoEAux | None


class MambaMoE(GenerationMixin, nn.Module):
    """The hybrid Mamba + MoE model. ``model(x, mask=None, return_aux=False)``:

    - float ``x (batch, seqlen, dim)`` -> hidden states ``(batch, seqlen, dim)`` (after the final norm);
    - integer token ids ``(batch, seqlen)`` -> logits ``(batch, seqlen, vocab_size)`` (needs ``vocab_size``).
    ``mask (batch, seqlen)`` bool, True = real token; padded positions do not affect real ones (left padding is
    invisible to the real tokens). ``return_aux=True`` returns ``(output, aux)`` with the MoE losses summed over
    layers and routing statistics per MoE layer (``aux`` is None when the model has no experts).
    """

    def __init__(self, config: MambaMoEConfig, device=None, dtype=None):
        super().__init__()
        if not isinstance(config, MambaMoEConfig):
            raise TypeError(f"config must be a MambaMoEConfig; got {type(config).__name__}")
        self.config = c = config
        factory = dict(device=device, dtype=dtype)
        self.embedding = nn.Embedding(c.vocab_size, c.dim, **factory) if c.vocab_size else None
        self.pos_embedding = nn.Embedding(c.max_seq_len, c.dim, **factory) if c.learned_pos_emb else None
        self.layers = nn.ModuleList(MambaMoELayer(c, i, **factory) for i in range(c.depth))
        self.norm_f = RMSNorm(c.dim, eps=c.norm_eps, **factory)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False, **factory) if c.vocab_size else None
        self._init_weights()
        if self.lm_head is not None and c.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        logger.debug("built MambaMoE: {} parameters, schedule {}", self.num_parameters(), c.layer_schedule)

    @torch.no_grad()
    def _init_weights(self):
        """GPT-2 / Mamba: embeddings N(0, initializer_range); each residual branch's output projection scaled by
        1/sqrt(2 * depth) so the residual stream's variance does not grow with depth. The modules keep their own
        initialisation otherwise (Mamba's dt and A, the experts' fan-in scaling)."""
        std = self.config.initializer_range
        for emb in (self.embedding, self.pos_embedding):
            if emb is not None:
                nn.init.normal_(emb.weight, std=std)
        if self.lm_head is not None and not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std)
        scale = 1.0 / math.sqrt(2 * self.config.depth)
        for layer in self.layers:
            layer.mixer.out_proj.weight.mul_(scale)
            if isinstance(layer.ffn, SwitchMoE):
                layer.ffn.experts.w2.mul_(scale)
            elif isinstance(layer.ffn, MLP):
                layer.ffn.fc2.weight.mul_(scale)

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count (tied weights once); ``active=True`` counts top_k of num_experts experts per MoE layer."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for layer in self.layers:
                if isinstance(layer.ffn, SwitchMoE):
                    experts = sum(p.numel() for p in layer.ffn.experts.parameters())
                    total -= experts - experts * layer.ffn.top_k // layer.ffn.num_experts
        return total

    # ---------------------------------------------------------------- forward

    def embed(
        self,
        x: torch.Tensor,  # (batch, seqlen) token ids or (batch, seqlen, dim) hidden
        mask: torch.Tensor | None,  # (batch, seqlen) bool
        position_offset: torch.Tensor | None = None,  # (batch,) positions already consumed (cached decoding)
    ) -> torch.Tensor:  # (batch, seqlen, dim)
        c = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
        if x.is_floating_point():
            if x.dim() != 3 or x.shape[-1] != c.dim:
                raise ValueError(f"float x must be (batch, seqlen, dim) with dim={c.dim}; got {tuple(x.shape)}")
            expected = self.norm_f.weight.dtype
            if x.dtype != expected and not torch.is_autocast_enabled(x.device.type):
                raise TypeError(f"float x must have the model's dtype {expected} (or run under autocast); "
                                f"got dtype {x.dtype}")
            h = x
        elif x.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            if self.embedding is None:
                raise ValueError("integer token ids need a config with vocab_size; this model has vocab_size=None: "
                                 "pass float hidden states (batch, seqlen, dim) instead")
            if x.dim() != 2:
                raise ValueError(f"token ids must be (batch, seqlen); got {tuple(x.shape)}")
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= c.vocab_size):
                raise ValueError(f"token ids must lie in [0, vocab_size={c.vocab_size}); got values in "
                                 f"[{int(x.min())}, {int(x.max())}]")
            h = self.embedding(x.long())
        else:
            raise TypeError(f"x must be float hidden states or integer token ids; got dtype {x.dtype}")
        if x.shape[1] == 0:
            raise ValueError(f"x must have seqlen >= 1; got {tuple(x.shape)}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise TypeError(f"mask must be a bool tensor (True = real token); got {got}")
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"mask must be (batch, seqlen) = {tuple(x.shape[:2])}; got {tuple(mask.shape)}")
        if self.pos_embedding is not None:
            # Positions count real tokens only, so left padding does not shift them.
            real = mask.long() if mask is not None else torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
            pos = real.cumsum(1) - 1
            if position_offset is not None:
                pos = pos + position_offset[:, None]
            h = h + self.pos_embedding(pos.clamp(0, c.max_seq_len - 1))
        return h

    def forward(
        self,
        x: torch.Tensor,  # (batch, seqlen) token ids or (batch, seqlen, dim)
        mask: torch.Tensor | None = None,  # (batch, seqlen) bool, True = real token
        return_aux: bool = False,
        cache: InferenceCache | None = None,
        num_last_tokens: int = 0,
    ):
        """Logits (token ids) or hidden states (float x); ``(output, aux)`` with ``return_aux``. With ``cache``
        (from ``allocate_cache``), continue from it and update it in place (prefill / chunked prefill).
        ``num_last_tokens > 0`` returns only the last that many positions (the final norm and the head run on those
        alone): a prefill that only samples the next token skips a (batch, seqlen, vocab) logits tensor."""
        if isinstance(num_last_tokens, bool) or not isinstance(num_last_tokens, int) or num_last_tokens < 0:
            raise ValueError(f"num_last_tokens must be an int >= 0 (0 = every position); got {num_last_tokens!r}")
        offset = None if cache is None else cache.positions
        h = self.embed(x, mask, offset)
        if cache is not None and cache.batch_size != h.shape[0]:
            raise ValueError(f"cache was allocated for batch {cache.batch_size}; got x with batch {h.shape[0]}")
        auxes = []
        for i, layer in enumerate(self.layers):
            state = None if cache is None else cache.states[i]
            if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled() and state is None:
                h, aux, _ = checkpoint(layer, h, mask, use_reentrant=False)
            else:
                h, aux, new_state = layer(h, mask, state)
                if cache is not None:
                    cache.states[i] = new_state
            if aux is not None:
                auxes.append(aux)
        if cache is not None:
            cache.positions += mask.sum(1) if mask is not None else h.shape[1]
        if num_last_tokens:
            h = h[:, -num_last_tokens:]  # (batch, min(num_last_tokens, seqlen), dim)
        h = self.norm_f(h)
        out = self.lm_head(h) if (self.lm_head is not None and not x.is_floating_point()) else h
        if return_aux:
            return out, (MoEAux.stack(auxes) if auxes else None)
        return out

    def step(self, x_t: torch.Tensor, cache: InferenceCache) -> torch.Tensor:
        """One decoding step: token ids (batch,) or hidden (batch, dim) -> logits (batch, vocab) or hidden."""
        if x_t.dim() != (2 if x_t.is_floating_point() else 1):
            raise ValueError(f"x_t must be token ids (batch,) or hidden (batch, dim); got {tuple(x_t.shape)}")
        if not x_t.is_floating_point() and self.embedding is None:
            raise ValueError("integer token ids need a config with vocab_size; this model has vocab_size=None")
        # No value checks here: a host sync per generated token would stall the GPU (prompts were checked).
        h = x_t if x_t.is_floating_point() else self.embedding(x_t.long())  # (batch, dim)
        if self.pos_embedding is not None:
            h = h + self.pos_embedding(cache.positions.clamp(0, self.config.max_seq_len - 1))
        # Each layer's branch output is added to the stream inside the next norm (one kernel on CUDA).
        backend = STEP_BACKENDS[self.config.scan_backend]
        pending = None
        for i, layer in enumerate(self.layers):
            h, pending, cache.states[i] = layer.step(h, cache.states[i], pending, backend)
        cache.positions += 1
        h, _ = add_rms_norm(h, pending, self.norm_f.weight, self.norm_f.eps, backend)
        if self.lm_head is None or x_t.is_floating_point():
            return h
        # The head streams its (vocab, dim) weight once at small batch (small_batch_linear; F.linear otherwise).
        return small_batch_linear(h, self.lm_head.weight, None, backend)

    def loss(
        self,
        input_ids: torch.Tensor,  # (batch, seqlen)
        labels: torch.Tensor | None = None,  # (batch, seqlen); default input_ids; -100 = ignore
        mask: torch.Tensor | None = None,  # (batch, seqlen) bool
    ) -> LMLoss:
        """Next-token cross-entropy (position t predicts labels[t + 1]) plus the MoE auxiliary losses."""
        logits, aux = self(input_ids, mask=mask, return_aux=True)
        labels = input_ids if labels is None else labels
        if tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(f"labels must be (batch, seqlen) = {tuple(input_ids.shape)}; got {tuple(labels.shape)}")
        target = labels[:, 1:].long()
        if mask is not None:
            # A prediction counts when its input (t) and its target (t + 1) are both real tokens: the pad before a
            # left-padded row's first token predicts nothing, so padding leaves the loss unchanged.
            target = target.masked_fill(~(mask[:, :-1] & mask[:, 1:]), -100)
        lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        total = lm_loss + aux.loss if aux is not None else lm_loss
        return LMLoss(loss=total, lm_loss=lm_loss, aux=aux)

    # ---------------------------------------------------------------- save / load

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` (tied weights stored once) into ``directory``."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.to_json(directory / CONFIG_NAME)
        save_model(self, str(directory / WEIGHTS_NAME))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device=None, dtype=None) -> MambaMoE:
        """Load what ``save_pretrained`` wrote; errors name the missing/corrupt file or the mismatched tensor."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory / name} not found: a checkpoint directory holds {CONFIG_NAME} "
                                        f"and {WEIGHTS_NAME} (written by save_pretrained)")
        try:
            config = MambaMoEConfig.from_json(directory / CONFIG_NAME)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{directory / CONFIG_NAME} is not a valid MambaMoEConfig: {e}") from e
        try:
            weights = load_file(str(directory / WEIGHTS_NAME), device=str(device or "cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{directory / WEIGHTS_NAME} is corrupt or not a safetensors file: {e}") from e
        model = cls(config, device=device, dtype=dtype)
        expected = model.state_dict()
        if config.vocab_size and config.tie_embeddings:
            expected.pop("lm_head.weight", None)
            weights.pop("lm_head.weight", None)
        missing = sorted(set(expected) - set(weights))
        unexpected = sorted(set(weights) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_NAME} does not match its config: missing tensors {missing}, "
                             f"unexpected tensors {unexpected}")
        for name, tensor in weights.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ValueError(f"tensor {name!r} in {directory / WEIGHTS_NAME} has shape {tuple(tensor.shape)}, "
                                 f"but the config gives {tuple(expected[name].shape)}")
        model.load_state_dict(weights, strict=False)
        return model

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None) -> str:
        """Upload config + weights to the Hugging Face Hub (needs ``pip install mamba-r1[hub]``)."""
        try:
            from huggingface_hub import HfApi
        except ImportError as e:
            raise ImportError("push_to_hub needs huggingface_hub: pip install 'mamba-r1[hub]'") from e
        import tempfile

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            api.upload_folder(repo_id=repo_id, folder_path=tmp)
        return repo_id


def create_mamba_moe(dim: int = 512, depth: int = 12, d_state: int = 64, d_conv: int = 4, expand: int = 2,
                     num_experts: int = 8, expert_dim: int = 2048, max_seq_len: int = 2048, **config) -> MambaMoE:
    """Build a MambaMoE (on CUDA when available; pass ``device=`` / ``dtype=`` to choose). Any other
    ``MambaMoEConfig`` field may be given as a keyword (``vocab_size=256``, ``attn_every=8``, ``ffn="dense"``...)."""
    device = config.pop("device", "cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.pop("dtype", None)
    cfg = MambaMoEConfig(dim=dim, depth=depth, d_state=d_state, d_conv=d_conv, expand=expand,
                         num_experts=num_experts, expert_dim=expert_dim, max_seq_len=max_seq_len, **config)
    return MambaMoE(cfg, device=device, dtype=dtype)
