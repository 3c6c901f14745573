"""MergeMix: attention-guided mixup via token merging for timm Vision Transformers."""

__version__ = "0.1.0"
