"""Kernels of the sparse path. `reference` is plain PyTorch (the CPU path and the ground truth)."""
