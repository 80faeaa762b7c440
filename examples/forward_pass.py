"""The seed example: build a small hybrid Mamba + MoE model and run a masked forward pass.

    python examples/forward_pass.py            # CPU or GPU, a few seconds
"""

import argparse
import sys
import time

import torch
from loguru import logger

from mamba_r1 import create_mamba_moe


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    logger.remove()
    logger.add(sys.stderr, format="<green>{time:HH:mm:ss}</green> {message}")
    logger.enable("mamba_r1")
    torch.manual_seed(args.seed)

    model = create_mamba_moe(dim=256, depth=6, d_state=16, d_conv=2, expand=1, num_experts=4, expert_dim=512)
    device = next(model.parameters()).device
    logger.info("model: {:,} parameters ({:,} active per token) on {}", model.num_parameters(),
                model.num_parameters(active=True), device)

    x = torch.randn(args.batch, args.seqlen, 256, device=device)
    mask = torch.ones(args.batch, args.seqlen, dtype=torch.bool, device=device)
    mask[1, : args.seqlen // 4] = False  # the second row is left-padded by a quarter

    t0 = time.perf_counter()
    with torch.no_grad():
        out, aux = model(x, mask=mask, return_aux=True)
    elapsed = time.perf_counter() - t0
    real = out[mask]
    logger.info("input  shape {}  output shape {}  ({:.2f} s)", tuple(x.shape), tuple(out.shape), elapsed)
    logger.info("output over real tokens: mean {:+.4f}  std {:.4f}  finite {}", real.mean().item(),
                real.std().item(), bool(torch.isfinite(out).all()))
    logger.info("MoE aux loss {:.4f}  (load balance {:.3f}, z-loss {:.3f}, dropped {:.1%})", aux.loss.item(),
                aux.load_balance_loss.item(), aux.z_loss.item(), aux.dropped_fraction.mean().item())
    logger.info("tokens per expert, layer 0: {}", aux.tokens_per_expert[0].tolist())


if __name__ == "__main__":
    main()
