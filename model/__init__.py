"""LongCat-Flash in plain PyTorch (single device; parallelism is applied from outside)."""
