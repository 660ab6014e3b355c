"""potstill: knowledge distillation for PyTorch and Hugging Face models, with the evidence."""

__version__ = "0.1.0"
