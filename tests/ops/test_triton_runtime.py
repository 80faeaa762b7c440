"""The launch-grid helpers of triton_runtime against triton's own functions."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mamba_r1.ops.triton_runtime import cdiv, next_power_of_2, triton

pytestmark = pytest.mark.skipif(triton is None, reason="triton is not installed")


@settings(deadline=None, max_examples=200)
@given(a=st.integers(0, 2**40), b=st.integers(1, 2**20))
def test_cdiv_matches_triton(a, b):
    assert cdiv(a, b) == triton.cdiv(a, b)


@settings(deadline=None, max_examples=200)
@given(n=st.one_of(st.integers(0, 70), st.integers(0, 2**40)))
def test_next_power_of_2_matches_triton(n):
    assert next_power_of_2(n) == triton.next_power_of_2(n)
