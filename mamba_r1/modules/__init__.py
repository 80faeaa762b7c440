"""nn.Modules with parameters: MambaBlock, SwitchMoE, RotaryEmbedding, attention, norms, MLP. They call mamba_r1.ops."""
