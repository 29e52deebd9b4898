"""What the edit benchmarks share: the command-line arguments that pick the model and the edit, and DeepCache.

The scripts in this folder import it as a sibling module (`python benchmarks/<name>.py` puts the folder on the
import path).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from pathlib import Path

DEEPCACHE_MISSING = "the DeepCache package is not installed (pip install --no-deps DeepCache)"


def add_edit_arguments(p: argparse.ArgumentParser) -> None:
    """--arch, --size, --latent-size, --steps, --mask (an ellipse, percent of the latents), --deepcache-interval and
    --out: an SD 1.5 edit at 512² (64² latents), 20 steps, a 15 % mask by default."""
    p.add_argument("--arch", default="sd15", choices=("sd15", "sd2"))
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--latent-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--mask", type=float, default=15.0, help="ellipse mask, percent of the latents")
    p.add_argument("--deepcache-interval", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))


def deepcache_available() -> bool:
    try:
        import DeepCache  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def deepcache(pipe, interval: int) -> Iterator[None]:
    """`pipe` with DeepCache on (`DeepCacheSDHelper`: cache interval `interval`, branch 0) inside; its U-Net must be
    the eager one. Check `deepcache_available()` first."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    try:
        yield
    finally:
        helper.disable()


@contextlib.contextmanager
def onednn_linears(model) -> Iterator[None]:
    """Inside, every `nn.Linear` of `model` multiplies through oneDNN's linear primitive, as the compiled programs'
    GEMMs do on a CPU (`kernels.onednn`), instead of stock PyTorch's BLAS: a dense contender with the programs' GEMM
    library, like for like. (PyTorch's CPU convolutions run in oneDNN already.)"""
    import torch
    from torch import nn

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32]
    for m in linears:
        m.forward = forward.__get__(m)
    try:
        yield
    finally:
        for m in linears:
            del m.forward
