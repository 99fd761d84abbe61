"""Checkpoint loaders and adapters that turn any network into the common denoiser D(x, sigma)."""
