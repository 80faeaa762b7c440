"""MambaMoEConfig: validation on construction (errors name the field and the value), the layer schedule, JSON
round-trip."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1 import MambaMoEConfig
from mamba_r1.config import ACTIVATIONS, FFN_KINDS

TINY = dict(dim=16, depth=3, d_state=4, d_conv=2, expand=1, num_experts=4, expert_dim=32, num_heads=2)


@st.composite
def config_kwargs(draw):
    """Valid MambaMoEConfig keyword arguments covering every kind of field (ints, optionals, tuples, strings)."""
    depth = draw(st.integers(1, 6))
    num_experts = draw(st.integers(1, 8))
    num_heads = draw(st.sampled_from([1, 2, 4]))
    return dict(
        dim=num_heads * draw(st.sampled_from([2, 4, 8])),
        depth=depth,
        vocab_size=draw(st.one_of(st.none(), st.integers(1, 50_000))),
        max_seq_len=draw(st.integers(1, 4096)),
        d_state=draw(st.integers(1, 64)),
        d_conv=draw(st.integers(1, 4)),
        expand=draw(st.integers(1, 3)),
        dt_rank=draw(st.one_of(st.just("auto"), st.integers(1, 16))),
        scan_backend=draw(st.sampled_from(["auto", "ref", "torch", "triton"])),
        ffn=draw(st.sampled_from(FFN_KINDS)),
        moe_every=draw(st.integers(1, 4)),
        num_experts=num_experts,
        expert_dim=draw(st.integers(1, 4096)),
        top_k=draw(st.integers(1, num_experts)),
        capacity_factor=draw(st.one_of(st.none(), st.floats(0.5, 4.0))),
        eval_capacity_factor=draw(st.one_of(st.none(), st.floats(0.5, 4.0))),
        activation=draw(st.sampled_from(ACTIVATIONS)),
        mlp_dim=draw(st.one_of(st.none(), st.integers(1, 4096))),
        attn_layer_idx=tuple(draw(st.lists(st.integers(0, depth - 1), max_size=depth, unique=True))),
        attn_every=draw(st.integers(0, 8)),
        num_heads=num_heads,
        num_kv_heads=draw(st.sampled_from([None, 1, num_heads])),
        rope_scaling=draw(st.sampled_from([None, "linear"])),
        learned_pos_emb=draw(st.booleans()),
        tie_embeddings=draw(st.booleans()),
        norm_eps=draw(st.floats(1e-8, 1e-3)),
        gradient_checkpointing=draw(st.booleans()),
    )


# ---------------------------------------------------------------- JSON round-trip


@settings(deadline=None, max_examples=40)
@given(kwargs=config_kwargs())
def test_json_round_trip_gives_an_equal_config(kwargs):
    config = MambaMoEConfig(**kwargs)
    text = config.to_json()
    assert json.loads(text) == config.to_dict()
    restored = MambaMoEConfig.from_json(text)
    assert restored == config
    assert restored.to_dict() == config.to_dict()
    assert restored.layer_schedule == config.layer_schedule
    assert MambaMoEConfig.from_dict(config.to_dict()) == config


def test_json_round_trip_through_a_file(tmp_path):
    config = MambaMoEConfig(**TINY, vocab_size=256, attn_layer_idx=[2, 0], capacity_factor=None)
    path = tmp_path / "config.json"
    config.to_json(path)
    restored = MambaMoEConfig.from_json(path)
    assert restored == config
    assert restored.attn_layer_idx == (2, 0) and restored.capacity_factor is None
    # A plain str path works as well as a Path.
    assert MambaMoEConfig.from_json(str(path)) == config


def test_from_dict_rejects_unknown_fields_by_name():
    d = MambaMoEConfig(**TINY).to_dict()
    d["num_expert"] = 4
    with pytest.raises(ValueError, match="num_expert"):
        MambaMoEConfig.from_dict(d)


def test_from_json_validates_the_values_it_reads():
    d = MambaMoEConfig(**TINY).to_dict()
    d["depth"] = 0
    with pytest.raises(ValueError, match="depth"):
        MambaMoEConfig.from_json(json.dumps(d))


# ---------------------------------------------------------------- the layer schedule


def test_default_schedule_is_mamba_with_moe_everywhere():
    config = MambaMoEConfig(**TINY)
    assert config.layer_schedule == [("mamba", "moe")] * 3
    assert not config.has_attention


def test_attn_every_puts_one_attention_layer_mid_block():
    # Jamba: one attention layer in each block of 8, at offset 4.
    config = MambaMoEConfig(**{**TINY, "depth": 16}, attn_every=8)
    assert [i for i in range(16) if config.mixer_kind(i) == "attention"] == [4, 12]
    assert config.has_attention


def test_attn_layer_idx_and_attn_every_combine():
    config = MambaMoEConfig(**{**TINY, "depth": 6}, attn_layer_idx=(0,), attn_every=4)
    assert [config.mixer_kind(i) for i in range(6)] == ["attention", "mamba", "attention", "mamba", "mamba", "mamba"]


def test_moe_every_alternates_moe_and_dense():
    config = MambaMoEConfig(**{**TINY, "depth": 4}, moe_every=2)
    assert [config.ffn_kind(i) for i in range(4)] == ["dense", "moe", "dense", "moe"]


@pytest.mark.parametrize("ffn", ["dense", "none"])
def test_ffn_kind_applies_to_every_layer(ffn):
    config = MambaMoEConfig(**TINY, ffn=ffn, moe_every=2)
    assert [config.ffn_kind(i) for i in range(3)] == [ffn] * 3


@settings(deadline=None, max_examples=40)
@given(kwargs=config_kwargs())
def test_schedule_follows_its_definition(kwargs):
    config = MambaMoEConfig(**kwargs)
    k = config.attn_every
    for i, (mixer, ffn) in enumerate(config.layer_schedule):
        attention = i in config.attn_layer_idx or (k > 0 and i % k == k // 2)
        assert mixer == ("attention" if attention else "mamba")
        if config.ffn == "moe":
            assert ffn == ("moe" if (i + 1) % config.moe_every == 0 else "dense")
        else:
            assert ffn == config.ffn
    assert config.has_attention == any(m == "attention" for m, _ in config.layer_schedule)


# ---------------------------------------------------------------- validation


BAD_VALUES = [
    # (overrides, a word the message must name, the given value as the message shows it)
    (dict(depth=0), "depth", "0"),
    (dict(depth=-2), "depth", "-2"),
    (dict(dim=0), "dim", "0"),
    (dict(dim=-16), "dim", "-16"),
    (dict(dim=16.0), "dim", "16.0"),
    (dict(dim=True), "dim", "True"),
    (dict(d_state=-4), "d_state", "-4"),
    (dict(d_conv=0), "d_conv", "0"),
    (dict(expand=0), "expand", "0"),
    (dict(max_seq_len=0), "max_seq_len", "0"),
    (dict(num_experts=0), "num_experts", "0"),
    (dict(expert_dim=-32), "expert_dim", "-32"),
    (dict(top_k=0), "top_k", "0"),
    (dict(moe_every=0), "moe_every", "0"),
    (dict(num_heads=0), "num_heads", "0"),
    (dict(vocab_size=0), "vocab_size", "0"),
    (dict(vocab_size=-1), "vocab_size", "-1"),
    (dict(mlp_dim=-8), "mlp_dim", "-8"),
    (dict(num_kv_heads=0), "num_kv_heads", "0"),
    (dict(dt_rank=0), "dt_rank", "0"),
    (dict(dt_rank="big"), "dt_rank", "'big'"),
    (dict(ffn="sparse"), "ffn", "'sparse'"),
    (dict(activation="relu"), "activation", "'relu'"),
    (dict(rope_scaling="dynamic"), "rope_scaling", "'dynamic'"),
    (dict(attn_every=-1), "attn_every", "-1"),
    (dict(attn_layer_idx=(3,)), "attn_layer_idx", "(3,)"),
    (dict(attn_layer_idx=(-1,)), "attn_layer_idx", "(-1,)"),
    (dict(top_k=5), "top_k", "5"),
    (dict(dim=30, num_heads=4, attn_every=2), "num_heads", "dim=30"),
    (dict(num_heads=2, num_kv_heads=4, attn_layer_idx=(1,)), "num_kv_heads", "num_kv_heads=4"),
    (dict(norm_eps=0.0), "norm_eps", "0.0"),
    (dict(initializer_range=-0.02), "initializer_range", "-0.02"),
]


@pytest.mark.parametrize("overrides, name, given_value", BAD_VALUES, ids=[f"{n}={v}" for _, n, v in BAD_VALUES])
def test_bad_value_raises_naming_the_field_and_the_value(overrides, name, given_value):
    with pytest.raises(ValueError) as info:
        MambaMoEConfig(**{**TINY, **overrides})
    message = str(info.value)
    assert name in message and given_value in message, message


def test_dim_need_not_divide_by_heads_without_attention():
    # num_heads only matters for attention layers; a pure Mamba config is free to have any width.
    assert MambaMoEConfig(**{**TINY, "dim": 30, "num_heads": 4}).dim == 30


# Fields the config hands to a module unchanged: a bad value must fail when the config is made (a config.json that
# can never build a model should not load), and the message must use the config's name for the field.
MODULE_CHECKED = [
    (dict(scan_backend="cuda"), "scan_backend", "'cuda'"),
    (dict(moe_backend="fast"), "moe_backend", "'fast'"),
    (dict(router_priority="random"), "router_priority", "'random'"),
    (dict(capacity_factor=-1.0), "capacity_factor", "-1.0"),
    (dict(eval_capacity_factor=0.0), "eval_capacity_factor", "0.0"),
    (dict(min_capacity=-1), "min_capacity", "-1"),
    (dict(jitter_noise=1.5), "jitter_noise", "1.5"),
    (dict(load_balance_coef=-0.01), "load_balance_coef", "-0.01"),
    (dict(z_loss_coef=-0.001), "z_loss_coef", "-0.001"),
    (dict(rope_base=0.5, attn_every=1), "rope_base", "0.5"),
    (dict(rope_scaling_factor=4.0, attn_every=1), "rope_scaling_factor", "4.0"),
    (dict(dim=12, num_heads=4, attn_every=1), "num_heads", "dim=12"),  # head_dim 3: odd, RoPE needs it even
]


@pytest.mark.parametrize("overrides, name, given_value", MODULE_CHECKED,
                         ids=[f"{n}={v}" for _, n, v in MODULE_CHECKED])
def test_values_a_module_would_reject_fail_at_config_construction(overrides, name, given_value):
    with pytest.raises(ValueError) as info:
        MambaMoEConfig(**{**TINY, **overrides})
    message = str(info.value)
    assert name in message and given_value in message, message
