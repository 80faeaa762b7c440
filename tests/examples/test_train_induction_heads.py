"""Smoke tests of examples/train_induction_heads.py: the task's data, the options, and a tiny run through main(argv)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "train_induction_heads.py"
_spec = importlib.util.spec_from_file_location("examples_train_induction_heads", SCRIPT)
induction = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = induction
_spec.loader.exec_module(induction)

# Small enough to train both models in a few seconds on one core: length 8, width 32.
TINY = ["--train-len", "8", "--dim", "32", "--d-state", "8", "--num-heads", "2", "--batch", "32", "--lr", "1e-2",
        "--attn-lr", "5e-3", "--warmup", "5", "--eval-samples", "32", "--threads", "1", "--device", "cpu",
        "--seed", "0", "--no-plot", "--no-progress"]


@settings(deadline=None, max_examples=30)
@given(batch=st.integers(1, 6), seqlen=st.integers(3, 70), vocab=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
def test_copy_token_twice_and_the_target_follows_the_first(batch, seqlen, vocab, seed):
    tokens, targets = induction.make_batch(batch, seqlen, vocab, torch.Generator().manual_seed(seed))
    assert tokens.shape == (batch, seqlen) and targets.shape == (batch,)
    copy = vocab
    assert ((tokens >= 0) & (tokens <= copy)).all()
    assert ((targets >= 0) & (targets < copy)).all()  # the answer is always a data token
    for row in range(batch):
        positions = (tokens[row] == copy).nonzero().flatten().tolist()
        assert len(positions) == 2 and positions[1] == seqlen - 1  # once inside, once as the final query
        assert positions[0] <= seqlen - 3
        assert tokens[row, positions[0] + 1] == targets[row]


def test_first_copy_position_and_target_vary_between_examples():
    tokens, targets = induction.make_batch(512, 64, 16, torch.Generator().manual_seed(0))
    first = (tokens[:, :-1] == 16).float().argmax(dim=1)
    assert first.min() == 0 and first.max() == 61  # the whole range [0, seqlen - 3] is drawn
    assert targets.unique().numel() == 16


def test_paper_flag_sets_the_paper_setting_but_explicit_options_win():
    args = induction.parse_args(["--paper", "--steps", "7"])
    assert (args.train_len, args.batch, args.lr, args.attn_lr, args.attn_dim, args.attn_ffn) == (
        256, 8, 1e-3, 2e-4, 128, "none")
    assert args.test_lens == [2**k for k in range(6, 21)] and args.attn_max_len == 2**14
    assert args.steps == 7 and args.attn_steps == 50 * 8192 and not args.early_stop


def test_paper_numbers_are_read_at_the_same_multiple_of_the_training_length():
    assert induction.paper_at_ratio("MHA-RoPE", 2) == 83.6  # 512 in the paper
    assert induction.paper_at_ratio("MHA-RoPE", 2**7) is None  # 2^15: out of memory in the paper
    assert induction.paper_at_ratio("Mamba", 2**12) == 100.0  # 2^20
    assert induction.paper_at_ratio("Mamba", 3) is None  # 768 was not tested


@pytest.mark.parametrize("argv, words", [
    (["--train-len", "2"], "--train-len"),
    (["--test-lens", "64", "1"], "--test-lens"),
    (["--steps", "0"], "--steps"),
    (["--attn-dim", "20", "--num-heads", "4"], "--attn-dim"),
    (["--stop-acc", "1.5"], "--stop-acc"),
])
def test_bad_options_exit_naming_the_option(argv, words, capsys):
    with pytest.raises(SystemExit):
        induction.parse_args(argv)
    assert words in capsys.readouterr().err


def test_both_models_learn_and_the_json_is_written(tmp_path):
    out = tmp_path / "induction.json"
    report = induction.main(TINY + ["--steps", "90", "--log-every", "30", "--no-early-stop", "--test-lens", "8",
                                    "16", "--attn-max-len", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    results = report["results"]
    assert set(results) == {"mamba", "attention"}
    for kind, res in results.items():
        assert [point["step"] for point in res["curve"]] == [30, 60, 90], kind
        # Untrained logits spread over 17 tokens (loss ~ ln 17 = 2.83, chance accuracy 1/16); a fixed seed's 90
        # steps get clearly below that.
        assert res["curve"][0]["loss"] > 2.5, kind
        assert res["curve"][-1]["loss"] < res["curve"][0]["loss"] - 0.1, kind
        assert all(0.0 <= r["accuracy"] <= 1.0 and r["samples"] == 32 for r in res["test"].values()), kind
        assert all(0.0 <= point["val_accuracy"] <= 1.0 for point in res["curve"]), kind
    assert set(results["mamba"]["test"]) == {"8", "16"}
    assert set(results["attention"]["test"]) == {"8"}  # 16 is past --attn-max-len
    assert "| mamba (ours, trained at 8) |" in report["markdown_table"]


def test_early_stop_ends_training_after_two_checks_at_the_target(tmp_path):
    # --stop-acc 0: every check reaches it, so training must end at the second check, long before --steps.
    report = induction.main(TINY + ["--models", "mamba", "--steps", "1000", "--log-every", "3", "--stop-acc", "0",
                                    "--test-lens", "8", "--out", str(tmp_path / "stop.json")])
    res = report["results"]["mamba"]
    assert res["steps"] == 6 and res["max_steps"] == 1000
    assert [point["step"] for point in res["curve"]] == [3, 6]
