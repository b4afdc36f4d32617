"""The training side: config, the method registry, the loop, checkpoints, samplers, smoothness, DP-SGD."""
