"""Smoke tests of examples/train_lm.py: a tiny model, a few steps, run in-process through main(argv)."""

import importlib.util
import json
import math
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mamba_r1 import create_mamba_moe

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_lm.py"
_spec = importlib.util.spec_from_file_location("examples_train_lm", SCRIPT)
train_lm = importlib.util.module_from_spec(_spec)
# dataclasses look their defining module up in sys.modules while the script is being executed.
sys.modules[_spec.name] = train_lm
_spec.loader.exec_module(train_lm)

# A small corner of the standard library (29 files, ~380 KB): the real corpus code path, loaded in milliseconds.
DATA = Path(sysconfig.get_paths()["stdlib"]) / "email"
TINY = ["--data-root", str(DATA), "--holdout-every", "5", "--dim", "32", "--depth", "2", "--d-state", "4",
        "--num-experts", "4", "--expert-dim", "64", "--batch-size", "4", "--seqlen", "32", "--eval-batches", "2",
        "--lr", "1e-2", "--warmup", "3", "--sample-tokens", "8", "--no-progress", "--device", "cpu", "--seed", "0"]


def test_compare_lowers_heldout_bpb_and_writes_json(tmp_path):
    out = tmp_path / "compare.json"
    results = train_lm.main(TINY + ["--compare", "--steps", "30", "--eval-every", "10", "--log-every", "10",
                                    "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    for ffn in ("moe", "dense"):
        run = results["runs"][ffn]
        evals, train = run["history"]["eval"], run["history"]["train"]
        assert [e["step"] for e in evals] == [0, 10, 20, 30]
        # A random byte model sits near 8 bits; 30 steps learn at least the byte frequencies of Python source.
        assert evals[0]["bpb"] > 7.0
        assert evals[-1]["bpb"] < evals[0]["bpb"] - 2.0
        assert train[-1]["lm_loss"] < train[0]["lm_loss"]
        assert run["finished"] and run["sample"].startswith("def ")
    # Same active parameters: the dense MLP is as wide as one expert, the MoE model adds only its routers.
    router_params = 2 * 4 * 32  # depth * num_experts * dim
    assert results["runs"]["moe"]["active_parameters"] - results["runs"]["dense"]["active_parameters"] == \
        router_params
    share = torch.tensor(results["runs"]["moe"]["history"]["train"][-1]["expert_share"])  # (moe_layers, experts)
    assert share.shape == (2, 4) and torch.allclose(share.sum(-1), torch.ones(2), atol=1e-3)
    if importlib.util.find_spec("matplotlib") is not None:  # optional: the example plots only when installed
        assert Path(results["plot"]) == out.with_suffix(".png") and out.with_suffix(".png").stat().st_size > 0
    else:
        assert "plot" not in results
    comparison = results["comparison"]
    assert comparison["dense_final_bpb"] == results["runs"]["dense"]["history"]["eval"][-1]["bpb"]


def test_resume_continues_exactly(tmp_path):
    def run(directory, *extra):
        return train_lm.main(TINY + ["--steps", "6", "--eval-every", "3", "--log-every", "3", "--checkpoint-every",
                                     "3", "--checkpoint-dir", str(directory), "--out",
                                     str(tmp_path / f"{directory.name}.json"), "--no-plot", *extra])

    whole = run(tmp_path / "whole")["runs"]["moe"]
    first = run(tmp_path / "split", "--stop-at", "3")["runs"]["moe"]
    assert not first["finished"] and first["steps_done"] == 3
    second = run(tmp_path / "split", "--resume")["runs"]["moe"]
    assert second["finished"] and second["steps_done"] == 6

    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert second["history"]["eval"] == whole["history"]["eval"]
    assert [r["lm_loss"] for r in second["history"]["train"]] == [r["lm_loss"] for r in whole["history"]["train"]]
    assert second["sample"] == whole["sample"]

    with pytest.raises(SystemExit):  # a checkpoint is never overwritten silently
        run(tmp_path / "split")
    with pytest.raises(SystemExit):  # other settings would not continue the same run
        run(tmp_path / "split", "--resume", "--lr", "5e-3")
    with pytest.raises(SystemExit):
        run(tmp_path / "empty", "--resume")


def test_no_weight_decay_on_biases_norms_and_marked_parameters():
    model = create_mamba_moe(dim=16, depth=1, d_state=4, num_experts=2, expert_dim=8, vocab_size=256, device="cpu")
    decay, exempt = train_lm.parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempted = {names[id(p)] for p in exempt["params"]}
    assert exempt["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    for name in ("layers.0.mixer.A_log", "layers.0.mixer.D", "layers.0.mixer_norm.weight", "norm_f.weight",
                 "layers.0.mixer.dt_proj.bias", "layers.0.ffn.experts.b1", "layers.0.ffn.experts.b2"):
        assert name in exempted
    for name in ("embedding.weight", "layers.0.mixer.in_proj.weight", "layers.0.ffn.router.weight",
                 "layers.0.ffn.experts.w1", "layers.0.ffn.experts.w2"):
        assert name in decayed
    assert decayed | exempted == set(names.values()) and not decayed & exempted


def test_learning_rate_warms_up_then_decays_to_floor():
    _, args = train_lm.parse_args(["--steps", "100", "--warmup", "10", "--lr", "1e-3", "--min-lr-ratio", "0.1"])
    lrs = [train_lm.learning_rate(step, args) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert train_lm.learning_rate(100, args) == pytest.approx(1e-4)


def test_steps_to_reach_interpolates_between_evaluations():
    curve = [{"step": 0, "bpb": 8.0}, {"step": 10, "bpb": 6.0}, {"step": 20, "bpb": 4.0}]
    assert train_lm.steps_to_reach(curve, 5.0) == pytest.approx(15.0)
    assert train_lm.steps_to_reach(curve, 6.0) == pytest.approx(10.0)
    assert train_lm.steps_to_reach(curve, 3.9) is None
