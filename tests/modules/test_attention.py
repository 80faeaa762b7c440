"""CausalSelfAttention against a per-row float64 reference; cache, padding, GQA and argument checks."""

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.modules.attention import CausalSelfAttention, KVCache, attention_ref
from tests.conftest import GRAD_TOL, TOL, rel_err

# (num_heads, num_kv_heads, head_dim): MHA, GQA, multi-query, odd head counts.
HEAD_LAYOUTS = [(4, 4, 8), (4, 2, 8), (6, 2, 4), (3, 1, 6), (2, 1, 2)]
DTYPES = [torch.float32, torch.bfloat16]


def make_attention(dim=20, layout=(4, 2, 8), dtype=torch.float32, **kwargs):
    num_heads, num_kv_heads, head_dim = layout
    return CausalSelfAttention(dim, num_heads, num_kv_heads, head_dim=head_dim, dtype=dtype, **kwargs)


def left_padding_mask(pads, seqlen):
    """(batch, seqlen) bool, row b starting with pads[b] padded tokens."""
    return torch.arange(seqlen)[None, :] >= torch.tensor(pads)[:, None]


def reference_forward(module, params, x, mask):
    """The specification in float64: each row's real tokens alone, unpadded causal attention at positions 0..n-1,
    zeros at padded positions. params: float64 leaves named like module.named_parameters()."""
    batch, seqlen, _ = x.shape
    heads, kv_heads, head_dim = module.num_heads, module.num_kv_heads, module.head_dim
    rows = []
    for b in range(batch):
        real = mask[b].nonzero().squeeze(1)  # (n,)
        row = x.new_zeros(seqlen, module.dim)
        if real.numel() > 0:
            qkv = F.linear(x[b, real][None], params["in_proj.weight"], params.get("in_proj.bias"))
            q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
            q, k, v = (rearrange(t, "batch seqlen (heads head_dim) -> batch heads seqlen head_dim", head_dim=head_dim)
                       for t in (q, k, v))
            if module.rotary is not None:
                q, k = module.rotary(q, k)
            n = real.numel()
            causal = torch.ones(n, n, dtype=torch.bool).tril()[None]
            out = attention_ref(q, k, v, causal)
            out = rearrange(out, "batch heads seqlen head_dim -> batch seqlen (heads head_dim)")
            y = F.linear(out, params["out_proj.weight"], params.get("out_proj.bias"))[0]
            row = row.index_copy(0, real, y)
        rows.append(row)
    return torch.stack(rows)


def float64_params(module):
    return {name: p.detach().double().requires_grad_() for name, p in module.named_parameters()}


@settings(deadline=None, max_examples=30)
@given(batch=st.integers(1, 3), seqlen=st.sampled_from([1, 2, 3, 5, 8, 13]), layout=st.sampled_from(HEAD_LAYOUTS),
       pads=st.lists(st.integers(0, 13), min_size=3, max_size=3), use_mask=st.booleans(), bias=st.booleans(),
       rotary=st.booleans(), dtype=st.sampled_from(DTYPES))
def test_forward_and_gradients_match_reference(batch, seqlen, layout, pads, use_mask, bias, rotary, dtype):
    module = make_attention(layout=layout, dtype=dtype, bias=bias, rotary=rotary, max_seq_len=4)
    if bias:  # nn.Linear biases start at small uniform values; make them matter.
        with torch.no_grad():
            for p in (module.in_proj.bias, module.out_proj.bias):
                p.normal_()
    x = torch.randn(batch, seqlen, module.dim, dtype=dtype, requires_grad=True)
    mask = left_padding_mask([min(p, seqlen) for p in pads[:batch]], seqlen) if use_mask else None
    y = module(x, mask=mask)
    assert y.dtype == dtype and y.shape == x.shape

    params = float64_params(module)
    x64 = x.detach().double().requires_grad_()
    full_mask = torch.ones(batch, seqlen, dtype=torch.bool) if mask is None else mask
    y_ref = reference_forward(module, params, x64, full_mask)
    assert rel_err(y, y_ref) <= TOL[dtype]
    if mask is not None:
        assert (y[~mask] == 0).all()

    grad_out = torch.randn_like(y_ref).to(dtype)
    (y * grad_out).sum().backward()
    # The zero term links every leaf to the loss, so an all-padding batch still backpropagates (to zero grads).
    untouched = sum(t.sum() for t in [x64, *params.values()]) * 0
    ((y_ref * grad_out.double()).sum() + untouched).backward()
    assert rel_err(x.grad, x64.grad) <= GRAD_TOL[dtype]
    # A bias is the weight column of a constant input, so it is compared with its layer's weight: alone, the key
    # bias gradient is exactly zero without RoPE (softmax ignores a shift shared by all keys) and bf16 rounding
    # noise would be measured against nothing.
    for layer in ("in_proj", "out_proj"):
        names = [f"{layer}.weight"] + ([f"{layer}.bias"] if bias else [])
        got = torch.cat([module.get_parameter(n).grad.reshape(module.get_parameter(n).shape[0], -1) for n in names], 1)
        want = torch.cat([params[n].grad.reshape(params[n].shape[0], -1) for n in names], 1)
        assert rel_err(got, want) <= GRAD_TOL[dtype], layer


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_future_tokens_do_not_change_past_outputs(layout):
    module = make_attention(layout=layout)
    x = torch.randn(2, 12, module.dim)
    changed = x.clone()
    changed[:, 7:] = torch.randn(2, 5, module.dim) * 10
    mask = left_padding_mask([0, 3], 12)
    for m in (None, mask):
        y, y_changed = module(x, mask=m), module(changed, mask=m)
        assert rel_err(y_changed[:, :7], y[:, :7]) <= TOL[torch.float32]
        assert rel_err(y_changed[:, 7:], y[:, 7:]) > 1e-2  # the perturbation is visible where it may be


@settings(deadline=None, max_examples=12)
@given(layout=st.sampled_from(HEAD_LAYOUTS), prompt=st.integers(1, 7), new=st.integers(1, 9),
       pads=st.lists(st.integers(0, 6), min_size=3, max_size=3), dtype=st.sampled_from(DTYPES))
def test_step_decode_matches_full_forward(layout, prompt, new, pads, dtype):
    # max_seq_len and the cache capacity are tiny so decoding grows both the RoPE table and the KV buffers.
    module = make_attention(layout=layout, dtype=dtype, max_seq_len=3)
    x = torch.randn(3, prompt + new, module.dim, dtype=dtype)
    mask = left_padding_mask([min(p, prompt) for p in pads], prompt + new)
    with torch.no_grad():
        expected = module(x, mask=mask)
        state = module.allocate_state(3, max_seqlen=2)
        y_prompt, state = module(x[:, :prompt], mask=mask[:, :prompt], state=state)
        steps = []
        for t in range(prompt, prompt + new):
            y_t, state = module.step(x[:, t], state)
            steps.append(y_t)
    got = torch.cat([y_prompt, torch.stack(steps, dim=1)], dim=1)
    assert rel_err(got, expected.float()) <= TOL[dtype]
    assert state.filled == prompt + new and state.capacity >= prompt + new
    assert torch.equal(state.next_position, mask.sum(dim=1))


@settings(deadline=None, max_examples=15)
@given(layout=st.sampled_from(HEAD_LAYOUTS), seqlen=st.integers(2, 13), cuts=st.lists(st.integers(1, 12), max_size=3),
       pads=st.lists(st.integers(0, 13), min_size=2, max_size=2), mid_pad=st.booleans())
def test_chunked_prefill_matches_full_forward(layout, seqlen, cuts, pads, mid_pad):
    module = make_attention(layout=layout, max_seq_len=4)
    x = torch.randn(2, seqlen, module.dim)
    mask = left_padding_mask([min(p, seqlen - 1) for p in pads], seqlen)
    if mid_pad:  # padding inside a row (e.g. between packed turns) must behave like it does in one pass
        mask[1, seqlen // 2] = False
    bounds = sorted({c for c in cuts if c < seqlen} | {0, seqlen})
    with torch.no_grad():
        expected = module(x, mask=mask)
        state = module.allocate_state(2, max_seqlen=3)
        chunks = []
        for start, end in zip(bounds[:-1], bounds[1:]):
            y, state = module(x[:, start:end], mask=mask[:, start:end], state=state)
            chunks.append(y)
    assert rel_err(torch.cat(chunks, dim=1), expected) <= TOL[torch.float32]


def test_chunked_forward_with_state_backpropagates_like_full_forward():
    module = make_attention(layout=(4, 2, 8))
    x = torch.randn(2, 9, module.dim, requires_grad=True)
    mask = left_padding_mask([2, 0], 9)
    state = module.allocate_state(2, max_seqlen=4)
    first, state = module(x[:, :5], mask=mask[:, :5], state=state)
    second, state = module(x[:, 5:], mask=mask[:, 5:], state=state)
    (torch.cat([first, second], dim=1) ** 2).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    x.grad = None
    module.zero_grad()
    (module(x, mask=mask) ** 2).sum().backward()
    expected = [x.grad] + [p.grad for p in module.parameters()]
    for got, want in zip(grads, expected):
        assert rel_err(got, want) <= GRAD_TOL[torch.float32]


@pytest.mark.parametrize("masked", [False, True])
def test_gqa_matches_mha_with_repeated_kv_weights(masked):
    dim, heads, kv_heads, head_dim = 24, 6, 2, 4
    gqa = CausalSelfAttention(dim, heads, kv_heads, head_dim=head_dim, bias=True)
    mha = CausalSelfAttention(dim, heads, heads, head_dim=head_dim, bias=True)
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    groups = heads // kv_heads

    def widen(t):  # kv head j serves query heads j * groups .. (j + 1) * groups - 1
        return repeat(t, "(kv_heads head_dim) ... -> (kv_heads groups head_dim) ...", groups=groups, head_dim=head_dim)

    with torch.no_grad():
        for name in ("weight", "bias"):
            source = getattr(gqa.in_proj, name)
            q, k, v = source.split([q_rows, kv_rows, kv_rows], dim=0)
            getattr(mha.in_proj, name).copy_(torch.cat([q, widen(k), widen(v)], dim=0))
            getattr(mha.out_proj, name).copy_(getattr(gqa.out_proj, name))
    x = torch.randn(3, 10, dim)
    mask = left_padding_mask([0, 4, 9], 10) if masked else None
    assert rel_err(gqa(x, mask=mask), mha(x, mask=mask)) <= TOL[torch.float32]


@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
def test_left_padding_invariance_and_zero_outputs_at_pads(layout):
    module = make_attention(layout=layout, bias=True)
    with torch.no_grad():
        module.out_proj.bias.fill_(1.0)  # a zero at a pad must come from the mask, not from a zero bias
    pads = [0, 3, 6, 11]
    seqlen = 11
    x = torch.randn(len(pads), seqlen, module.dim)
    mask = left_padding_mask(pads, seqlen)
    y = module(x, mask=mask)
    assert (y[~mask] == 0).all()
    for b, pad in enumerate(pads):
        if pad < seqlen:
            alone = module(x[b:b + 1, pad:])
            assert rel_err(y[b:b + 1, pad:], alone) <= TOL[torch.float32]
    # Whatever sits at the padded positions is never read by a real token.
    noisy = torch.where(mask[..., None], x, torch.randn_like(x) * 100)
    assert rel_err(module(noisy, mask=mask), y) <= TOL[torch.float32]


def test_all_true_mask_matches_causal_fast_path():
    module = make_attention(layout=(6, 2, 4))
    x = torch.randn(2, 9, module.dim)
    fast = module(x)
    masked = module(x, mask=torch.ones(2, 9, dtype=torch.bool))
    assert rel_err(masked, fast) <= TOL[torch.float32]


@pytest.mark.parametrize("masked", [False, True])
def test_gradients_reach_every_parameter(masked):
    module = make_attention(layout=(4, 2, 8), bias=True)
    x = torch.randn(2, 7, module.dim, requires_grad=True)
    mask = left_padding_mask([0, 5], 7) if masked else None
    (module(x, mask=mask) ** 2).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(x.grad).all()
    if masked:  # pad inputs have no path to any output
        assert (x.grad[1, :5] == 0).all()


@pytest.mark.parametrize("scaling", [None, "linear", "ntk", "yarn"])
def test_bf16_outputs_finite(scaling):
    module = make_attention(layout=(4, 2, 8), dtype=torch.bfloat16, max_seq_len=8, rope_scaling=scaling,
                            rope_scaling_factor=1.0 if scaling is None else 4.0)
    x = torch.randn(2, 64, module.dim, dtype=torch.bfloat16, requires_grad=True)
    mask = left_padding_mask([0, 40], 64)
    for m in (None, mask):
        y = module(x, mask=m)
        assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        y.float().square().sum().backward()
        assert torch.isfinite(x.grad).all()
    with torch.no_grad():
        state = module.allocate_state(2)
        y, state = module(x[:, :60], mask=mask[:, :60], state=state)
        for t in range(60, 64):
            y_t, state = module.step(x[:, t], state)
            assert torch.isfinite(y_t).all()


def test_dropout_acts_only_in_training():
    module = make_attention(layout=(4, 4, 8), dropout=0.5)
    x = torch.randn(2, 6, module.dim)
    module.train()
    assert rel_err(module(x), module(x)) > 1e-3
    module.eval()
    assert torch.equal(module(x), module(x))


def test_allocate_state_shapes_and_defaults():
    module = make_attention(layout=(6, 2, 4), max_seq_len=17)
    state = module.allocate_state(3)
    assert isinstance(state, KVCache)
    assert state.k.shape == (3, 2, 17, 4) and state.v.shape == (3, 2, 17, 4)
    assert state.key_mask.shape == (3, 17) and not state.key_mask.any()
    assert state.filled == 0 and state.next_position.tolist() == [0, 0, 0]
    state = module.allocate_state(1, dtype=torch.bfloat16, max_seqlen=5)
    assert state.k.dtype == torch.bfloat16 and state.capacity == 5


@pytest.mark.parametrize("kwargs, error, words", [
    ({"dim": 20, "num_heads": 4, "num_kv_heads": 3, "head_dim": 8}, ValueError, "multiple of num_kv_heads"),
    ({"dim": 20, "num_heads": 3}, ValueError, "dim must be divisible by num_heads"),
    ({"dim": 20, "num_heads": 4, "head_dim": 5}, ValueError, "head_dim must be even"),
    ({"dim": 20, "num_heads": 0}, ValueError, "num_heads"),
    ({"dim": 32, "num_heads": 4, "num_kv_heads": 0}, ValueError, "num_kv_heads"),
    ({"dim": 32, "num_heads": 4, "dropout": 1.0}, ValueError, "dropout"),
    ({"dim": 32, "num_heads": 4, "rotary": False, "rope_scaling": "yarn"}, ValueError, "rope_scaling"),
    ({"dim": 32, "num_heads": 4, "rope_scaling": "yarm", "rope_scaling_factor": 2.0}, ValueError, "scaling"),
])
def test_bad_constructor_arguments_raise(kwargs, error, words):
    with pytest.raises(error, match=words):
        CausalSelfAttention(**kwargs)


def test_head_dim_may_differ_from_dim_over_heads():
    module = CausalSelfAttention(20, 3, 1, head_dim=6)
    assert module(torch.randn(1, 4, 20)).shape == (1, 4, 20)


def test_bad_forward_arguments_raise():
    module = make_attention(layout=(4, 2, 8))
    x = torch.randn(2, 5, module.dim)
    with pytest.raises(ValueError, match=r"x must be \(batch, seqlen, dim\) with dim=20.*got shape \(2, 5, 21\)"):
        module(torch.randn(2, 5, 21))
    with pytest.raises(ValueError, match="x must be"):
        module(torch.randn(2, 0, 20))
    with pytest.raises(TypeError, match="x must have the parameters' dtype torch.float32"):
        module(x.double())
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        module(x, mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"mask must be \(batch, seqlen\) = \(2, 5\); got shape \(2, 4\)"):
        module(x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"state must hold \(batch, kv_heads, head_dim\) = \(2, 2, 8\)"):
        module(x, state=module.allocate_state(3))
    with pytest.raises(TypeError, match="state must be a KVCache"):
        module(x, state={"k": None})
    with pytest.raises(ValueError, match=r"x_t must be \(batch, dim\)"):
        module.step(x, module.allocate_state(2))
    with pytest.raises(ValueError, match="batch_size"):
        module.allocate_state(0)
    with pytest.raises(ValueError, match="max_seqlen"):
        module.allocate_state(2, max_seqlen=0)
