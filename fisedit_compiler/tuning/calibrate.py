"""Calibration: measure the sparse path's kernels on a device to set the cost model's constants.

`cost_model` holds the formulas and the constants (`DEFAULT`, or a device's calibration file); this module runs
the micro-benchmark that writes that file. It is a measuring tool above the kernels and the runtime: it builds mask
plans and calls the kernels, and nothing below it imports it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import torch
import torch.nn.functional as F

from .. import kernels
from ..cost_model import (BLOCK_SIZES, CONV_ALGORITHMS, DEFAULT, GEMM_LIBRARIES, LARGE_SIDE, SIDE, CostConstants,
                          calibration_path)
from ..ir import ActivePixels, ConvWindows, SpatialLayout
from ..policy import Policy
from ..runtime.mask_plan import MaskPlan

CHANNELS = (320, 640, 1280)  # calibrated by default: SD's U-Net widths


def _seconds(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` runs after a warm-up (the least disturbed by other work on the machine)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def calibrate(device: torch.device | str = "cpu", channels: tuple[int, ...] = CHANNELS, side: int = SIDE,
              large_side: int | None = LARGE_SIDE, save: bool = True) -> CostConstants:
    """Measure `layer[C][b]` on `device` for every C in `channels` (multiples of 32): a resnet layer (GroupNorm
    with 32 groups, SiLU, 3x3 convolution) densely on a map twice as wide as `side` (at least 32), and as the
    sparse path runs it on the blocks of a `side` x `side` square in that map, for every block size, its
    convolution by each of `CONV_ALGORITHMS`: the fastest one is `conv[C][b]`, and its time sets the cost. First the
    faster library for im2col's GEMMs (`gemm`, on CPU: BLAS or oneDNN), which those layers then use. The same on a
    `large_side` square gives `large`, the constants of maps with many active pixels (None: not measured)."""
    device = torch.device(device)
    gemm = _gemm_library(device)
    constants = _region_constants(device, channels, side, gemm)
    if large_side is not None:
        constants = dataclasses.replace(constants, large=_region_constants(device, channels, large_side, gemm))
    if save:
        path = calibration_path(device)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dataclasses.asdict(constants), indent=2))
    return constants


def _region_constants(device: torch.device, channels: tuple[int, ...], side: int, gemm: str) -> CostConstants:
    measured = {c: _layer_costs(device, c, side, gemm) for c in channels}
    return CostConstants(layer={c: costs for c, (costs, _) in measured.items()},
                         conv={c: algorithms for c, (_, algorithms) in measured.items()}, gemm=gemm)


def _gemm_library(device: torch.device) -> str:
    """The faster of `GEMM_LIBRARIES` for an im2col GEMM the size of SD's 640-channel layers on a 30% mask at 48x48
    latents; BLAS off the CPU (oneDNN's convolutions serve CPUs)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return "blas"
    rows, kernel = torch.randn(768, 9 * 640), torch.randn(640, 9 * 640)
    seconds = {g: _seconds(lambda: kernels.matmul_rows(rows, kernel, None, g)) for g in GEMM_LIBRARIES}
    return min(seconds, key=seconds.get)


def _layer_costs(device: torch.device, channels: int, side: int, gemm: str
                 ) -> tuple[dict[int, float], dict[int, str]]:
    weight = torch.randn(channels, channels, 3, 3, device=device) / (3 * channels ** 0.5)
    res = (max(2 * side, max(BLOCK_SIZES)),) * 2
    dense_map = torch.randn(1, channels, *res, device=device)
    dense = _seconds(lambda: F.conv2d(F.silu(F.group_norm(dense_map, 32)), weight, padding=1)) / math.prod(res)

    mask = torch.zeros(res, dtype=torch.bool, device=device)
    mask[side // 2:side // 2 + side, side // 2:side // 2 + side] = True
    layout = SpatialLayout("map", res, (2, 3), (1, channels, *res))
    recorded = torch.randn(1, channels, *res, device=device)
    scale, shift = torch.rand(1, channels, device=device), torch.randn(1, channels, device=device)
    costs, algorithms = {}, {}
    flat_kernels: dict[int, torch.Tensor] = {}
    for block in BLOCK_SIZES:
        plan = MaskPlan(mask, Policy(block_size=block, halo=0), constants=DEFAULT)
        blocks = plan.layout(res)
        fresh = kernels.gather_pixels(None, recorded, plan.gather_index(ActivePixels(res), False), layout, 0)
        index = plan.gather_index(ConvWindows(res, res, (3, 3), (1, 1), (1, 1), (1, 1)), True)
        library = dataclasses.replace(DEFAULT, gemm=gemm).gemm_library(blocks.num_pixels, weight.numel(),
                                                                       weight.dtype)

        def sparse_layer(algorithm: str):
            windows = kernels.gather_pixels_affine_silu([fresh], [recorded], index, layout, blocks.num_blocks,
                                                        scale, shift)
            return kernels.conv_windows(windows, weight, None, [1, 1], [1, 1], 1, flat_kernels, algorithm,
                                        library)

        # pixel-wise blocks always take im2col (each window is one footprint: nothing to choose)
        seconds = {a: _seconds(lambda: sparse_layer(a)) for a in (CONV_ALGORITHMS if block > 1 else ("im2col",))}
        algorithms[block] = min(seconds, key=seconds.get)
        costs[block] = seconds[algorithms[block]] / blocks.num_pixels / dense
    return costs, algorithms
