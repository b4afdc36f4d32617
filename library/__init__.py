"""smp-lora: membership-private LoRA fine-tuning of latent diffusion models (Luo et al., AAAI 2025)."""

__version__ = "0.1.0"
