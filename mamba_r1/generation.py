"""Inference: the per-layer cache, sampling, and generate() (prefill in one parallel pass, then O(1) per token).

The cache holds, per layer, whatever that layer's mixer carries between tokens: a MambaState (conv window + SSM
state, constant size) or a KVCache (grows with the context), and each row's position (real tokens consumed so far).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from mamba_r1.ops.triton_runtime import graph_kernels


@dataclass
class InferenceCache:
    states: list  # one MambaState or KVCache per layer
    positions: torch.Tensor  # (batch,) int64: real tokens consumed per row

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]


def sample_next(
    logits: torch.Tensor,  # (batch, vocab)
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # (batch,) int64
    """Greedy when temperature == 0; otherwise temperature, then top-k, then nucleus (top-p) filtering, then a draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the first always stays).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class GenerationMixin:
    """allocate_cache() and generate() for MambaMoE (which provides forward(..., cache=) and step())."""

    def allocate_cache(self, batch_size: int, max_seqlen: int | None = None, device=None,
                       dtype=None) -> InferenceCache:
        """An empty cache for ``batch_size`` rows (attention KV buffers sized ``max_seqlen``, grown on demand)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
        param = next(self.parameters())
        device = param.device if device is None else torch.device(device)
        dtype = param.dtype if dtype is None else dtype
        states = []
        for layer in self.layers:
            extra = {"max_seqlen": max_seqlen} if layer.mixer_kind == "attention" else {}
            states.append(layer.mixer.allocate_state(batch_size, device=device, dtype=dtype, **extra))
        return InferenceCache(states=states, positions=torch.zeros(batch_size, dtype=torch.long, device=device))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,  # (batch, prompt_len) int
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        attention_mask: torch.Tensor | None = None,  # (batch, prompt_len) bool/int, 1 = real; prompts left-padded
        seed: int | None = None,
        cuda_graph: bool = False,
    ) -> torch.Tensor:  # (batch, prompt_len + generated)
        """Sample up to ``max_new_tokens`` tokens after each prompt. Prefill runs one parallel forward, then each
        token costs O(1) per Mamba layer. Rows that emit ``eos_token_id`` continue with it until all rows are done.
        ``temperature=0`` is greedy. Batched, left-padded prompts give the same tokens as each prompt alone.
        ``cuda_graph=True`` (CUDA, models without attention layers) captures one decoding step as a CUDA graph and
        replays it per token, removing the launch overhead that dominates small-batch decoding. The graph is kept for
        later calls with the same batch size (the last few sizes); it reads the weights where they live, so in-place
        updates (an optimizer step, ``load_state_dict``) are seen, and moved ones (``.to()``) make it capture anew."""
        if self.embedding is None:
            raise ValueError("generate needs a model with vocab_size set (token ids in, logits out)")
        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.dim() != 2:
            got = (f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor)
                   else type(input_ids).__name__)
            raise ValueError(f"input_ids must be an integer tensor (batch, prompt_len); got {got}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature!r}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1; got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be None or in (0, 1]; got {top_p!r}")
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"attention_mask must be (batch, prompt_len) = {tuple(input_ids.shape)}; got "
                                 f"{tuple(attention_mask.shape)}")
            mask = attention_mask.bool()
            if not bool(mask[:, -1].all()):
                raise ValueError("prompts must be left-padded: attention_mask[:, -1] must be True for every row")
        was_training = self.training
        self.eval()
        generator = None
        if seed is not None:
            generator = torch.Generator(device=input_ids.device).manual_seed(seed)
        batch, prompt_len = input_ids.shape
        if cuda_graph and (input_ids.device.type != "cuda" or self.config.has_attention):
            raise ValueError("cuda_graph=True needs CUDA tensors and a model without attention layers (a KV cache "
                             f"grows, a graph's shapes cannot); got device {input_ids.device}, attention layers "
                             f"{[i for i in range(self.config.depth) if self.config.mixer_kind(i) == 'attention']}")
        cache = self.allocate_cache(batch, max_seqlen=prompt_len + max_new_tokens)
        try:
            logits = self(input_ids, mask=mask, cache=cache, num_last_tokens=1)[:, -1]  # (batch, vocab)
            step = self.step if not cuda_graph else _graphed_step(self, cache)
            out = [input_ids]
            done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
            for i in range(max_new_tokens):
                token = sample_next(logits, temperature, top_k, top_p, generator)  # (batch,)
                if eos_token_id is not None:
                    token = token.masked_fill(done, eos_token_id)
                    done |= token == eos_token_id
                out.append(token[:, None].to(input_ids.dtype))
                if eos_token_id is not None and bool(done.all()):
                    break
                if i + 1 < max_new_tokens:
                    logits = step(token, cache)
        finally:
            self.train(was_training)
        return torch.cat(out, dim=1)


# Captured decode graphs per model (weak keys: a model that is dropped takes its graphs with it; and nothing here
# is copied by deepcopy or pickled with the model). Per model: batch size -> (weights key, _GraphedStep), the most
# recently used last.
_DECODE_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
MAX_GRAPHS_PER_MODEL = 4


def _weights_key(model) -> tuple:
    """Where every parameter and buffer lives: a graph reads them by address, so it follows in-place updates (an
    optimizer step, ``load_state_dict``) by itself, and only new storage (``.to()``, a reassigned parameter) needs a
    new capture. That holds because a step derives nothing from a parameter outside the graph (A_log goes raw into the
    state-update kernel)."""
    return tuple((t.data_ptr(), t.dtype, t.shape) for t in (*model.parameters(), *model.buffers()))


def _graphed_step(model, prefilled: InferenceCache) -> _GraphedStep:
    """The model's captured step for this batch size, captured now if there is none or the weights changed; loaded
    with the prefilled cache."""
    graphs = _DECODE_GRAPHS.setdefault(model, OrderedDict())
    batch, key = prefilled.batch_size, _weights_key(model)
    entry = graphs.pop(batch, None)
    if entry is None or entry[0] != key:
        entry = None  # drop the stale graph (and its memory pool) before capturing a new one
        entry = (key, _GraphedStep(model, prefilled))
    graphs[batch] = entry
    while len(graphs) > MAX_GRAPHS_PER_MODEL:
        graphs.popitem(last=False)
    entry[1].load(prefilled)
    return entry[1]


class _GraphedStep:
    """model.step(token, cache) captured once as a CUDA graph over a cache of its own, then replayed per token.

    Every tensor a step touches lives at a fixed address: the token buffer, the graph's cache (``load`` copies a
    prefilled cache into it), the logits. Valid because a Mamba step updates its state in place and never syncs with
    the host.
    """

    def __init__(self, model, prefilled: InferenceCache):
        batch = prefilled.batch_size
        self.cache = model.allocate_cache(batch)
        self.token = torch.zeros(batch, dtype=torch.long, device=prefilled.positions.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # The launch-bound kernels (small-batch projections, fused add + norm) join the step here only: eagerly
        # their Python launches cost more than they save.
        with graph_kernels():
            with torch.cuda.stream(side):  # warm-up outside the graph (compiles and loads kernels), on its cache
                for _ in range(2):
                    model.step(self.token, self.cache)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = model.step(self.token, self.cache)

    def load(self, prefilled: InferenceCache) -> None:
        """Continue from ``prefilled``: its states and positions copied into the graph's cache."""
        for mine, theirs in zip(self.cache.states, prefilled.states):
            mine.conv_state.copy_(theirs.conv_state)
            mine.ssm_state.copy_(theirs.ssm_state)
        self.cache.positions.copy_(prefilled.positions)

    def __call__(self, token: torch.Tensor, cache: InferenceCache) -> torch.Tensor:  # (batch,) -> (batch, vocab)
        self.token.copy_(token)
        self.graph.replay()
        return self.logits
