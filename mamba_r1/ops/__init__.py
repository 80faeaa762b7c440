"""Functional kernels: pure functions on tensors, each fast path beside its plain-PyTorch reference."""

from mamba_r1.ops.causal_conv1d import causal_conv1d, causal_conv1d_ref, causal_conv1d_update, causal_conv1d_update_ref
from mamba_r1.ops.decode_linear import small_batch_linear
from mamba_r1.ops.rms_norm import add_rms_norm, add_rms_norm_ref
from mamba_r1.ops.selective_scan import selective_scan, selective_scan_ref
from mamba_r1.ops.state_update import selective_state_update, selective_state_update_ref

__all__ = ["add_rms_norm", "add_rms_norm_ref", "causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update",
           "causal_conv1d_update_ref", "selective_scan", "selective_scan_ref", "selective_state_update",
           "selective_state_update_ref", "small_batch_linear"]
