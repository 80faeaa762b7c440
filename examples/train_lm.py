"""Train a byte-level MoE-Mamba (or Mamba) language model on the Python standard library's own sources.

Every machine with Python already holds this data set: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``
(third-party ``site-packages`` left out), read as raw bytes (vocab 256) in sorted path order. Every 20th file is
held out; the held-out bits per byte (bpb) is the figure to watch (8 bits for a model that knows nothing). The
standard library differs between Python versions, so compare figures measured on the same one (the JSON records it).

    python examples/train_lm.py                                    # MoE-Mamba, CPU defaults: a few minutes
    python examples/train_lm.py --ffn dense                        # Mamba + dense MLP, same active parameters
    python examples/train_lm.py --compare --threads 1              # both on the same batches: bpb table (+ PNG)
    python examples/train_lm.py --checkpoint-dir runs/lm           # save every --checkpoint-every steps
    python examples/train_lm.py --checkpoint-dir runs/lm --resume  # the same command + --resume continues exactly
    python examples/generate.py --checkpoint runs/lm               # sample from what was trained

MoE-Mamba (Pióro et al., 2024) follows every Mamba mixer with a Switch MoE feed-forward layer. ``--ffn dense`` builds
the same stack with a dense MLP of hidden size expert_dim * top_k instead, so both models spend the same FLOPs per
token and differ only in the num_experts times more FFN parameters the MoE model routes between. The paper reports
MoE-Mamba reaching Mamba's loss in 2.35x fewer steps at 100M scale, with at least 4 experts needed to win.

Training: AdamW (no weight decay on biases, norms or parameters marked ``_no_weight_decay`` such as MambaBlock's
A_log and D), linear warmup then cosine decay, gradient clipping, bf16 autocast on GPU. Router statistics (tokens
per expert, dropped fraction, load-balancing and z losses) are logged as training goes. Results go to a JSON file
(``--out``); a PNG of the curves beside it when matplotlib is installed, a progress bar when tqdm is
(``pip install 'mamba-r1[examples]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from mamba_r1 import MambaMoE, create_mamba_moe

try:
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None

BYTE_VOCAB = 256
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TRAINER_STATE = "trainer_state.pt"
# Leaf names of bias parameters: nn.Linear / conv biases, and SwitchMoE's stacked expert biases, which are 2-D
# (num_experts, width) and so would otherwise pass for weight matrices.
BIAS_NAMES = ("bias", "b1", "b2")
# A train batch is a pure function of (seed, step), which is what lets --resume continue exactly.
BATCH_SEED_STRIDE = 1 << 32
# Arguments that decide the weights a run ends with: a resumed run must use the same ones. Device, thread count,
# scan backend, logging and checkpoint cadence only change speed or bookkeeping.
RUN_SETTINGS = ("data_root", "holdout_every", "ffn", "dim", "depth", "d_state", "d_conv", "expand", "num_experts",
                "expert_dim", "top_k", "capacity_factor", "steps", "batch_size", "seqlen", "lr", "min_lr_ratio",
                "warmup", "weight_decay", "beta2", "grad_clip", "seed")


# ---------------------------------------------------------------------------------------------------- data


@dataclass
class Corpus:
    train: torch.Tensor  # (train_bytes,) uint8
    heldout: torch.Tensor  # (heldout_bytes,) uint8
    train_files: int
    heldout_files: int
    root: str


def source_files(root: Path) -> list[Path]:
    """Every ``.py`` file under root in a machine-independent order, third-party packages left out."""
    third_party = {"site-packages", "dist-packages"}
    files = [f for f in root.rglob("*.py") if f.is_file() and not third_party & set(f.relative_to(root).parts)]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def load_corpus(root: Path, holdout_every: int) -> Corpus:
    """Concatenate the sources' bytes; file i is held out when (i + 1) % holdout_every == 0 (every n-th file), so
    no held-out byte shares a file with a training byte."""
    files = source_files(root)
    train, heldout = [], []
    for i, f in enumerate(files):
        (heldout if (i + 1) % holdout_every == 0 else train).append(f.read_bytes())

    def as_tensor(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8) if chunks else torch.empty(
            0, dtype=torch.uint8)

    return Corpus(as_tensor(train), as_tensor(heldout), len(train), len(heldout), str(root))


def train_batch(data: torch.Tensor, step: int, batch_size: int, seqlen: int, seed: int) -> torch.Tensor:
    """Random windows for one step: (batch, seqlen) int64, the same for the same (seed, step) on every run."""
    generator = torch.Generator().manual_seed(seed * BATCH_SEED_STRIDE + step)
    starts = torch.randint(0, data.numel() - seqlen + 1, (batch_size,), generator=generator)
    return data.unfold(0, seqlen, 1)[starts].long()


def heldout_windows(data: torch.Tensor, count: int, seqlen: int) -> torch.Tensor:
    """``count`` evenly spaced windows of the held-out bytes: (count, seqlen) int64, a fixed evaluation set."""
    starts = torch.linspace(0, data.numel() - seqlen, count).long()
    return data.unfold(0, seqlen, 1)[starts].long()


# ---------------------------------------------------------------------------------------------------- model, optimizer


def build_model(args: argparse.Namespace, ffn: str, device: torch.device) -> MambaMoE:
    torch.manual_seed(args.seed)
    return create_mamba_moe(
        dim=args.dim, depth=args.depth, d_state=args.d_state, d_conv=args.d_conv, expand=args.expand,
        num_experts=args.num_experts, expert_dim=args.expert_dim, vocab_size=BYTE_VOCAB,
        ffn=ffn, top_k=args.top_k, capacity_factor=args.capacity_factor,
        # The dense baseline's hidden size matches the MoE layer's active width: the same FLOPs per token.
        mlp_dim=args.expert_dim * args.top_k, scan_backend=args.scan_backend, device=device,
    )


def parameter_groups(model: MambaMoE, weight_decay: float) -> list[dict]:
    """Decay weight matrices only: pulling norms, biases, A_log (the SSM's decay rates) or D toward zero changes what
    the layer computes rather than regularising it."""
    decay, exempt = [], []
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        skip = getattr(p, "_no_weight_decay", False) or p.ndim < 2 or leaf in BIAS_NAMES
        (exempt if skip else decay).append(p)
    logger.debug("weight decay on {} tensors, none on {}", len(decay), len(exempt))
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def autocast(device: torch.device):
    # bf16 on GPU only: CPU bf16 matmuls are slower than float32 on most machines.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: MambaMoE, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Held-out bits per byte: mean next-byte cross-entropy over ``windows (count, seqlen)``, in bits."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for chunk in windows.split(batch_size):
        with autocast(device):
            out = model.loss(chunk.to(device))
        total += out.lm_loss.double() * chunk.shape[0]
    model.train(was_training)
    return total.item() / windows.shape[0] / math.log(2)


# ---------------------------------------------------------------------------------------------------- checkpoints


def run_settings(args: argparse.Namespace, ffn: str) -> dict:
    settings = {name: getattr(args, name) for name in RUN_SETTINGS}
    settings["ffn"] = ffn
    settings["data_root"] = str(args.data_root)
    return settings


def save_checkpoint(directory: Path, model: MambaMoE, optimizer: torch.optim.Optimizer, step: int, history: dict,
                    settings: dict) -> None:
    """Weights via save_pretrained (loadable by MambaMoE.from_pretrained alone), then the optimizer, step and
    history in a side file, replaced atomically so a crash mid-write never leaves a truncated one. (A crash between
    the two writes leaves weights one checkpoint ahead of the side file: resuming then repeats those steps' batches
    on those weights, a small detour rather than a broken run.)"""
    model.save_pretrained(directory)
    tmp = directory / (TRAINER_STATE + ".tmp")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "history": history, "settings": settings}, tmp)
    os.replace(tmp, directory / TRAINER_STATE)
    logger.info("checkpoint: step {} -> {}", step, directory)


def load_checkpoint(directory: Path, device: torch.device, settings: dict) -> tuple[MambaMoE, dict]:
    """The model and trainer state saved in ``directory``; ValueError when the run settings differ from the saved."""
    state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    changed = [f"--{k.replace('_', '-')}: checkpoint {state['settings'].get(k)!r}, now {v!r}"
               for k, v in settings.items() if state["settings"].get(k) != v]
    if changed:
        raise ValueError(f"{directory} was trained with other settings, so resuming would not continue that run: "
                         + "; ".join(changed))
    model = MambaMoE.from_pretrained(directory, device=device)
    logger.info("resumed {} at step {}", directory, state["step"])
    return model, state


# ---------------------------------------------------------------------------------------------------- training


class Meter:
    """Sums of one logging interval, kept as tensors so the GPU is synchronised once per interval, not per step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.steps, self.tokens, self.seconds = 0, 0, 0.0
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value

    def update(self, out, grad_norm: torch.Tensor, tokens: int, seconds: float) -> None:
        self.steps += 1
        self.tokens += tokens
        self.seconds += seconds
        self.add("lm_loss", out.lm_loss)
        self.add("grad_norm", grad_norm)
        if out.aux is not None:
            moe_layers = out.aux.tokens_per_expert.shape[0]
            self.add("aux_loss", out.aux.loss)
            # Summed over layers by the model; per layer reads better (1.0 = a perfectly balanced router).
            self.add("load_balance", out.aux.load_balance_loss / moe_layers)
            self.add("z_loss", out.aux.z_loss / moe_layers)
            self.add("dropped", out.aux.dropped_fraction.mean())
            self.add("tokens_per_expert", out.aux.tokens_per_expert)

    def flush(self, step: int, lr: float) -> dict:
        # Training steps only: evaluations inside the interval are not charged to throughput.
        record = {"step": step, "lr": lr, "tokens_per_s": self.tokens / max(self.seconds, 1e-9)}
        for name, total in self.sums.items():
            if name == "tokens_per_expert":
                share = total / total.sum(-1, keepdim=True).clamp_min(1)  # (moe_layers, num_experts)
                record["expert_share"] = [[round(s, 4) for s in row] for row in share.tolist()]
            else:
                record[name] = total.item() / self.steps
        self.reset()
        return record


def log_record(ffn: str, r: dict) -> None:
    line = (f"[{ffn}] step {r['step']:5d} | loss {r['lm_loss']:.4f} ({r['lm_loss'] / math.log(2):.3f} bpb) | "
            f"lr {r['lr']:.2e} | grad {r['grad_norm']:.2f} | {r['tokens_per_s']:,.0f} tok/s")
    if "expert_share" in r:
        shares = [s for row in r["expert_share"] for s in row]
        line += (f" | balance {r['load_balance']:.3f} z {r['z_loss']:.2f} dropped {r['dropped']:.1%} "
                 f"| expert share {min(shares):.3f}-{max(shares):.3f}")
    logger.info(line)


def start_run(args: argparse.Namespace, ffn: str, device: torch.device, checkpoint_dir: Path | None,
              settings: dict) -> tuple[MambaMoE, torch.optim.Optimizer, int, dict]:
    """A fresh model and optimizer at step 0, or the ones saved in checkpoint_dir with --resume."""
    if args.resume:
        model, state = load_checkpoint(checkpoint_dir, device, settings)
    else:
        model, state = build_model(args, ffn, device), None
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, args.beta2))
    if state is None:
        return model, optimizer, 0, {"train": [], "eval": []}
    optimizer.load_state_dict(state["optimizer"])
    return model, optimizer, state["step"], state["history"]


def train_step(model: MambaMoE, optimizer: torch.optim.Optimizer, x: torch.Tensor, lr: float, grad_clip: float,
               device: torch.device):
    """One optimizer step on x (batch, seqlen); returns the model's LMLoss and the gradient norm before clipping."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(device):
        out = model.loss(x)
    out.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()  # so the caller's step time is the GPU's work, not just its launch
    return out, grad_norm


def train_run(args: argparse.Namespace, ffn: str, corpus: Corpus, device: torch.device,
              checkpoint_dir: Path | None) -> dict:
    """Train one model (or continue it with --resume); returns its results (curves, final bpb, sample)."""
    settings = run_settings(args, ffn)
    model, optimizer, start, history = start_run(args, ffn, device, checkpoint_dir, settings)
    logger.info("[{}] {:,} parameters, {:,} active per token; layers {}", ffn, model.num_parameters(),
                model.num_parameters(active=True), model.config.layer_schedule)

    windows = heldout_windows(corpus.heldout, args.eval_batches * args.batch_size, args.seqlen)
    if start == 0:
        history["eval"].append({"step": 0, "bpb": evaluate(model, windows, args.batch_size, device)})
        logger.info("[{}] step {:5d} | held-out {:.4f} bpb", ffn, 0, history["eval"][-1]["bpb"])

    last = min(args.steps, args.stop_at) if args.stop_at is not None else args.steps
    bar = None
    if args.progress and tqdm is not None and start < last:
        bar = tqdm(total=args.steps, initial=start, desc=ffn, unit="step", dynamic_ncols=True, file=sys.stderr)
    meter, train_seconds = Meter(), 0.0
    for step in range(start, last):
        t0 = time.perf_counter()
        lr = learning_rate(step, args)
        x = train_batch(corpus.train, step, args.batch_size, args.seqlen, args.seed).to(device)  # (batch, seqlen)
        out, grad_norm = train_step(model, optimizer, x, lr, args.grad_clip, device)
        seconds = time.perf_counter() - t0
        meter.update(out, grad_norm, x.numel(), seconds)
        train_seconds += seconds
        done = step + 1
        if bar is not None:
            bar.update(1)
        if done % args.log_every == 0 or done == args.steps:
            history["train"].append(meter.flush(done, lr))
            log_record(ffn, history["train"][-1])
            if bar is not None:
                bar.set_postfix(loss=f"{history['train'][-1]['lm_loss']:.3f}", refresh=False)
        if done % args.eval_every == 0 or done == args.steps:
            history["eval"].append({"step": done, "bpb": evaluate(model, windows, args.batch_size, device)})
            logger.info("[{}] step {:5d} | held-out {:.4f} bpb", ffn, done, history["eval"][-1]["bpb"])
        if checkpoint_dir is not None and (done % args.checkpoint_every == 0 or done == last):
            save_checkpoint(checkpoint_dir, model, optimizer, done, history, settings)
    if bar is not None:
        bar.close()

    result = {"ffn": ffn, "parameters": model.num_parameters(), "active_parameters": model.num_parameters(active=True),
              "steps_done": max(start, last), "finished": max(start, last) >= args.steps,
              "train_seconds_this_invocation": train_seconds, "history": history,
              "final_heldout_bpb": history["eval"][-1]["bpb"] if history["eval"] else None}
    if result["finished"]:
        result["sample"] = sample(model, args, device)
        print(f"--- {ffn} sample ---\n{result['sample']}", flush=True)
    return result


def sample(model: MambaMoE, args: argparse.Namespace, device: torch.device) -> str:
    prompt = torch.tensor([list(args.prompt.encode("utf-8"))], dtype=torch.long, device=device)  # (1, prompt_len)
    tokens = model.generate(prompt, args.sample_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)  # (1, prompt_len + sample_tokens)
    return bytes(tokens[0].tolist()).decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------------- comparison


def steps_to_reach(curve: list[dict], target: float) -> float | None:
    """First step at which a held-out curve reaches ``target`` bpb, interpolated linearly between evaluations."""
    for prev, cur in zip(curve, curve[1:]):
        if cur["bpb"] <= target:
            if prev["bpb"] <= target:
                return float(prev["step"])
            frac = (prev["bpb"] - target) / (prev["bpb"] - cur["bpb"])
            return prev["step"] + frac * (cur["step"] - prev["step"])
    return None


def compare(runs: dict) -> tuple[dict, str]:
    """The eval bpb of both runs side by side, and how many steps MoE needed to reach dense's final bpb."""
    moe, dense = runs["moe"]["history"]["eval"], runs["dense"]["history"]["eval"]
    dense_bpb = {e["step"]: e["bpb"] for e in dense}
    lines = ["| step | MoE-Mamba bpb | Mamba (dense) bpb | difference |", "| ---: | ---: | ---: | ---: |"]
    for e in moe:
        if e["step"] in dense_bpb:
            d = dense_bpb[e["step"]]
            lines.append(f"| {e['step']} | {e['bpb']:.4f} | {d:.4f} | {e['bpb'] - d:+.4f} |")
    target, dense_steps = dense[-1]["bpb"], dense[-1]["step"]
    reached = steps_to_reach(moe, target)
    summary = {"dense_final_bpb": target, "moe_final_bpb": moe[-1]["bpb"], "dense_steps": dense_steps,
               "moe_steps_to_dense_final_bpb": reached,
               "step_speedup": dense_steps / max(reached, 1.0) if reached is not None else None}
    if reached is not None:
        lines.append(f"\nMoE-Mamba reached Mamba's final {target:.4f} bpb at step {reached:.0f} of {dense_steps}: "
                     f"{summary['step_speedup']:.2f}x fewer steps (paper: 2.35x at 100M parameters).")
    else:
        lines.append(f"\nMoE-Mamba did not reach Mamba's final {target:.4f} bpb within {moe[-1]['step']} steps.")
    return summary, "\n".join(lines)


def plot(runs: dict, path: Path) -> Path | None:
    """Held-out and training bpb per step: the whole run on the left, its last two thirds enlarged on the right
    (where the curves separate; the first evaluation, near 8 bpb, would flatten them)."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend state
    except ImportError:
        logger.info("matplotlib not installed: no plot (pip install 'mamba-r1[examples]')")
        return None
    fig = Figure(figsize=(11, 4.5))
    whole, zoom = fig.subplots(1, 2)
    last_step = max(run["history"]["eval"][-1]["step"] for run in runs.values())
    for ffn, run in runs.items():
        label = "MoE-Mamba" if ffn == "moe" else "Mamba (dense MLP)"
        evals, train = run["history"]["eval"], run["history"]["train"]
        for ax, first in ((whole, 0), (zoom, last_step / 3)):
            e = [x for x in evals if x["step"] >= first]
            t = [x for x in train if x["step"] >= first]
            line, = ax.plot([x["step"] for x in e], [x["bpb"] for x in e], marker="o", markersize=3,
                            label=f"{label}, held-out")
            ax.plot([x["step"] for x in t], [x["lm_loss"] / math.log(2) for x in t], color=line.get_color(),
                    alpha=0.35, linewidth=1, label=f"{label}, train")
    for ax, title in ((whole, "whole run"), (zoom, "last two thirds")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("bits per byte")
        ax.grid(alpha=0.3)
    whole.legend()
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.92, wspace=0.2)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------------- entry point


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-root", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                      help="directory whose .py files are the corpus: this Python's standard library")
    data.add_argument("--holdout-every", type=int, default=20, help="hold out every n-th file for evaluation")
    model = p.add_argument_group("model")
    model.add_argument("--ffn", choices=("moe", "dense"), default="moe",
                       help="moe: MoE-Mamba; dense: Mamba + MLP of hidden expert_dim * top_k (same active FLOPs)")
    model.add_argument("--compare", action="store_true", help="train both --ffn moe and dense, compare their curves")
    model.add_argument("--dim", type=int, default=128, help="model width")
    model.add_argument("--depth", type=int, default=4, help="layers (Mamba mixer + FFN each)")
    model.add_argument("--d-state", type=int, default=16, help="SSM state size per channel")
    model.add_argument("--d-conv", type=int, default=4, help="Mamba's causal conv width")
    model.add_argument("--expand", type=int, default=2, help="Mamba's inner width / dim")
    model.add_argument("--num-experts", type=int, default=8, help="experts per MoE layer")
    model.add_argument("--expert-dim", type=int, default=512, help="hidden width of one expert")
    model.add_argument("--top-k", type=int, default=1, help="experts per token (1 = Switch routing)")
    model.add_argument("--capacity-factor", type=float, default=1.25,
                       help="expert capacity = this * tokens * top_k / num_experts; tokens past it are dropped")
    model.add_argument("--scan-backend", default="auto", choices=("auto", "ref", "torch", "triton"),
                       help="selective-scan implementation")
    train = p.add_argument_group("training")
    train.add_argument("--steps", type=int, default=300, help="optimizer steps")
    train.add_argument("--batch-size", type=int, default=8, help="windows per step")
    train.add_argument("--seqlen", type=int, default=128, help="bytes per training and evaluation window")
    train.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    train.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    train.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
    train.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's, on weight matrices only")
    train.add_argument("--beta2", type=float, default=0.95, help="AdamW's second-moment decay")
    train.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm")
    train.add_argument("--seed", type=int, default=0, help="seeds the weights, the batches and the sample")
    train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    train.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (None: torch's choice); 1 is often fastest for small models")
    evaluation = p.add_argument_group("evaluation, logging, output")
    evaluation.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    evaluation.add_argument("--eval-batches", type=int, default=16, help="held-out windows = this * batch size")
    evaluation.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    evaluation.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                            help="tqdm progress bar (when tqdm is installed)")
    evaluation.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                            help="PNG of the curves beside --out (when matplotlib is installed)")
    evaluation.add_argument("--out", type=Path, default=None,
                            help="results JSON (None: examples/results/train_lm_<ffn or compare>.json)")
    evaluation.add_argument("--prompt", default="def ", help="start of the generated sample")
    evaluation.add_argument("--sample-tokens", type=int, default=200, help="bytes generated after training")
    evaluation.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    evaluation.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    ckpt = p.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpoint-dir", type=Path, default=None,
                      help="save_pretrained + optimizer state here (with --compare: DIR/moe and DIR/dense)")
    ckpt.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    ckpt.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint-dir")
    ckpt.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                      help="checkpoint and stop after this step, as a job with a time limit would; --resume goes on")
    args = p.parse_args(argv)

    positive = ("holdout_every", "dim", "depth", "d_state", "d_conv", "expand", "num_experts", "expert_dim", "top_k",
                "steps", "batch_size", "eval_every", "eval_batches", "log_every", "checkpoint_every")
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.seqlen < 2:
        p.error(f"--seqlen must be >= 2 (a window predicts its bytes 1..seqlen-1); got {args.seqlen}")
    if args.holdout_every < 2:
        p.error(f"--holdout-every must be >= 2, or nothing is left to train on; got {args.holdout_every}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0; got {args.seed}")
    if not (args.lr > 0 and 0 <= args.min_lr_ratio <= 1 and args.warmup >= 0 and args.grad_clip > 0
            and args.weight_decay >= 0 and 0 < args.beta2 < 1):
        p.error("need --lr > 0, 0 <= --min-lr-ratio <= 1, --warmup >= 0, --grad-clip > 0, --weight-decay >= 0, "
                f"0 < --beta2 < 1; got {args.lr}, {args.min_lr_ratio}, {args.warmup}, {args.grad_clip}, "
                f"{args.weight_decay}, {args.beta2}")
    if args.sample_tokens < 0 or not args.prompt:
        p.error("--sample-tokens must be >= 0 and --prompt non-empty")
    if (args.resume or args.stop_at is not None) and args.checkpoint_dir is None:
        p.error("--resume and --stop-at need --checkpoint-dir")
    if args.stop_at is not None and args.stop_at < 1:
        p.error(f"--stop-at must be >= 1; got {args.stop_at}")
    try:
        args.device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device {args.device!r}: {e}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA GPU; use --device cpu")
    return p, args


def main(argv: list[str] | None = None) -> dict:
    """Run the example; returns the results also written to ``--out``."""
    parser, args = parse_args(argv)
    progress = args.progress and tqdm is not None
    logger.remove()
    # Through tqdm.write, log lines print above the progress bar instead of tearing it.
    sink = (lambda message: tqdm.write(message, end="", file=sys.stderr)) if progress else sys.stderr
    logger.add(sink, level="INFO", format="<green>{time:HH:mm:ss}</green> {message}")
    logger.enable("mamba_r1")
    if args.progress and tqdm is None:
        logger.info("tqdm not installed: progress is logged every --log-every steps")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if not args.data_root.is_dir():
        parser.error(f"--data-root {args.data_root} is not a directory")
    started = time.perf_counter()
    corpus = load_corpus(args.data_root, args.holdout_every)
    if min(corpus.train.numel(), corpus.heldout.numel()) < args.seqlen:
        parser.error(f"--data-root {args.data_root} with --holdout-every {args.holdout_every} gives "
                     f"{corpus.train.numel()} training and {corpus.heldout.numel()} held-out bytes; both must be >= "
                     f"--seqlen {args.seqlen}")
    logger.info("corpus {}: {} files, {:,} bytes for training; {} files, {:,} bytes held out ({:.1f} s)",
                corpus.root, corpus.train_files, corpus.train.numel(), corpus.heldout_files,
                corpus.heldout.numel(), time.perf_counter() - started)

    ffns = ("moe", "dense") if args.compare else (args.ffn,)
    checkpoint_dirs = {ffn: None for ffn in ffns}
    if args.checkpoint_dir is not None:
        checkpoint_dirs = {ffn: args.checkpoint_dir / ffn if args.compare else args.checkpoint_dir for ffn in ffns}
        for ffn, directory in checkpoint_dirs.items():
            exists = (directory / TRAINER_STATE).is_file()
            if args.resume and not exists:
                parser.error(f"--resume: {directory} holds no checkpoint ({TRAINER_STATE} missing)")
            if not args.resume and exists:
                parser.error(f"{directory} already holds a checkpoint: pass --resume to continue it, or choose "
                             "another --checkpoint-dir")

    runs = {}
    for ffn in ffns:
        try:
            runs[ffn] = train_run(args, ffn, corpus, args.device, checkpoint_dirs[ffn])
        except ValueError as e:
            parser.error(str(e))

    results = {
        "script": "examples/train_lm.py", "argv": sys.argv[1:] if argv is None else list(argv),
        "settings": {k: str(v) if isinstance(v, (Path, torch.device)) else v for k, v in vars(args).items()},
        "python": platform.python_version(), "torch": torch.__version__, "device": str(args.device),
        "threads": torch.get_num_threads(),
        "corpus": {"root": corpus.root, "train_files": corpus.train_files, "train_bytes": corpus.train.numel(),
                   "heldout_files": corpus.heldout_files, "heldout_bytes": corpus.heldout.numel()},
        "runs": runs, "wall_seconds": time.perf_counter() - started,
    }
    if args.compare and all(run["finished"] for run in runs.values()):
        results["comparison"], table = compare(runs)
        print(table, flush=True)
    out = args.out or RESULTS_DIR / f"train_lm_{'compare' if args.compare else args.ffn}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    png = plot(runs, out.with_suffix(".png")) if args.plot else None
    if png is not None:
        results["plot"] = str(png)
        logger.info("plot -> {}", png)
    out.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("results -> {}", out)
    return results


if __name__ == "__main__":
    main()
