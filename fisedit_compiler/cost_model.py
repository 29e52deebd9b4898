"""APSC: choose, per resolution and per mask, the block size that makes sparse layers cheapest (paper, appendix A.1).

The paper minimises ``(h - h_k + 1) * (w - w_k + 1) * N_blocks``; this model prices what a sparse layer really
does, in units of "computing one output pixel of a layer":

    cost(b) = computed pixels                     N_b * b^2
            + halo pixels recomputed              N_b * ((b + 2)^2 - b^2) * halo_weight
            + pixels gathered and scattered       N_b * ((b + 2)^2 + b^2) * moved_pixel
            + per-block overhead                  N_b * block

and `cost(dense) = H * W` (one block covering the map: no halo to recompute, gathers become copies). A resolution
where no block size beats dense runs dense. Choices depend only on the mask and are made once per edit.

The constants come from a short micro-benchmark on the machine (`calibrate`), kept in a JSON file per device;
without one, `DEFAULT` holds values measured on a 2-core CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BLOCK_SIZES = (2, 4, 8, 16, 32)


@dataclasses.dataclass(frozen=True)
class CostConstants:
    """Costs relative to computing one output pixel of a layer."""

    halo_weight: float = 1.0  # a recomputed halo pixel costs a computed pixel
    moved_pixel: float = 0.1  # gathering or scattering one pixel
    block: float = 8.0  # fixed overhead of one block (launch, index math, small-GEMM inefficiency)


DEFAULT = CostConstants()


def block_grid_count(active: torch.Tensor, block: int) -> int:
    """How many b x b blocks of the (H, W) bool map hold an active cell."""
    h, w = active.shape
    return int(active.reshape(h // block, block, w // block, block).any(dim=3).any(dim=1).sum())


def cost(active: torch.Tensor, block: int, constants: CostConstants = DEFAULT, halo: int = 1) -> float:
    """The modelled cost of computing the active cells of `active` in blocks of `block` (see module docstring)."""
    h, w = active.shape
    if block >= max(h, w):
        return float(h * w)
    n = block_grid_count(active, block)
    window = (block + 2 * halo) ** 2
    return n * (block * block + (window - block * block) * constants.halo_weight
                + (window + block * block) * constants.moved_pixel + constants.block)


def choose_block_size(active: torch.Tensor, candidates: tuple[int, ...] = BLOCK_SIZES,
                      constants: CostConstants = DEFAULT) -> int:
    """The cheapest block size for the active cells of an (H, W) map among `candidates` that divide it, or the
    map's size (dense: one block) if none beats dense. Ties go to the larger block."""
    h, w = active.shape
    dense = max(d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0)  # one block if the map is square
    options = [b for b in candidates if h % b == 0 and w % b == 0 and b < dense] + [dense]
    return min(reversed(options), key=lambda b: cost(active, b, constants))


# --- calibration ---------------------------------------------------------------------------------------------


def calibration_path(device: torch.device) -> Path:
    root = Path(os.environ.get("FISEDIT_CACHE_DIR", Path.home() / ".cache" / "fisedit"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return root / f"cost-model-{name.replace(' ', '_').replace('/', '_')}.json"


def _seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def calibrate(device: torch.device | str = "cpu", channels: int = 128, save: bool = True) -> CostConstants:
    """Measure the constants with a 3x3 convolution on blocks of two sizes and a pixel gather, on `device`."""
    device = torch.device(device)
    weight = torch.randn(channels, channels, 3, 3, device=device)
    pixels = 64 * 64

    def conv_on_blocks(block: int) -> float:
        x = torch.randn(pixels // (block * block), channels, block + 2, block + 2, device=device)
        return _seconds(lambda: F.conv2d(x, weight))

    per_pixel = _seconds(lambda: F.conv2d(torch.randn(1, channels, 66, 66, device=device), weight)) / pixels
    # blocks of 2 and of 16 compute the same pixels; the difference beyond their halos is per-block overhead
    small, large = conv_on_blocks(2), conv_on_blocks(16)
    halo_small, halo_large = pixels * (16 / 4 - 1), pixels * (324 / 256 - 1)
    blocks_small, blocks_large = pixels / 4, pixels / 256
    overhead = max(0.0, (small - large) / per_pixel - (halo_small - halo_large)) / (blocks_small - blocks_large)
    source = torch.randn(1, pixels, channels, device=device)
    index = torch.randperm(pixels, device=device)
    moved = _seconds(lambda: source.index_select(1, index)) / pixels / per_pixel
    constants = CostConstants(halo_weight=1.0, moved_pixel=moved, block=overhead)
    if save:
        path = calibration_path(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(constants), indent=2))
    return constants


def load_constants(device: torch.device) -> CostConstants:
    """The calibrated constants of `device` if `calibrate` saved them, else `DEFAULT`."""
    path = calibration_path(device)
    if path.is_file():
        return CostConstants(**json.loads(path.read_text()))
    return DEFAULT
