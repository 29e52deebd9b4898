"""Kernels of the sparse path, dispatched in one place.

`reference` holds plain-PyTorch implementations: the CPU path, and the ground truth other implementations are
tested against. `triton_gather` and `triton_attention` hold Triton versions of the gathers, scatters and
attention. The runtime calls the functions below and never names an implementation.

Dispatch, per call, over the call's tensor arguments (`select_backend`): CUDA tensors of float32, float16 or
bfloat16 with triton importable run the Triton version; anything else the reference. The environment variable
``FISEDIT_KERNELS=reference|triton`` forces a choice (read once, with the package's other variables:
`environment.current()`; `environment.reread()` after setting it); ``triton`` with CPU tensors needs Triton's
interpreter (``TRITON_INTERPRET=1``), which is how the tests check the Triton kernels without a GPU. triton is an
optional dependency: it is imported only when a call picks it.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Sequence
from typing import Literal

import torch

from .. import environment
from . import reference

Backend = Literal["reference", "triton"]

_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def triton_importable() -> bool:
    """Whether the optional triton dependency can be imported (imports it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(tensors: Sequence[torch.Tensor]) -> Backend:
    """The implementation a kernel call with these tensor arguments runs; see the module docstring."""
    choice = environment.current().kernels
    on_cuda = all(t.device.type == "cuda" for t in tensors)
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if not triton_importable():
            raise ImportError(
                "FISEDIT_KERNELS=triton but triton is not installed: pip install 'fisedit-compiler[triton]'"
            )
        if not on_cuda and not importlib.import_module(".triton_config", __name__).INTERPRETED:
            raise RuntimeError(
                "FISEDIT_KERNELS=triton with CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 before "
                "starting Python, or unset FISEDIT_KERNELS to use the reference kernels on CPU"
            )
        return "triton"
    if choice:
        raise ValueError(f"FISEDIT_KERNELS={choice!r}: expected 'reference', 'triton', or unset (pick by device)")
    supported = all(t.dtype in _TRITON_DTYPES for t in tensors if t.is_floating_point())
    return "triton" if on_cuda and supported and triton_importable() else "reference"


def _dispatched(name: str, triton_module: str) -> Callable:
    """The kernel `name`: `reference`'s or `triton_module`'s, chosen per call by `select_backend`."""

    @functools.wraps(getattr(reference, name))
    def kernel(*args, **kwargs):
        tensors = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])
                   if isinstance(t, torch.Tensor)]  # a concatenation's operands come as lists
        if select_backend(tensors) == "triton":
            implementation = importlib.import_module(f".{triton_module}", __name__)
        else:
            implementation = reference
        return getattr(implementation, name)(*args, **kwargs)

    return kernel


gather_pixels = _dispatched("gather_pixels", "triton_gather")
gather_pixels_affine_silu = _dispatched("gather_pixels_affine_silu", "triton_gather")
active_query_attention = _dispatched("active_query_attention", "triton_attention")

# Layout conversions, GroupNorm statistics, per-block broadcasts and convolutions are PyTorch on every device.
to_canonical = reference.to_canonical
from_canonical = reference.from_canonical
group_norm_affine = reference.group_norm_affine
group_norm_with_stats = reference.group_norm_with_stats
group_norm_scale_shift = reference.group_norm_scale_shift
repeat_over_blocks = reference.repeat_over_blocks
scatter_pixels_ = reference.scatter_pixels_
conv_windows = reference.conv_windows  # cuDNN / oneDNN convolutions or one GEMM
matmul_rows = reference.matmul_rows  # BLAS or oneDNN
