"""MambaMoE: the layer schedule, shapes and dtypes through the whole model, padding, the loss, gradients (every
parameter, checkpointing), bad input, save/load, and the create_mamba_moe factory."""

import inspect
import json
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import mamba_r1.model as model_module
from mamba_r1 import CausalSelfAttention, MambaBlock, MambaMoE, MambaMoEConfig, SwitchMoE, create_mamba_moe
from mamba_r1.config import ACTIVATIONS, FFN_KINDS
from mamba_r1.modules.mlp import MLP
from tests.conftest import GRAD_TOL, TOL, rel_err

F32 = TOL[torch.float32]
TINY = dict(dim=16, depth=2, d_state=4, d_conv=2, expand=1, num_experts=2, expert_dim=32, num_heads=2,
            scan_backend="torch", device="cpu")
VOCAB = 37


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
    return create_mamba_moe(**{**TINY, **overrides})


@st.composite
def model_overrides(draw):
    """Tiny configurations over every schedule: mixers (Mamba / attention by index / periodic), FFN kinds, MoE every
    k layers, with or without vocabulary, learned positions, tied or untied head. No capacity dropping in eval, so
    two computations that should agree (padded vs alone) route the same tokens."""
    depth = draw(st.integers(1, 3))
    num_heads = draw(st.sampled_from([2, 4]))
    overrides = dict(
        dim=draw(st.sampled_from([16, 24, 32])),
        depth=depth,
        d_conv=draw(st.integers(2, 4)),
        expand=draw(st.integers(1, 2)),
        ffn=draw(st.sampled_from(FFN_KINDS)),
        moe_every=draw(st.integers(1, 2)),
        num_experts=draw(st.integers(2, 4)),
        expert_dim=draw(st.sampled_from([32, 48, 64])),
        top_k=draw(st.integers(1, 2)),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        ffn_bias=draw(st.booleans()),
        mlp_dim=draw(st.sampled_from([None, 40])),
        num_heads=num_heads,
        num_kv_heads=draw(st.sampled_from([None, 1])),
        vocab_size=draw(st.sampled_from([None, VOCAB])),
        learned_pos_emb=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
        max_seq_len=32,
        eval_capacity_factor=None,
    )
    mixers = draw(st.sampled_from(["mamba", "attn_layer_idx", "attn_every"]))
    if mixers == "attn_layer_idx":
        overrides["attn_layer_idx"] = tuple(draw(st.lists(st.integers(0, depth - 1), min_size=1, max_size=depth,
                                                          unique=True)))
    elif mixers == "attn_every":
        overrides["attn_every"] = draw(st.integers(1, 3))
    return overrides


def left_padded_mask(lengths, seqlen) -> torch.Tensor:  # (batch, seqlen) bool
    positions = torch.arange(seqlen)
    return positions[None, :] >= (seqlen - torch.tensor(lengths))[:, None]


def model_input(model, batch, seqlen, dtype=torch.float32) -> torch.Tensor:
    """Token ids (batch, seqlen) when the model has a vocabulary, else hidden states (batch, seqlen, dim)."""
    if model.config.vocab_size:
        return torch.randint(0, model.config.vocab_size, (batch, seqlen))
    return torch.randn(batch, seqlen, model.config.dim, dtype=dtype)


def moe_layer_rows(model) -> dict[int, int]:
    """layer index -> row of the stacked aux statistics (MoE layers only, in layer order)."""
    moe_layers = [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, SwitchMoE)]
    return {layer: row for row, layer in enumerate(moe_layers)}


# ---------------------------------------------------------------- structure, shapes, dtypes


@settings(deadline=None, max_examples=15)
@given(overrides=model_overrides(), batch=st.integers(1, 3), seqlen=st.sampled_from([1, 2, 5, 7, 13]),
       padded=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_shapes_follow_the_schedule(overrides, batch, seqlen, padded, seed):
    torch.manual_seed(seed)
    model = tiny_model(**overrides).eval()
    config = model.config
    assert len(model.layers) == config.depth
    for layer, (mixer, ffn) in zip(model.layers, config.layer_schedule):
        assert isinstance(layer.mixer, MambaBlock if mixer == "mamba" else CausalSelfAttention)
        assert isinstance(layer.ffn, {"moe": SwitchMoE, "dense": MLP, "none": type(None)}[ffn])

    x = model_input(model, batch, seqlen)
    mask = None
    if padded:
        mask = left_padded_mask(torch.randint(1, seqlen + 1, (batch,)).tolist(), seqlen)
    with torch.no_grad():
        out, aux = model(x, mask=mask, return_aux=True)
        plain = model(x, mask=mask)
    width = config.vocab_size or config.dim
    assert out.shape == (batch, seqlen, width) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(plain, out)

    rows = moe_layer_rows(model)
    if not rows:
        assert aux is None
        return
    assert aux.tokens_per_expert.shape == (len(rows), config.num_experts)
    real_tokens = batch * seqlen if mask is None else int(mask.sum())
    # eval_capacity_factor=None: nothing dropped, every real token routed to top_k experts, no padding routed.
    assert (aux.tokens_per_expert.sum(-1) == real_tokens * config.top_k).all()
    assert (aux.dropped_fraction == 0).all()
    expected_loss = config.load_balance_coef * aux.load_balance_loss + config.z_loss_coef * aux.z_loss
    assert rel_err(aux.loss, expected_loss) <= F32


@pytest.mark.parametrize("vocab_size", [None, VOCAB])
def test_float_input_gives_hidden_states_even_with_a_vocabulary(vocab_size):
    model = tiny_model(vocab_size=vocab_size).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert model(x).shape == (2, 5, 16)


@pytest.mark.parametrize("vocab_size", [None, VOCAB])
def test_bf16_model_keeps_bf16_activations(vocab_size):
    model = tiny_model(vocab_size=vocab_size, attn_layer_idx=(1,), dtype=torch.bfloat16).eval()
    x = model_input(model, 2, 7, dtype=torch.bfloat16)
    with torch.no_grad():
        out, aux = model(x, return_aux=True)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 7, vocab_size or 16)
    assert torch.isfinite(out).all() and torch.isfinite(aux.loss)


def test_lm_head_is_tied_to_the_embedding_by_default():
    tied = tiny_model(vocab_size=VOCAB)
    assert tied.lm_head.weight is tied.embedding.weight
    untied = tiny_model(vocab_size=VOCAB, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.embedding.weight
    # The tied matrix counts once.
    assert tied.num_parameters() == untied.num_parameters() - VOCAB * 16


def test_learned_pos_emb_adds_a_position_table():
    model = tiny_model(vocab_size=VOCAB, learned_pos_emb=True, max_seq_len=24)
    assert model.pos_embedding.weight.shape == (24, 16)
    assert tiny_model(vocab_size=VOCAB).pos_embedding is None


def test_active_parameters_count_top_k_of_the_experts():
    model = tiny_model(num_experts=4, top_k=1, depth=3, moe_every=1)
    experts = sum(p.numel() for p in model.layers[0].ffn.experts.parameters())
    assert model.num_parameters(active=True) == model.num_parameters() - 3 * experts * 3 // 4


# ---------------------------------------------------------------- padding


@settings(deadline=None, max_examples=12)
@given(overrides=model_overrides(), lengths=st.lists(st.integers(1, 11), min_size=2, max_size=3),
       seed=st.integers(0, 2**16))
def test_left_padding_is_invisible_to_real_tokens(overrides, lengths, seed):
    torch.manual_seed(seed)
    model = tiny_model(**overrides).eval()
    seqlen = max(lengths) + 2  # at least two pads in every row
    x = model_input(model, len(lengths), seqlen)
    if x.is_floating_point():
        x = x * 10  # padded positions hold junk; it must not leak into real tokens
    mask = left_padded_mask(lengths, seqlen)
    with torch.no_grad():
        batched = model(x, mask=mask)
        for row, length in enumerate(lengths):
            alone = model(x[row:row + 1, seqlen - length:])
            assert rel_err(batched[row, seqlen - length:], alone[0]) <= F32


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("ffn", ["moe", "none"])
def test_loss_is_shifted_cross_entropy_plus_aux(ffn):
    model = tiny_model(vocab_size=VOCAB, ffn=ffn).eval()
    ids = torch.randint(0, VOCAB, (3, 9))
    labels = torch.randint(0, VOCAB, (3, 9))
    labels[0, 4] = labels[2, 1] = -100
    with torch.no_grad():
        logits, aux = model(ids, return_aux=True)
        out = model.loss(ids, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert rel_err(out.lm_loss, expected) <= F32
    if ffn == "none":
        assert out.aux is None and torch.equal(out.loss, out.lm_loss)
    else:
        assert rel_err(out.loss, expected + aux.loss) <= F32
    # Default labels: the inputs themselves.
    with torch.no_grad():
        default = model.loss(ids).lm_loss
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert rel_err(default, expected) <= F32


def test_loss_of_a_left_padded_row_equals_its_loss_alone():
    model = tiny_model(vocab_size=VOCAB, attn_layer_idx=(1,), eval_capacity_factor=None).eval()
    ids = torch.randint(1, VOCAB, (2, 12))
    mask = left_padded_mask([8, 12], 12)
    padded = ids.masked_fill(~mask, 0)
    with torch.no_grad():
        batched = model.loss(padded[:1], mask=mask[:1]).lm_loss
        alone = model.loss(ids[:1, 4:]).lm_loss
    assert rel_err(batched, alone) <= F32


def test_loss_rejects_labels_of_another_shape():
    model = tiny_model(vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"labels.*\(2, 6\).*\(2, 5\)"):
        model.loss(torch.randint(0, VOCAB, (2, 6)), torch.randint(0, VOCAB, (2, 5)))


# ---------------------------------------------------------------- gradients

GRAD_CONFIGS = {
    "moe": dict(vocab_size=VOCAB, num_experts=3, depth=2),
    "hybrid": dict(vocab_size=VOCAB, num_experts=4, top_k=2, depth=3, attn_layer_idx=(1,), moe_every=2,
                   learned_pos_emb=True, tie_embeddings=False),
    "hidden_dense": dict(vocab_size=None, ffn="dense", attn_every=2, depth=2),
}


def loss_and_grads(model, x, seed):
    """Training loss (LM + aux, or a plain sum for hidden states) and the gradient of every parameter."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the router jitter draws from it
    if model.config.vocab_size:
        out = model.loss(x)
        loss, aux = out.loss, out.aux
    else:
        hidden, aux = model(x, return_aux=True)
        loss = hidden.float().pow(2).mean() + (aux.loss if aux is not None else 0)
    loss.backward()
    return loss.detach(), aux, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(name, dtype, monkeypatch):
    model = tiny_model(**GRAD_CONFIGS[name], jitter_noise=0.1, dtype=dtype).train()
    x = model_input(model, 2, 11, dtype=dtype)
    loss, _, grads = loss_and_grads(model, x, seed=3)

    calls = []
    real_checkpoint = model_module.checkpoint

    def counting_checkpoint(fn, *args, **kwargs):
        calls.append(fn)
        return real_checkpoint(fn, *args, **kwargs)

    monkeypatch.setattr(model_module, "checkpoint", counting_checkpoint)
    model.config.gradient_checkpointing = True
    loss_ckpt, _, grads_ckpt = loss_and_grads(model, x, seed=3)
    assert len(calls) == model.config.depth  # the flag really took the checkpointed path
    assert rel_err(loss_ckpt, loss) <= TOL[dtype]
    for param_name, grad in grads.items():
        assert rel_err(grads_ckpt[param_name], grad) <= GRAD_TOL[dtype], param_name

    with torch.no_grad():
        model(x)
    assert len(calls) == model.config.depth  # nothing to recompute when no graph is kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_gradients_reach_every_parameter(name, dtype):
    model = tiny_model(**GRAD_CONFIGS[name], dtype=dtype).train()
    x = model_input(model, 2, 16, dtype=dtype)
    _, aux, grads = loss_and_grads(model, x, seed=0)
    rows = moe_layer_rows(model)
    for param_name, grad in grads.items():
        assert torch.isfinite(grad).all(), param_name
        match = re.fullmatch(r"layers\.(\d+)\.ffn\.experts\.(w1|w2|b1|b2)", param_name)
        if match is None:
            assert grad.abs().sum() > 0, f"{param_name} got no gradient"
            continue
        # Per expert: a gradient exactly when the expert kept at least one token.
        got_tokens = aux.tokens_per_expert[rows[int(match.group(1))]] > 0  # (num_experts,)
        has_grad = grad.flatten(1).abs().sum(1) > 0  # (num_experts,)
        assert torch.equal(has_grad, got_tokens), f"{param_name}: gradient {has_grad}, tokens {got_tokens}"


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def lm():
    return tiny_model(vocab_size=VOCAB).eval()


@pytest.fixture(scope="module")
def hidden_model():
    return tiny_model().eval()


def test_config_must_be_a_config():
    with pytest.raises(TypeError, match="config"):
        MambaMoE(dict(dim=16))


@pytest.mark.parametrize("shape", [(2, 16), (2, 5, 17), (1, 2, 5, 16)])
def test_float_input_of_wrong_shape_is_rejected(hidden_model, shape):
    with pytest.raises(ValueError, match=rf"x.*dim=16.*{re.escape(str(shape))}"):
        hidden_model(torch.randn(shape))


def test_float_input_of_wrong_dtype_is_rejected(hidden_model):
    with pytest.raises(TypeError, match=r"x.*float32.*float64"):
        hidden_model(torch.randn(2, 5, 16, dtype=torch.float64))


def test_token_ids_without_vocabulary_are_rejected(hidden_model):
    with pytest.raises(ValueError, match="vocab_size"):
        hidden_model(torch.randint(0, 10, (2, 5)))


@pytest.mark.parametrize("shape", [(5,), (2, 5, 1)])
def test_token_ids_of_wrong_rank_are_rejected(lm, shape):
    with pytest.raises(ValueError, match=rf"token ids.*\(batch, seqlen\).*{re.escape(str(shape))}"):
        lm(torch.zeros(shape, dtype=torch.long))


@pytest.mark.parametrize("bad_id", [-1, VOCAB, VOCAB + 100])
def test_token_ids_out_of_range_are_rejected(lm, bad_id):
    ids = torch.randint(0, VOCAB, (2, 5))
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"vocab_size={VOCAB}.*{bad_id}"):
        lm(ids)


@pytest.mark.parametrize("x", [torch.zeros(2, 5, dtype=torch.bool), torch.zeros(2, 5, dtype=torch.complex64)],
                         ids=["bool", "complex"])
def test_input_of_unsupported_dtype_is_rejected(lm, x):
    with pytest.raises(TypeError, match=rf"x.*{x.dtype}"):
        lm(x)


def test_input_that_is_not_a_tensor_is_rejected(lm):
    with pytest.raises(TypeError, match="x must be a torch.Tensor; got list"):
        lm([[1, 2, 3]])


def test_empty_sequence_is_rejected(lm):
    with pytest.raises(ValueError, match=r"seqlen >= 1.*\(2, 0\)"):
        lm(torch.zeros(2, 0, dtype=torch.long))


@pytest.mark.parametrize("mask", [torch.ones(2, 5), torch.ones(2, 5, dtype=torch.long)], ids=["float", "long"])
def test_non_bool_mask_is_rejected(lm, mask):
    with pytest.raises(TypeError, match=rf"mask.*bool.*{mask.dtype}"):
        lm(torch.randint(0, VOCAB, (2, 5)), mask=mask)


def test_mask_of_wrong_shape_is_rejected(lm):
    with pytest.raises(ValueError, match=r"mask.*\(2, 5\).*\(2, 4\)"):
        lm(torch.randint(0, VOCAB, (2, 5)), mask=torch.ones(2, 4, dtype=torch.bool))


# ---------------------------------------------------------------- save / load

SAVE_CONFIGS = {
    "tied": dict(vocab_size=VOCAB),
    "learned_pos_emb": dict(vocab_size=VOCAB, learned_pos_emb=True, max_seq_len=16),
    "untied": dict(vocab_size=VOCAB, tie_embeddings=False, learned_pos_emb=True),
    "hidden_hybrid": dict(depth=3, attn_layer_idx=(1,), moe_every=2, num_experts=3, top_k=2),
    "pure_mamba": dict(vocab_size=VOCAB, ffn="none", depth=3),
}


@pytest.mark.parametrize("name", list(SAVE_CONFIGS))
def test_save_load_round_trip_is_exact(name, tmp_path):
    model = tiny_model(**SAVE_CONFIGS[name]).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = MambaMoE.from_pretrained(tmp_path).eval()

    assert loaded.config == model.config
    expected, got = model.state_dict(), loaded.state_dict()
    assert expected.keys() == got.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    if model.lm_head is not None:
        assert (loaded.lm_head.weight is loaded.embedding.weight) == model.config.tie_embeddings
    if model.config.vocab_size and model.config.tie_embeddings:
        # Tied weights are stored once.
        assert len(load_file(tmp_path / "model.safetensors")) == len(expected) - 1

    x = model_input(model, 2, 9)
    mask = left_padded_mask([6, 9], 9)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded(x, mask=mask), model(x, mask=mask))


def test_from_pretrained_casts_to_the_dtype_asked(tmp_path):
    model = tiny_model(vocab_size=VOCAB).eval()
    model.save_pretrained(tmp_path)
    loaded = MambaMoE.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.embedding.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.embedding.weight, model.embedding.weight.to(torch.bfloat16))


@pytest.fixture
def checkpoint_dir(tmp_path):
    tiny_model(vocab_size=VOCAB, depth=2).save_pretrained(tmp_path)
    return tmp_path


def rewrite_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_checkpoint_file_is_named(checkpoint_dir, missing):
    (checkpoint_dir / missing).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        MambaMoE.from_pretrained(checkpoint_dir)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_weights_file_is_named(checkpoint_dir, damage):
    path = checkpoint_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"not a safetensors file" * 4 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        MambaMoE.from_pretrained(checkpoint_dir)


def test_corrupt_config_file_is_named(checkpoint_dir):
    (checkpoint_dir / "config.json").write_text('{"dim": 16,')
    with pytest.raises(ValueError, match="config.json"):
        MambaMoE.from_pretrained(checkpoint_dir)


def test_invalid_config_value_is_named(checkpoint_dir):
    rewrite_config(checkpoint_dir, depth=0)
    with pytest.raises(ValueError, match="config.json.*depth"):
        MambaMoE.from_pretrained(checkpoint_dir)


def test_tensor_whose_shape_disagrees_with_the_config_is_named(checkpoint_dir):
    rewrite_config(checkpoint_dir, expert_dim=48)
    saved = load_file(checkpoint_dir / "model.safetensors")
    wanted = tiny_model(vocab_size=VOCAB, depth=2, expert_dim=48).state_dict()
    mismatched = {name for name, tensor in saved.items() if tensor.shape != wanted[name].shape}
    with pytest.raises(ValueError) as info:
        MambaMoE.from_pretrained(checkpoint_dir)
    named = re.search(r"'([\w.]+)'", str(info.value))
    assert named is not None and named.group(1) in mismatched, str(info.value)
    name = named.group(1)
    assert str(tuple(saved[name].shape)) in str(info.value) and str(tuple(wanted[name].shape)) in str(info.value)


@pytest.mark.parametrize("changes, named", [
    (dict(depth=3), "missing tensors.*'layers\\.2\\."),
    (dict(depth=1), "unexpected tensors.*'layers\\.1\\."),
    (dict(tie_embeddings=False), "missing tensors.*'lm_head\\.weight'"),
    (dict(learned_pos_emb=True), "missing tensors.*'pos_embedding\\.weight'"),
])
def test_tensors_missing_or_unexpected_for_the_config_are_named(checkpoint_dir, changes, named):
    rewrite_config(checkpoint_dir, **changes)
    with pytest.raises(ValueError, match=f"model.safetensors.*{named}"):
        MambaMoE.from_pretrained(checkpoint_dir)


# ---------------------------------------------------------------- the factory


def test_create_mamba_moe_signature():
    params = inspect.signature(create_mamba_moe).parameters
    defaults = {name: p.default for name, p in params.items() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD}
    assert defaults == dict(dim=512, depth=12, d_state=64, d_conv=4, expand=2, num_experts=8, expert_dim=2048,
                            max_seq_len=2048)
    assert list(params)[-1] == "config" and params["config"].kind is inspect.Parameter.VAR_KEYWORD


def test_create_mamba_moe_forwards_config_fields():
    model = tiny_model(vocab_size=VOCAB, ffn="dense", mlp_dim=24, dtype=torch.bfloat16)
    assert model.config.vocab_size == VOCAB and model.config.ffn == "dense"
    assert model.layers[0].ffn.hidden_dim == 24
    assert model.embedding.weight.dtype == torch.bfloat16


def test_seed_example_call_builds_and_runs():
    torch.manual_seed(0)
    model = create_mamba_moe(dim=256, depth=6, d_state=16, d_conv=2, expand=1, num_experts=4, expert_dim=512)
    assert isinstance(model, MambaMoE) and isinstance(model.config, MambaMoEConfig)
    assert model.config.layer_schedule == [("mamba", "moe")] * 6
    device = next(model.parameters()).device
    x = torch.randn(1, 8, 256, device=device)
    with torch.no_grad():
        out, aux = model.eval()(x, return_aux=True)
    assert out.shape == (1, 8, 256) and torch.isfinite(out).all()
    assert aux.tokens_per_expert.shape == (6, 4)
