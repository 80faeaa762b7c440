"""mamba_r1: hybrid Mamba + Mixture-of-Experts language models in PyTorch."""

from loguru import logger

logger.disable("mamba_r1")

__version__ = "0.1.0"
