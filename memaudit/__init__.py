"""memaudit: audit diffusion models for training-data memorization."""

__version__ = "0.1.0"
