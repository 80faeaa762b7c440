"""RotaryEmbedding against a float64 complex-number reference, its position algebra, scalings and argument checks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.modules.rotary import RotaryEmbedding
from tests.conftest import GRAD_TOL, TOL, rel_err

SCALINGS = [None, "linear", "ntk", "yarn"]


def reference_inv_freq(dim: int, base: float, max_seq_len: int, scaling, factor: float) -> torch.Tensor:
    """The frequencies as the papers write them, (dim / 2,) float64."""
    i = torch.arange(dim // 2, dtype=torch.float64)
    theta = base ** (-2 * i / dim)
    if scaling == "linear":  # position interpolation: p / s
        return theta / factor
    if scaling == "ntk":  # NTK-aware: b' = b * s^(|D| / (|D| - 2))
        return (base * factor ** (dim / (dim - 2))) ** (-2 * i / dim)
    if scaling == "yarn":  # NTK-by-parts: r(d) = L / lambda_d, ramp gamma between alpha = 1 and beta = 32
        wavelength = 2 * math.pi / theta
        r = max_seq_len / wavelength
        gamma = ((r - 1) / (32 - 1)).clamp(0, 1)
        return (1 - gamma) * theta / factor + gamma * theta
    return theta


def reference_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, mscale: float) -> torch.Tensor:
    """x (batch, heads, seqlen, head_dim), positions (batch, seqlen): each pair (x_i, x_{i+half}) as a complex number
    multiplied by mscale * e^{i * position * inv_freq_i}; features past 2 * half pass through. float64."""
    x = x.double()
    half = inv_freq.numel()
    z = torch.complex(x[..., :half], x[..., half:2 * half])
    angle = positions.double()[..., None] * inv_freq  # (batch, seqlen, half)
    turn = torch.polar(torch.full_like(angle, mscale), angle)[:, None]  # (batch, 1, seqlen, half)
    z = z * turn
    return torch.cat([z.real, z.imag, x[..., 2 * half:]], dim=-1)


def yarn_mscale(scaling, factor):
    return 0.1 * math.log(factor) + 1 if scaling == "yarn" else 1.0


@settings(deadline=None, max_examples=25)
@given(batch=st.integers(1, 3), heads=st.integers(1, 3), seqlen=st.sampled_from([1, 2, 5, 7, 13]),
       half=st.integers(1, 12), extra=st.sampled_from([0, 0, 2, 3]), scaling=st.sampled_from(SCALINGS),
       factor=st.sampled_from([1.0, 2.0, 4.5, 8.0]), start=st.integers(0, 8 * 64),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_forward_and_grad_match_reference(batch, heads, seqlen, half, extra, scaling, factor, start, dtype):
    dim = 2 * half
    if scaling is None:
        factor = 1.0
    if scaling == "ntk" and dim < 4:
        dim = 4
    max_seq_len = 64
    rope = RotaryEmbedding(dim, base=500, max_seq_len=max_seq_len, scaling=scaling, scaling_factor=factor)
    q = torch.randn(batch, heads, seqlen, dim + extra, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, 1, seqlen, dim + extra, dtype=dtype, requires_grad=True)
    # Per-row starts reaching 8x max_seq_len exercise the cache growth.
    position_ids = torch.randint(0, start + 1, (batch, 1)) + torch.arange(seqlen)
    q_rot, k_rot = rope(q, k, position_ids=position_ids)
    assert q_rot.dtype == dtype and k_rot.dtype == dtype

    inv_freq = reference_inv_freq(dim, 500, max_seq_len, scaling, factor)
    mscale = yarn_mscale(scaling, factor)
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    q_ref = reference_rotate(q64, position_ids, inv_freq, mscale)
    k_ref = reference_rotate(k64, position_ids, inv_freq, mscale)
    assert rel_err(q_rot, q_ref) <= TOL[dtype]
    assert rel_err(k_rot, k_ref) <= TOL[dtype]

    gq, gk = torch.randn_like(q_ref), torch.randn_like(k_ref)
    ((q_rot * gq.to(dtype)).sum() + (k_rot * gk.to(dtype)).sum()).backward()
    ((q_ref * gq.to(dtype).double()).sum() + (k_ref * gk.to(dtype).double()).sum()).backward()
    assert rel_err(q.grad, q64.grad) <= GRAD_TOL[dtype]
    assert rel_err(k.grad, k64.grad) <= GRAD_TOL[dtype]


@settings(deadline=None, max_examples=25)
@given(half=st.integers(1, 16), m=st.integers(0, 600), n=st.integers(0, 600), shift=st.integers(-300, 1500),
       scaling=st.sampled_from(SCALINGS))
def test_dot_product_depends_only_on_position_difference(half, m, n, shift, scaling):
    dim = max(2 * half, 4)
    shift = max(shift, -min(m, n))
    rope = RotaryEmbedding(dim, max_seq_len=128, scaling=scaling, scaling_factor=1.0 if scaling is None else 3.0)
    q = torch.randn(1, 1, 1, dim, dtype=torch.float64)
    k = torch.randn(1, 1, 1, dim, dtype=torch.float64)

    def score(pq, pk):
        q_rot, _ = rope(q, q, position_ids=torch.tensor([[pq]]))
        k_rot, _ = rope(k, k, position_ids=torch.tensor([[pk]]))
        return (q_rot * k_rot).sum()

    base, shifted = score(m, n), score(m + shift, n + shift)
    # The float32 table rounds each angle by ~1e-7 relative: scores agree to that, scaled by |q||k|.
    scale = (q.norm() * k.norm()).item() * rope.attention_scaling ** 2
    assert abs(base.item() - shifted.item()) <= 1e-5 * scale


@pytest.mark.parametrize("scaling", SCALINGS)
def test_offset_decoding_matches_full_rotation(scaling):
    rope = RotaryEmbedding(16, max_seq_len=8, scaling=scaling, scaling_factor=1.0 if scaling is None else 2.0)
    q, k = torch.randn(2, 3, 23, 16), torch.randn(2, 1, 23, 16)
    q_full, k_full = rope(q, k)
    for t in range(23):
        q_t, k_t = rope(q[:, :, t:t + 1], k[:, :, t:t + 1], offset=t)
        assert rel_err(q_t, q_full[:, :, t:t + 1]) <= TOL[torch.float32]
        assert rel_err(k_t, k_full[:, :, t:t + 1]) <= TOL[torch.float32]
    # A (batch,) offset tensor: each row continues from its own position.
    offsets = torch.tensor([4, 11])
    q_t, k_t = rope(q[:, :, :5], k[:, :, :5], offset=offsets)
    for b, start in enumerate(offsets.tolist()):
        q_ref, k_ref = rope(q[b:b + 1, :, :5], k[b:b + 1, :, :5], offset=start)
        assert rel_err(q_t[b:b + 1], q_ref) <= TOL[torch.float32]
        assert rel_err(k_t[b:b + 1], k_ref) <= TOL[torch.float32]


@settings(deadline=None, max_examples=15)
@given(batch=st.integers(1, 4), seqlen=st.integers(1, 11), starts=st.lists(st.integers(0, 300), min_size=4, max_size=4))
def test_position_ids_match_offset_path(batch, seqlen, starts):
    rope = RotaryEmbedding(8, max_seq_len=32)
    q, k = torch.randn(batch, 2, seqlen, 8), torch.randn(batch, 2, seqlen, 8)
    offsets = torch.tensor(starts[:batch])
    by_offset = rope(q, k, offset=offsets)
    by_ids = rope(q, k, position_ids=offsets[:, None] + torch.arange(seqlen))
    for a, b in zip(by_offset, by_ids):
        assert rel_err(a, b) <= TOL[torch.float32]
    # One shared (1, seqlen) row of positions broadcasts over the batch like an int offset.
    by_int = rope(q, k, offset=starts[0])
    by_shared = rope(q, k, position_ids=starts[0] + torch.arange(seqlen)[None])
    for a, b in zip(by_int, by_shared):
        assert rel_err(a, b) <= TOL[torch.float32]


def test_linear_factor_one_equals_no_scaling():
    plain = RotaryEmbedding(32, max_seq_len=16)
    linear = RotaryEmbedding(32, max_seq_len=16, scaling="linear", scaling_factor=1.0)
    q, k = torch.randn(2, 2, 40, 32), torch.randn(2, 2, 40, 32)
    for a, b in zip(plain(q, k, offset=3), linear(q, k, offset=3)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("scaling", ["ntk", "yarn"])
def test_factor_one_equals_no_scaling(scaling):
    plain = RotaryEmbedding(32, max_seq_len=16)
    scaled = RotaryEmbedding(32, max_seq_len=16, scaling=scaling, scaling_factor=1.0)
    q, k = torch.randn(1, 2, 20, 32), torch.randn(1, 2, 20, 32)
    for a, b in zip(plain(q, k), scaled(q, k)):
        assert rel_err(a, b) <= TOL[torch.float32]


@pytest.mark.parametrize("scaling", SCALINGS)
def test_scalings_finite_and_norm_preserving_at_8x_max_seq_len(scaling):
    max_seq_len, factor, dim = 64, 8.0, 32
    rope = RotaryEmbedding(dim, max_seq_len=max_seq_len, scaling=scaling,
                           scaling_factor=1.0 if scaling is None else factor)
    q, k = torch.randn(2, 2, 16, dim), torch.randn(2, 1, 16, dim)
    q_rot, k_rot = rope(q, k, offset=8 * max_seq_len - 16)
    assert torch.isfinite(q_rot).all() and torch.isfinite(k_rot).all()
    assert rope.cos_cached.shape[0] >= 8 * max_seq_len
    # A rotation keeps each pair's length; YaRN multiplies it by its temperature factor.
    expected = q.norm(dim=-1) * rope.attention_scaling
    assert rel_err(q_rot.norm(dim=-1), expected) <= TOL[torch.float32]


def test_linear_scaling_maps_extended_positions_into_trained_range():
    max_seq_len, factor = 64, 8
    plain = RotaryEmbedding(16, max_seq_len=max_seq_len)
    linear = RotaryEmbedding(16, max_seq_len=max_seq_len, scaling="linear", scaling_factor=factor)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    for p in (0, 5, 63):
        for a, b in zip(linear(q, k, offset=p * factor), plain(q, k, offset=p)):
            assert rel_err(a, b) <= TOL[torch.float32]


def test_ntk_keeps_highest_frequency_and_divides_lowest_by_factor():
    dim, factor = 32, 8.0
    plain = RotaryEmbedding(dim).inv_freq.double()
    ntk = RotaryEmbedding(dim, scaling="ntk", scaling_factor=factor).inv_freq.double()
    assert ntk[0].item() == plain[0].item()
    assert abs(ntk[-1].item() * factor / plain[-1].item() - 1) <= 1e-6
    assert (ntk <= plain).all() and (ntk[1:] < ntk[:-1]).all()


def test_yarn_interpolates_only_long_wavelengths_and_sets_temperature():
    dim, factor, max_seq_len = 64, 8.0, 2048
    plain = RotaryEmbedding(dim, max_seq_len=max_seq_len).inv_freq.double()
    rope = RotaryEmbedding(dim, max_seq_len=max_seq_len, scaling="yarn", scaling_factor=factor)
    yarn = rope.inv_freq.double()
    turns = max_seq_len * plain / (2 * math.pi)
    fast, slow = turns > 32, turns < 1
    assert fast.any() and slow.any()
    assert rel_err(yarn[fast], plain[fast]) <= TOL[torch.float32]
    assert rel_err(yarn[slow], plain[slow] / factor) <= TOL[torch.float32]
    assert (yarn <= plain * (1 + 1e-6)).all() and (yarn >= plain / factor * (1 - 1e-6)).all()
    assert rope.attention_scaling == pytest.approx(0.1 * math.log(factor) + 1)
    # At 8x the context, every interpolated frequency turns no further than the unscaled one did at 1x.
    assert (yarn[slow] * 8 * max_seq_len <= plain[slow] * max_seq_len * (1 + 1e-6)).all()
    cos, sin = rope.tables(8 * max_seq_len, torch.device("cpu"))
    assert torch.allclose(cos ** 2 + sin ** 2, torch.full_like(cos, rope.attention_scaling ** 2), rtol=1e-5)


def test_cache_grows_and_matches_a_larger_table():
    small = RotaryEmbedding(16, max_seq_len=8)
    large = RotaryEmbedding(16, max_seq_len=512)
    q, k = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16)
    for a, b in zip(small(q, k, offset=300), large(q, k, offset=300)):
        assert rel_err(a, b) <= TOL[torch.float32]
    assert small.cos_cached.shape[0] >= 304


def test_cache_grown_under_inference_mode_serves_autograd():
    rope = RotaryEmbedding(8, max_seq_len=4)
    q = torch.randn(1, 1, 3, 8, requires_grad=True)
    with torch.inference_mode():
        rope(q.detach(), q.detach(), offset=20)  # grows the cache while decoding
    q_rot, _ = rope(q, q.detach(), offset=20)
    q_rot.square().sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_cache_stays_float32_after_module_dtype_cast():
    rope = RotaryEmbedding(16, max_seq_len=32)
    q, k = torch.randn(2, 2, 5, 16, dtype=torch.bfloat16), torch.randn(2, 2, 5, 16, dtype=torch.bfloat16)
    expected = rope(q, k, offset=7)
    rope = rope.to(torch.bfloat16)
    got = rope(q, k, offset=7)
    assert rope.cos_cached.dtype == torch.float32
    for a, b in zip(got, expected):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b)


@pytest.mark.parametrize("kwargs, error, words", [
    ({"dim": 7}, ValueError, "dim"),
    ({"dim": 0}, ValueError, "dim"),
    ({"dim": 8, "base": 1}, ValueError, "base"),
    ({"dim": 8, "max_seq_len": 0}, ValueError, "max_seq_len"),
    ({"dim": 8, "scaling": "dynamic"}, ValueError, "scaling"),
    ({"dim": 8, "scaling_factor": 2.0}, ValueError, "scaling_factor"),
    ({"dim": 8, "scaling": "linear", "scaling_factor": 0.5}, ValueError, "scaling_factor"),
    ({"dim": 8, "scaling": "yarn", "scaling_factor": float("inf")}, ValueError, "scaling_factor"),
    ({"dim": 2, "scaling": "ntk", "scaling_factor": 2.0}, ValueError, "dim"),
])
def test_bad_constructor_arguments_raise(kwargs, error, words):
    with pytest.raises(error, match=words):
        RotaryEmbedding(**kwargs)


def test_bad_forward_arguments_raise():
    rope = RotaryEmbedding(8)
    q, k = torch.randn(2, 2, 5, 8), torch.randn(2, 1, 5, 8)
    with pytest.raises(ValueError, match=r"q must be \(batch, heads, seqlen, head_dim\).*got shape \(2, 5, 8\)"):
        rope(q[0], k)
    with pytest.raises(ValueError, match="head_dim >= dim=8"):
        rope(q[..., :6], k[..., :6])
    with pytest.raises(ValueError, match="q and k must share"):
        rope(q, k[:, :, :4])
    with pytest.raises(TypeError, match="k must be a floating-point"):
        rope(q, k.long())
    with pytest.raises(ValueError, match="offset must be >= 0"):
        rope(q, k, offset=-1)
    with pytest.raises(ValueError, match=r"offset must be \(batch,\) = \(2,\)"):
        rope(q, k, offset=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="offset must be an integer tensor"):
        rope(q, k, offset=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="positions must be >= 0"):
        rope(q, k, offset=torch.tensor([-3, 0]))
    with pytest.raises(ValueError, match=r"position_ids must be \(batch, seqlen\)"):
        rope(q, k, position_ids=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="position_ids must be an integer tensor"):
        rope(q, k, position_ids=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="either offset or position_ids"):
        rope(q, k, offset=2, position_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="offset must be an int"):
        rope(q, k, offset=1.5)
