"""small_batch_linear: the Triton kernel against F.linear / float64 on odd shapes and layouts; where it steps aside."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mamba_r1.ops.decode_linear as decode_linear
from mamba_r1.ops.decode_linear import MAX_TRITON_ROWS, small_batch_linear
from tests.conftest import DEVICE, TOL, rel_err


@pytest.fixture(autouse=True)
def _on_test_device():
    with torch.device(DEVICE):
        yield


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(deadline=None, max_examples=12)
@given(rows=st.integers(1, MAX_TRITON_ROWS), k=st.sampled_from([1, 7, 16, 33, 100]),
       n=st.sampled_from([1, 5, 16, 17, 80]), with_bias=st.booleans(), strided=st.booleans())
def test_triton_matches_float64_linear(dtype, rows, k, n, with_bias, strided):
    base = torch.randn(rows, 2 * k + 3, dtype=dtype)
    x = base[:, 3:3 + 2 * k:2] if strided else base[:, :k]  # a strided view (as a split of a projection's output)
    weight = (torch.randn(n, k) / k ** 0.5).to(dtype)
    bias = torch.randn(n, dtype=dtype) if with_bias else None
    got = small_batch_linear(x, weight, bias, backend="triton")
    want = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert got.dtype == dtype and got.shape == (rows, n)
    assert rel_err(got, want) <= TOL[dtype]


def test_one_output_feature_reads_its_own_weight_row():
    """Output j is x . weight[j]: a weight with one nonzero row lights up exactly that column (pins the n offsets)."""
    x = torch.randn(3, 40)
    for j in (0, 15, 16, 36):
        weight = torch.zeros(37, 40)
        weight[j] = torch.randn(40)
        got = small_batch_linear(x, weight, backend="triton")
        assert torch.count_nonzero(got[:, [c for c in range(37) if c != j]]) == 0
        assert rel_err(got[:, j], x @ weight[j]) <= TOL[torch.float32]


def _forbid_kernel(monkeypatch):
    def boom(*args):
        raise AssertionError("the Triton kernel ran")

    monkeypatch.setattr(decode_linear, "_small_batch_linear_triton", boom)


@pytest.mark.parametrize("case", ["many rows", "autograd", "autocast", "torch backend"])
def test_falls_back_to_f_linear(monkeypatch, case):
    rows = MAX_TRITON_ROWS + 1 if case == "many rows" else 2
    x, weight = torch.randn(rows, 8), torch.randn(5, 8, requires_grad=case == "autograd")
    _forbid_kernel(monkeypatch)
    backend = "torch" if case == "torch backend" else "triton"
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=case == "autocast"):
        got = small_batch_linear(x, weight, backend=backend)
        want = F.linear(x, weight)
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_bad_arguments_name_what_was_expected():
    with pytest.raises(ValueError, match=r"x must be a 2-D tensor \(rows, in_features\)"):
        small_batch_linear(torch.randn(2, 3, 4), torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"weight must be \(out_features, in_features=4\); got \(5, 3\)"):
        small_batch_linear(torch.randn(2, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"bias must be \(out_features,\) = \(5,\); got \(4,\)"):
        small_batch_linear(torch.randn(2, 4), torch.randn(5, 4), torch.randn(4))
    with pytest.raises(ValueError, match="backend must be one of"):
        small_batch_linear(torch.randn(2, 4), torch.randn(5, 4), backend="cuda")


def test_auto_takes_the_kernels_only_inside_graph_kernels():
    """"auto" runs the Triton kernels of the launch-bound ops on CUDA inside graph_kernels() only (a CUDA-graph
    decode step's warm-up and capture); eagerly their launches cost more than they save."""
    from mamba_r1.ops.triton_runtime import graph_kernels, resolve_graph_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_graph_backend("op", "auto", cuda) == "torch"
    with graph_kernels():
        assert resolve_graph_backend("op", "auto", cuda) == "triton"
        assert resolve_graph_backend("op", "auto", cpu) == "torch"
        assert resolve_graph_backend("op", "torch", cuda) == "torch"
        with graph_kernels():
            pass
        assert resolve_graph_backend("op", "auto", cuda) == "triton"  # nested blocks restore, not reset
    assert resolve_graph_backend("op", "auto", cuda) == "torch"
    assert resolve_graph_backend("op", "triton", cpu) == "triton"  # asked for explicitly: always the kernel
