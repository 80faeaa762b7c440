"""Generate text with a byte-level hybrid Mamba + MoE model.

    python examples/generate.py --prompt "The quick brown fox" --max-new-tokens 64
    python examples/generate.py --checkpoint runs/byte-lm --temperature 0.8 --top-p 0.95 --seed 1

Tokens are bytes (vocab 256): the prompt is encoded as UTF-8 and the continuation decoded with errors="replace".
Without --checkpoint the weights are random, so the continuation is noise; what the run shows is the generation
path (one parallel prefill, then O(1) work per token in the Mamba layers) and its speed. Runs on the GPU when
there is one. A checkpoint is a directory written by model.save_pretrained(dir).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from loguru import logger

from mamba_r1 import MambaMoE, create_mamba_moe

BYTE_VOCAB = 256


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="Mamba meets mixture of experts: ", help="text to continue (UTF-8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely bytes")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seeds the random weights and the sampling")
    p.add_argument("--checkpoint", default=None, metavar="DIR", help="load weights with MambaMoE.from_pretrained")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice); 1 is often fastest for one small sequence")
    return p, p.parse_args(argv)


def load_model(checkpoint: str | None, device: torch.device, parser: argparse.ArgumentParser) -> MambaMoE:
    if checkpoint is None:
        logger.warning("no --checkpoint given: the model has RANDOM weights, so the continuation is noise")
        # Small enough to build and decode in seconds on a laptop CPU.
        return create_mamba_moe(dim=128, depth=4, d_state=16, d_conv=4, expand=2, num_experts=4, expert_dim=256,
                                max_seq_len=4096, vocab_size=BYTE_VOCAB, device=device)
    try:
        model = MambaMoE.from_pretrained(checkpoint, device=device)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--checkpoint {checkpoint}: {e}")
    if model.config.vocab_size != BYTE_VOCAB:
        parser.error(f"--checkpoint {checkpoint} has vocab_size={model.config.vocab_size}; this example feeds it "
                     f"bytes and needs vocab_size={BYTE_VOCAB}")
    logger.info("loaded {}", checkpoint)
    return model


def main(argv: list[str] | None = None) -> str:
    """Run the example; returns the decoded continuation (also printed on stdout)."""
    parser, args = parse_args(argv)
    prompt = args.prompt.encode("utf-8")
    if not prompt:
        parser.error("--prompt must not be empty: generation continues from at least one byte")

    logger.remove()
    logger.add(sys.stderr, level="INFO", format="<green>{time:HH:mm:ss}</green> {message}")
    logger.enable("mamba_r1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.checkpoint, device, parser).eval()
    logger.info("model: {:,} parameters ({:,} active per token) on {}, layers {}", model.num_parameters(),
                model.num_parameters(active=True), device, model.config.layer_schedule)

    input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # (1, prompt_len)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    try:
        # Untimed warm-up: the first call pays one-off costs (kernel compilation, lazy imports, allocator growth).
        model.generate(input_ids, min(args.max_new_tokens, 2), **sampling)
    except ValueError as e:
        parser.error(str(e))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    output = model.generate(input_ids, args.max_new_tokens, **sampling)  # (1, prompt_len + new)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start

    new_tokens = output[0, input_ids.shape[1]:].tolist()
    continuation = bytes(new_tokens).decode("utf-8", errors="replace")
    logger.info("prompt: {!r}", args.prompt)
    print(continuation)
    logger.info("{} new tokens in {:.3f} s: {:.1f} tokens/s (prefill of {} bytes included)", len(new_tokens), elapsed,
                len(new_tokens) / max(elapsed, 1e-9), input_ids.shape[1])
    return continuation


if __name__ == "__main__":
    main()
