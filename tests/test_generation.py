"""Inference: sample_next's filters and seeds, the cache (prefill, chunked prefill, O(1) steps), generate() against
re-running the full forward, left-padded batches against single prompts, argument checks, and the example script."""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from loguru import logger

from mamba_r1 import MambaMoE, create_mamba_moe
from mamba_r1.generation import sample_next
from mamba_r1.modules.mamba import MambaState
from tests.conftest import TOL, rel_err

F32 = TOL[torch.float32]
VOCAB = 41
# An untied head of std 1 (initializer_range) spreads the logits (std ~ sqrt(dim)), so the float32 rounding that
# separates the parallel forward from the recurrent steps (~1e-7 relative) cannot flip an argmax; untied, because a
# tied head that large scores E[t] . E[t] highest and the model would just repeat its last token, which a broken
# cache reproduces too. eval_capacity_factor=None: a prefill over many tokens and a step over one would otherwise
# drop different tokens.
TINY = dict(dim=16, depth=2, d_state=4, d_conv=2, expand=1, num_experts=2, expert_dim=32, num_heads=2,
            scan_backend="torch", device="cpu", vocab_size=VOCAB, max_seq_len=64, eval_capacity_factor=None,
            initializer_range=1.0, tie_embeddings=False)
HYBRID = dict(depth=3, attn_layer_idx=(1,), num_experts=3, moe_every=2, learned_pos_emb=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread for this file. On these tiny tensors a second OpenMP thread only adds barrier waits, and
    when another process holds the other core they made these tests ~20x slower (test_config, test_model and
    test_generation together: 101 s with 2 threads, 5 s with 1, on 2 shared cores)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(**overrides) -> MambaMoE:
    return create_mamba_moe(**{**TINY, **overrides}).eval()


@st.composite
def model_overrides(draw, attention=None):
    """Schedules a decoder can meet: Mamba and attention mixers, MoE / dense / no FFN, learned positions.
    ``attention=True`` always puts at least one attention layer in."""
    depth = draw(st.integers(1, 3))
    overrides = dict(
        depth=depth,
        d_conv=draw(st.integers(2, 4)),
        expand=draw(st.integers(1, 2)),
        ffn=draw(st.sampled_from(["moe", "dense", "none"])),
        moe_every=draw(st.integers(1, 2)),
        num_experts=draw(st.integers(2, 4)),
        top_k=draw(st.integers(1, 2)),
        num_kv_heads=draw(st.sampled_from([None, 1])),
        learned_pos_emb=draw(st.booleans()),
    )
    mixers = draw(st.sampled_from(["attn_layer_idx", "attn_every"] if attention else
                                  ["mamba", "attn_layer_idx", "attn_every"]))
    if mixers == "attn_layer_idx":
        overrides["attn_layer_idx"] = (draw(st.integers(0, depth - 1)),)
    elif mixers == "attn_every":
        overrides["attn_every"] = draw(st.integers(1, 3))
    return overrides


def greedy_by_full_forward(model, input_ids, max_new_tokens) -> torch.Tensor:  # (batch, prompt_len + new)
    """The specification of greedy decoding: re-run the whole sequence for every new token, no cache."""
    ids = input_ids
    with torch.no_grad():
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def left_pad(prompts, pad_id=0) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts: list of 1-D id tensors -> ids (batch, longest), mask (batch, longest) bool, padded on the left."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = True
    return ids, mask


# ---------------------------------------------------------------- sample_next


def expected_distribution(logits, temperature, top_k, top_p) -> torch.Tensor:
    """What sample_next should draw from, in float64: softmax(logits / T), then the k most likely, then the
    smallest most-likely set whose mass reaches top_p, renormalised."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = torch.argsort(probs, descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[: top_k or len(probs)]] = True
    probs = torch.where(keep, probs, 0.0)
    probs = probs / probs.sum()
    if top_p is not None:
        mass = probs[order].cumsum(0)
        smallest = int((mass < top_p).sum()) + 1  # first prefix whose mass reaches top_p
        keep = torch.zeros_like(keep)
        keep[order[:smallest]] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


@settings(deadline=None, max_examples=25)
@given(vocab=st.integers(2, 12), temperature=st.sampled_from([0.5, 1.0, 2.0]),
       top_k=st.one_of(st.none(), st.integers(1, 12)), top_p=st.one_of(st.none(), st.floats(0.05, 0.95)),
       seed=st.integers(0, 2**16))
def test_sampling_follows_temperature_top_k_and_top_p(vocab, temperature, top_k, top_p, seed):
    torch.manual_seed(seed)
    logits = torch.randn(vocab) * 2
    expected = expected_distribution(logits, temperature, top_k, top_p)
    if top_p is not None:
        # Keep the nucleus boundary away from float32 rounding: which set is "smallest" must be unambiguous.
        top = torch.softmax(logits.double() / temperature, -1).sort(descending=True).values[: top_k or vocab]
        assume(((top / top.sum()).cumsum(0) - top_p).abs().min() > 1e-4)
    draws = 4000
    generator = torch.Generator().manual_seed(seed)
    tokens = sample_next(logits.expand(draws, vocab), temperature, top_k, top_p, generator)
    assert tokens.shape == (draws,) and tokens.dtype == torch.int64
    counts = torch.bincount(tokens, minlength=vocab).double() / draws
    assert (counts[expected == 0] == 0).all(), "drew a token the filters remove"
    # Five standard deviations of a binomial frequency: a correct sampler fails this about once in 10^6 tokens.
    bound = 5 * (expected * (1 - expected) / draws).sqrt() + 1e-3
    assert ((counts - expected).abs() <= bound).all(), (counts, expected)


@settings(deadline=None, max_examples=20)
@given(batch=st.integers(1, 4), vocab=st.integers(2, 50), seed=st.integers(0, 2**16))
def test_temperature_zero_and_top_k_one_are_argmax(batch, vocab, seed):
    torch.manual_seed(seed)
    logits = torch.randn(batch, vocab)
    argmax = logits.argmax(-1)
    assert torch.equal(sample_next(logits, temperature=0), argmax)
    generator = torch.Generator().manual_seed(seed)
    for temperature in (0.5, 1.0, 5.0):
        assert torch.equal(sample_next(logits, temperature, top_k=1, generator=generator), argmax)


def test_the_same_seed_draws_the_same_tokens():
    logits = torch.zeros(500, 30)  # uniform: two different seeds agreeing on 500 draws has odds 30^-500
    first = sample_next(logits, generator=torch.Generator().manual_seed(11))
    again = sample_next(logits, generator=torch.Generator().manual_seed(11))
    other = sample_next(logits, generator=torch.Generator().manual_seed(12))
    assert torch.equal(first, again) and not torch.equal(first, other)


# ---------------------------------------------------------------- the cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_cached_logits_match_the_float64_full_forward(dtype):
    torch.manual_seed(0)
    model = tiny_model(**HYBRID, dim=32, num_heads=4, expand=2, d_conv=3, initializer_range=0.02, dtype=dtype)
    reference = copy.deepcopy(model).double()
    ids = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        expected = reference(ids)  # (batch, seqlen, vocab)
        cache = model.allocate_cache(3)
        pieces = [model(ids[:, :11], cache=cache)]
        pieces += [model.step(ids[:, t], cache)[:, None] for t in range(11, 20)]
        cached = torch.cat(pieces, dim=1)
        full = model(ids)
    assert cached.dtype == dtype
    assert rel_err(full, expected) <= TOL[dtype]
    assert rel_err(cached, expected) <= TOL[dtype]


@pytest.mark.parametrize("overrides", [dict(), HYBRID], ids=["moe", "hybrid"])
def test_num_last_tokens_keeps_the_last_positions_and_the_same_cache(overrides):
    model = tiny_model(**overrides)
    ids = torch.randint(0, VOCAB, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False  # a left-padded row
    with torch.no_grad():
        full_cache, last_cache = model.allocate_cache(2), model.allocate_cache(2)
        full = model(ids, mask=mask, cache=full_cache)
        # The head's matmul over fewer rows may block differently: equal to float32 rounding, not bitwise.
        for n in (1, 4, 9, 20):
            got, want = model(ids, mask=mask, num_last_tokens=n), model(ids, mask=mask)[:, -n:]
            assert got.shape == want.shape and rel_err(got, want) <= F32
        last = model(ids, mask=mask, cache=last_cache, num_last_tokens=1)
        assert last.shape == (2, 1, VOCAB) and rel_err(last, full[:, -1:]) <= F32
        assert torch.equal(model.step(ids[:, -1], full_cache), model.step(ids[:, -1], last_cache))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_last_tokens must be an int >= 0"):
            model(ids, num_last_tokens=bad)


@settings(deadline=None, max_examples=12)
@given(overrides=model_overrides(), lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       cuts=st.lists(st.integers(1, 8), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_chunked_prefill_and_steps_match_one_forward(overrides, lengths, cuts, seed):
    torch.manual_seed(seed)
    model = tiny_model(**overrides)
    prompts, mask = left_pad([torch.randint(1, VOCAB, (n,)) for n in lengths])
    batch, prompt_len = prompts.shape
    continuation = torch.randint(0, VOCAB, (batch, sum(cuts) + 4))  # prompt chunks, then 4 steps
    ids = torch.cat([prompts, continuation], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(continuation, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        expected = model(ids, mask=full_mask)
        cache = model.allocate_cache(batch)
        pieces = [model(prompts, mask=mask, cache=cache)]
        start = prompt_len
        for cut in cuts:  # further prompt chunks through forward(..., cache=)
            pieces.append(model(ids[:, start:start + cut], cache=cache))
            start += cut
        pieces += [model.step(ids[:, t], cache)[:, None] for t in range(start, ids.shape[1])]
    cached = torch.cat(pieces, dim=1)
    assert torch.equal(cache.positions, full_mask.sum(1))
    assert rel_err(cached[full_mask], expected[full_mask]) <= F32


def test_mamba_state_has_constant_size_and_is_updated_in_place():
    model = tiny_model(**HYBRID)
    cache = model.allocate_cache(2, max_seqlen=8)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (2, 8)), cache=cache)
        mamba = [state for state in cache.states if isinstance(state, MambaState)]
        assert len(mamba) == 2
        before = [(s.conv_state.data_ptr(), s.ssm_state.data_ptr(), s.conv_state.shape, s.ssm_state.shape)
                  for s in mamba]
        for t in range(20):  # past the attention buffer's 8 slots, which grows
            model.step(torch.randint(0, VOCAB, (2,)), cache)
    after = [(s.conv_state.data_ptr(), s.ssm_state.data_ptr(), s.conv_state.shape, s.ssm_state.shape)
             for s in cache.states if isinstance(s, MambaState)]
    assert after == before
    assert torch.equal(cache.positions, torch.tensor([28, 28]))


def test_allocate_cache_rejects_a_bad_batch_size():
    model = tiny_model()
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"batch_size.*{bad!r}"):
            model.allocate_cache(bad)


# ---------------------------------------------------------------- generate


@settings(deadline=None, max_examples=12)
@given(overrides=model_overrides(), batch=st.integers(1, 2), prompt_len=st.integers(1, 9),
       max_new_tokens=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_cached_greedy_equals_greedy_by_full_forward(overrides, batch, prompt_len, max_new_tokens, seed):
    torch.manual_seed(seed)
    model = tiny_model(**overrides)
    prompts = torch.randint(0, VOCAB, (batch, prompt_len))
    generated = model.generate(prompts, max_new_tokens, temperature=0)
    assert generated.shape == (batch, prompt_len + max_new_tokens) and generated.dtype == prompts.dtype
    assert torch.equal(generated, greedy_by_full_forward(model, prompts, max_new_tokens))


def check_batch_equals_single_prompts(model, lengths, max_new_tokens):
    prompts = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    ids, mask = left_pad(prompts)
    batched = model.generate(ids, max_new_tokens, temperature=0, attention_mask=mask)
    assert torch.equal(batched[:, :ids.shape[1]], ids)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], max_new_tokens, temperature=0)
        assert torch.equal(batched[row, ids.shape[1]:], alone[0, len(prompt):]), f"row {row} of lengths {lengths}"


@settings(deadline=None, max_examples=10)
@given(overrides=model_overrides(attention=True), lengths=st.lists(st.integers(1, 9), min_size=2, max_size=3),
       seed=st.integers(0, 2**16))
def test_left_padded_batch_generates_what_each_prompt_generates_alone(overrides, lengths, seed):
    torch.manual_seed(seed)
    check_batch_equals_single_prompts(tiny_model(**overrides), lengths, max_new_tokens=6)


@pytest.mark.parametrize("overrides", [dict(), HYBRID, dict(ffn="none", depth=3)], ids=["moe", "hybrid", "mamba"])
def test_left_padded_batch_generates_what_each_prompt_generates_alone_fixed(overrides):
    check_batch_equals_single_prompts(tiny_model(**overrides), [1, 7, 4], max_new_tokens=8)


def test_generate_prefills_once_then_steps_once_per_token():
    model = tiny_model(**HYBRID)
    calls = {"forward": 0, "step": 0}
    forward, step = model.forward, model.step

    def counting_forward(*args, **kwargs):
        calls["forward"] += 1
        return forward(*args, **kwargs)

    def counting_step(*args, **kwargs):
        calls["step"] += 1
        return step(*args, **kwargs)

    model.forward, model.step = counting_forward, counting_step
    model.generate(torch.randint(0, VOCAB, (2, 9)), 5, temperature=0)
    # The last token is sampled from the logits of the step before: no step after it.
    assert calls == {"forward": 1, "step": 4}


def test_sampling_with_a_seed_is_reproducible():
    model = tiny_model(**HYBRID, initializer_range=0.02)  # near-uniform logits: different seeds must differ
    prompts = torch.randint(0, VOCAB, (2, 5))
    torch.manual_seed(1)
    first = model.generate(prompts, 16, temperature=1.0, top_p=0.9, seed=7)
    torch.manual_seed(2)  # the global generator must not matter
    again = model.generate(prompts, 16, temperature=1.0, top_p=0.9, seed=7)
    other = model.generate(prompts, 16, temperature=1.0, top_p=0.9, seed=8)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_rows_that_emit_eos_keep_emitting_it():
    model = tiny_model(**HYBRID)
    for _ in range(20):
        prompts = torch.randint(1, VOCAB, (3, 6))
        free = model.generate(prompts, 10, temperature=0)
        eos = int(free[0, 6])  # row 0 ends at once...
        if (free[0, 7:] != eos).any():  # ...though left alone it would go on with other tokens
            break
    else:
        pytest.fail("no prompt found whose row 0 continues past its first token: the check below would be vacuous")
    stopped = model.generate(prompts, 10, temperature=0, eos_token_id=eos)
    ends = []
    for row in range(3):
        hits = (free[row, 6:] == eos).nonzero()
        end = int(hits[0]) + 1 if len(hits) else 10  # tokens up to and including the first eos
        ends.append(end)
        assert torch.equal(stopped[row, 6:6 + end], free[row, 6:6 + end])
        assert (stopped[row, 6 + end:] == eos).all()
    # Generation stops as soon as every row is done.
    assert stopped.shape[1] == 6 + max(ends)
    assert model.generate(prompts[:1], 10, temperature=0, eos_token_id=eos).shape == (1, 7)


def test_zero_new_tokens_returns_the_prompt():
    model = tiny_model()
    prompts = torch.randint(0, VOCAB, (2, 5))
    assert torch.equal(model.generate(prompts, 0), prompts)


def test_generate_restores_training_mode_and_keeps_no_graph():
    model = tiny_model(**HYBRID).train()
    out = model.generate(torch.randint(0, VOCAB, (1, 4)), 3)
    assert model.training and all(layer.training for layer in model.layers)
    assert not out.requires_grad


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=torch.rand(2, 5)), r"input_ids.*\(2, 5\) torch.float32"),
    (dict(input_ids=torch.zeros(5, dtype=torch.long)), r"input_ids.*\(batch, prompt_len\).*\(5,\)"),
    (dict(max_new_tokens=-1), "max_new_tokens.*-1"),
    (dict(max_new_tokens=2.5), "max_new_tokens.*2.5"),
    (dict(temperature=-0.5), "temperature.*-0.5"),
    (dict(top_k=0), "top_k.*0"),
    (dict(top_p=0.0), "top_p.*0.0"),
    (dict(top_p=1.5), "top_p.*1.5"),
    (dict(attention_mask=torch.ones(2, 4, dtype=torch.bool)), r"attention_mask.*\(2, 5\).*\(2, 4\)"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])), "left-padded"),
], ids=["float_ids", "1d_ids", "negative_new", "float_new", "temperature", "top_k", "top_p_0", "top_p_big",
        "mask_shape", "right_padded"])
def test_generate_rejects_bad_arguments(kwargs, message):
    model = tiny_model()
    args = dict(input_ids=torch.randint(0, VOCAB, (2, 5)), max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=message):
        model.generate(**args)


def test_generate_needs_a_vocabulary():
    model = tiny_model(vocab_size=None)
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2)


def test_generate_rejects_prompt_ids_out_of_range():
    with pytest.raises(ValueError, match=f"vocab_size={VOCAB}"):
        tiny_model().generate(torch.full((1, 3), VOCAB), 2)


# ---------------------------------------------------------------- examples/generate.py


@pytest.fixture
def example(capsys):
    """The example's main(); the loguru configuration it installs is put back afterwards."""
    path = Path(__file__).resolve().parents[1] / "examples" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module.main
    logger.remove()
    logger.add(sys.stderr)
    logger.disable("mamba_r1")


def test_example_generates_from_random_weights(example, capsys):
    continuation = example(["--prompt", "héllo", "--max-new-tokens", "5", "--seed", "3"])
    out, err = capsys.readouterr()
    assert continuation in out
    assert "RANDOM weights" in err and "tokens/s" in err
    # The seed fixes the weights and the draws.
    assert example(["--prompt", "héllo", "--max-new-tokens", "5", "--seed", "3"]) == continuation


def test_example_loads_a_checkpoint(example, capsys, tmp_path):
    model = create_mamba_moe(dim=16, depth=1, d_state=4, d_conv=2, expand=1, num_experts=2, expert_dim=32,
                             vocab_size=256, device="cpu")
    with torch.no_grad():
        # Every byte predicts "A" (0x41), so greedy decoding must print only A's.
        model.embedding.weight.zero_()
        model.embedding.weight[0x41, 0] = 1.0
        model.embedding.weight[:, 0] += 0.01
        model.layers[0].mixer.out_proj.weight.zero_()
        model.layers[0].ffn.experts.w2.zero_()
        model.layers[0].ffn.experts.b2.zero_()
    model.save_pretrained(tmp_path)
    continuation = example(["--checkpoint", str(tmp_path), "--prompt", "xyz", "--max-new-tokens", "4",
                            "--temperature", "0"])
    assert continuation == "AAAA"
    assert "RANDOM" not in capsys.readouterr().err


def test_example_rejects_a_checkpoint_that_is_not_byte_level(example, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(SystemExit):
        example(["--checkpoint", str(tmp_path)])


def test_weights_key_moves_when_a_weight_moves_and_only_then():
    """The key a kept CUDA graph is checked against: it reads weights by address, so in-place updates keep it."""
    from mamba_r1.generation import _weights_key

    model = tiny_model(ffn="none")
    key = _weights_key(model)
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, temperature=0)
    changes = [
        lambda m: None,  # generating changes nothing
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1).step(),
        lambda m: m.load_state_dict(copy.deepcopy(m.state_dict())),  # copies in place
        lambda m: m.layers[0].mixer.A_log.data.add_(1.0),
        lambda m: m.to(torch.float64),  # new storage
        lambda m: setattr(m.layers[0].mixer, "D", torch.nn.Parameter(m.layers[0].mixer.D.clone())),
    ]
    moved = []
    for change in changes:
        change(model)
        moved.append(_weights_key(model) != key)
        key = _weights_key(model)
    assert moved == [False, False, False, False, True, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("scan_backend", ["torch", "triton"])
def test_cuda_graph_generation_is_kept_between_calls_and_follows_weight_changes(scan_backend):
    from mamba_r1.generation import _DECODE_GRAPHS

    model = tiny_model(ffn="none", device="cuda", scan_backend=scan_backend)
    prompt = torch.randint(0, VOCAB, (2, 7), device="cuda")
    want = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=0, cuda_graph=True), want)
    graph = _DECODE_GRAPHS[model][2][1]
    assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=0, cuda_graph=True), want)
    assert _DECODE_GRAPHS[model][2][1] is graph  # kept, not captured again
    with torch.no_grad():
        for layer in model.layers:  # in place: the kept graph reads the new values
            layer.mixer.A_log.data.add_(1.0)
            layer.mixer.out_proj.weight.mul_(-1.0)
    changed = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert not torch.equal(changed, want)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=0, cuda_graph=True), changed)
    assert _DECODE_GRAPHS[model][2][1] is graph
    model.to(torch.bfloat16)  # moved: captured anew
    want = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, temperature=0, cuda_graph=True), want)
    assert _DECODE_GRAPHS[model][2][1] is not graph
    copy.deepcopy(model)  # the kept graphs live outside the model


@pytest.mark.parametrize("overrides", [dict(ffn="none"), dict(), HYBRID], ids=["mamba", "moe", "hybrid"])
def test_fused_decode_step_matches_the_torch_step(overrides):
    """The CUDA decode path (fused add + norm, small-batch projections and head, conv and state-update kernels; the
    interpreter without a GPU) against the same weights on the PyTorch path, over a prefill and several steps."""
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        fused = tiny_model(**overrides, scan_backend="triton", device=None)
        plain = tiny_model(**overrides, device=None)
        plain.load_state_dict(fused.state_dict())
        ids = torch.randint(0, VOCAB, (2, 12))
        logits = []
        for model in (fused, plain):
            with torch.no_grad():
                cache = model.allocate_cache(2)
                out = [model(ids[:, :7], cache=cache, num_last_tokens=1)[:, 0]]
                out += [model.step(ids[:, t], cache) for t in range(7, 12)]
            logits.append(torch.stack(out, dim=1))
    assert rel_err(logits[0], logits[1]) <= F32
