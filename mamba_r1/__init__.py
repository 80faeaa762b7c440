"""mamba_r1: hybrid Mamba + Mixture-of-Experts language models in PyTorch."""

from loguru import logger

from mamba_r1.config import MambaMoEConfig
from mamba_r1.model import MambaMoE, create_mamba_moe
from mamba_r1.modules.attention import CausalSelfAttention
from mamba_r1.modules.mamba import MambaBlock
from mamba_r1.modules.moe import SwitchMoE
from mamba_r1.modules.rotary import RotaryEmbedding

# A library stays quiet unless its user asks: logger.enable("mamba_r1").
logger.disable("mamba_r1")

__version__ = "0.1.0"

__all__ = ["create_mamba_moe", "MambaMoE", "MambaMoEConfig", "MambaBlock", "SwitchMoE", "RotaryEmbedding",
           "CausalSelfAttention"]
