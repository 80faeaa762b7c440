#!/usr/bin/env bash
# One device call: correctness on CUDA first, then every benchmark; logs, JSON and plots end up in one tarball,
# $OUT/gpu_results.tgz ($OUT: the device tool's output folder). Usage (repo root; the lent image had no loguru in
# 2026-11, so carry its wheel in .whl/, see the device tool's README):
#   bash benchmarks/run_gpu.sh [STAGE ...]   stages: tests quicktests scan block moe memory decode profile
#   profile_scan profile_moe profile_moe_compiled moe_breakdown moecompile ncu_moe moegemm fusedgemm tmagemm tunemoe moe_capture profile_decode moetests scantests decodelinear conv convsweep ncu tune (default: tests scan block moe memory decode profile)
# The device's copy of the tree has no .git: `git checkout` there does nothing, so a stage cannot fall back to
# committed files; run it on a tree where every imported file is present.
set -uo pipefail
# Logs land in a scratch folder, then one tarball in $OUT (the device tool returns at most 8 files).
FINAL=${OUT:-/tmp/mamba_r1_gpu}
OUT=/tmp/mamba_r1_gpu_logs
mkdir -p "$OUT" "$FINAL"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
what=${*:-tests scan block moe memory decode profile}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
for w in $what; do
  case $w in
    # The decode and conv kernels' tests first: the scan's hypothesis tests compile many specialisations (a
    # 140 s limit on an H200 ended them after 15 tests), and a command cut off at its limit should have checked the rest.
    tests)  python3 -m pytest -q -p no:cacheprovider tests/ops/test_causal_conv1d.py tests/ops/test_state_update.py \
              tests/modules/test_mamba.py tests/test_generation.py tests/ops/test_selective_scan_triton.py \
              tests/ops/test_selective_scan.py tests/modules/test_moe.py 2>&1 | tail -15 | tee "$OUT/tests.log" ;;
    # The decode and conv kernels plus the block and generation tests only (about a minute on an H200).
    quicktests) timeout 150 python3 -m pytest -q -p no:cacheprovider tests/ops/test_causal_conv1d.py \
              tests/ops/test_state_update.py tests/modules/test_mamba.py tests/test_generation.py \
              tests/ops/test_decode_linear.py tests/ops/test_rms_norm.py tests/modules/test_norm.py \
              --tb=short -p no:logging 2>&1 | tail -80 \
              | tee "$OUT/quicktests.log" ;;
    # The scan kernels against the float64 reference (hypothesis compiles many specialisations: minutes cold).
    scantests) timeout 300 python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short \
              tests/ops/test_selective_scan_triton.py 2>&1 | tail -40 | tee "$OUT/scantests.log" ;;
    # The MoE kernels (routing + plan + losses, combine, bias + activation, grouped GEMM) and the layer.
    moetests) timeout 420 python3 -m pytest -q -p no:cacheprovider -p no:logging --tb=short tests/ops/test_moe_routing.py \
              tests/ops/test_moe_combine.py tests/ops/test_moe_expert_ffn.py tests/ops/test_moe_layer_kernels.py \
              tests/modules/test_moe.py tests/ops/test_moe_dispatch.py tests/ops/test_moe_grouped_gemm.py 2>&1 | tail -60 | tee "$OUT/moetests.log" ;;
    scan)   python3 benchmarks/bench_scan.py --device cuda --preset targets --out "$OUT/scan_cuda.json" 2>&1 | tee "$OUT/scan.log" ;;
    block)  python3 benchmarks/bench_block.py --device cuda 2>&1 | tee "$OUT/block.log" ;;
    moe)    python3 benchmarks/bench_moe.py --device cuda 2>&1 | tee "$OUT/moe.log" ;;
    # The same plus torch.compile'd rows (the dense FFN and the layer, fullgraph): minutes of compiling.
    moecompile) python3 benchmarks/bench_moe.py --device cuda --compile --no-graphs \
              --out "$OUT/moe_compile.json" 2>&1 | tee "$OUT/moe_compile.log" ;;
    memory) python3 benchmarks/bench_memory.py --device cuda 2>&1 | tee "$OUT/memory.log" ;;
    decode) python3 benchmarks/bench_decode.py --device cuda 2>&1 | tee "$OUT/decode.log" ;;
    profile) python3 benchmarks/profile_gpu.py block 2>&1 | tee "$OUT/profile_block.log" ;;
    profile_scan) python3 benchmarks/profile_gpu.py scan --rows 20 2>&1 | tee "$OUT/profile_scan.log" ;;
    profile_moe) python3 benchmarks/profile_gpu.py moe --rows 40 2>&1 | tee "$OUT/profile_moe.log" ;;
    profile_moe_compiled) python3 benchmarks/profile_gpu.py moe --compile --rows 45 2>&1 | tee "$OUT/profile_moe_compiled.log" ;;
    moe_breakdown) python3 benchmarks/moe_breakdown.py 2>&1 | tee "$OUT/moe_breakdown.log" ;;
    # The layer's six matmuls, dense vs torch._grouped_mm in both expert-weight layouts.
    # Tile sweeps of the MoE elementwise kernels (bias + GELU, combine, x's gradient) at the layer's shapes.
    tunemoe) python3 benchmarks/tune_moe_kernels.py 2>&1 | tee "$OUT/tune_moe.log" ;;
    moegemm) python3 benchmarks/bench_moe_gemm.py 2>&1 | tee "$OUT/moe_gemm.log" ;;
    # Experiment: the expert FFN's grouped GEMMs with bias + GELU (forward) and GELU' + bias partials (dX) fused in
    # Triton epilogues, against grouped_mm + the separate kernels (not used by the library yet).
    fusedgemm) python3 benchmarks/try_fused_expert_gemm.py 2>&1 | tee "$OUT/fused_gemm.log" ;;
    # The same with TMA operand loads, one tile per program or persistent.
    tmagemm) python3 benchmarks/try_tma_expert_gemm.py 2>&1 | tee "$OUT/tma_gemm.log" ;;
    tmagemms) python3 benchmarks/try_tma_expert_gemm.py --gemms 2>&1 | tee "$OUT/tma_gemms.log" ;;
    # Whole-step CUDA-graph captures of SwitchMoE, repeated per backend and capture mode (failures print tracebacks).
    moe_capture) for mode in global thread_local; do python3 benchmarks/debug_moe_capture.py --repeat 3 --mode $mode; \
              done 2>&1 | tee "$OUT/moe_capture.log" ;;
    profile_decode) for b in 1 64; do python3 benchmarks/profile_gpu.py decode --batch $b --rows 30; done 2>&1 \
              | tee "$OUT/profile_decode.log" ;;
    decodelinear) python3 benchmarks/bench_decode_linear.py --sweep 2>&1 | tee "$OUT/decode_linear.log" ;;
    convsweep) python3 benchmarks/bench_conv.py --sweep 2>&1 | tee "$OUT/conv_sweep.log" ;;
    conv)   python3 benchmarks/bench_conv.py 2>&1 | tee "$OUT/conv.log" ;;
    # Hardware counters of the scan kernels (works on the Firecracker machines; clocks left alone).
    ncu)    ncu --clock-control none --kernel-name regex:selective_scan --launch-skip 2 --launch-count 2 \
              --section SpeedOfLight --section Occupancy --section WarpStateStats --section SchedulerStats \
              --section LaunchStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
              python3 benchmarks/ncu_scan.py > "$OUT/ncu_scan.log" 2>&1; tail -5 "$OUT/ncu_scan.log" ;;
    # Hardware counters of SwitchMoE's elementwise kernels (bias + activation, combine, x's gradient), one of each.
    ncu_moe) ncu --clock-control none --kernel-name regex:"bias_act|combine|token_grad" --launch-skip 10 \
              --launch-count 5 --section SpeedOfLight --section MemoryWorkloadAnalysis \
              --section ComputeWorkloadAnalysis --section WarpStateStats \
              python3 benchmarks/ncu_moe.py > "$OUT/ncu_moe.log" 2>&1; tail -5 "$OUT/ncu_moe.log" ;;
    tune)   python3 benchmarks/tune_scan.py --budget-s "${TUNE_BUDGET_S:-240}" --which "${TUNE_WHICH:-fwd,bwd}" --rounds "${TUNE_ROUNDS:-1}" --out "$OUT/tune_scan.json" 2>&1 | tee "$OUT/tune.log" ;;
  esac
  # The tarball after every stage: a call cut off at the device's limit still returns what finished.
  cp benchmarks/results/*.json benchmarks/results/*.png "$OUT"/ 2>/dev/null || true
  tar -czf "$FINAL/gpu_results.tgz" -C "$OUT" .
done
echo "results: $FINAL/gpu_results.tgz"
