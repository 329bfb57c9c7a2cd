"""gmt-mlx: Gradient-Mask Tuning (arXiv 2406.15330) for Hugging Face LLMs on MLX."""

__version__ = "0.2.0"
