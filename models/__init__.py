"""Model architectures in plain PyTorch, and the loader that fills them from checkpoints."""
