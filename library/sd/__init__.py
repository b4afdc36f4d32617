"""Stable Diffusion building blocks: model bundle and loading, text conditioning, the diffusion maths, sampling."""
