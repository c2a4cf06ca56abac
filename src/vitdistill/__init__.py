"""vitdistill: compress Vision Transformers by knowledge distillation."""
__version__ = "0.1.0"
