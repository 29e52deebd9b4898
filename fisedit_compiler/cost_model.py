"""APSC: choose, per resolution and per mask, the block size that makes sparse layers cheapest (paper, appendix A.1).

The paper minimises ``(h - h_k + 1) * (w - w_k + 1) * N_blocks`` over h, w in {2, 4, 8, 16, 32}. This model prices
what a sparse layer really does, in units of "one output pixel of the layer computed densely":

    cost(b) = N_b * b^2 * max(1, layer[C][b])        and        cost(dense) = H * W

`layer[C][b]` is what one output pixel costs when a resnet convolution with C channels runs on b x b blocks: its
input windows (halo included) gathered from the fresh blocks and the recorded map, normalised with the recorded
statistics and activated, and the convolution over the batch of windows; relative to the dense GroupNorm, SiLU and
convolution. Small blocks compute fewer pixels (a tighter cover of the mask) but each costs more (larger halo share,
smaller GEMMs); b = 1 (pixel-wise: every window is one kernel footprint, the convolution one matrix product) is
added to the paper's sizes. How much more depends strongly on C, so the constants are kept per channel count and a
resolution uses those of its channel count (the nearest calibrated one). A resolution where no block size beats
dense runs dense (one block covering the map: gathers become no-ops). Choices depend only on the mask and the
U-Net's channels, and are made once per edit.

How a convolution runs on windows larger than one kernel footprint is a measured choice too (`CostConstants.conv`,
one of `CONV_ALGORITHMS` per channel count and block size; see `kernels.reference.conv_windows`): on one 2-core CPU
the fastest of them was up to 2x faster than the slowest, and which one wins depends on C and b.

How much a pixel costs also depends on how many there are: the constants are measured on a small region (what a
U-Net's maps hold) and on a large one (`CostConstants.large`, a VAE decoder's maps at image resolution), and a map
takes those of the region nearer its active pixel count (`CostConstants.for_active`).

The constants come from a short micro-benchmark on the machine (`fisedit_compiler.tuning.calibrate`, which
measures the kernels), kept in a JSON file per device (`calibration_path`, read by `load_constants`); without one,
`DEFAULT` holds values measured on a 2-core CPU (AMD EPYC with AVX-512, torch 2.13, fp32). This module is the
formulas only: it imports no kernel, so the mask plan can use it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from pathlib import Path

import torch

from . import environment

BLOCK_SIZES = (1, 2, 4, 8, 16, 32)
# The square regions the constants are measured on (`tuning.calibrate`), in pixels a side, and from how many active
# pixels a map takes the larger region's (`CostConstants.for_active`): their geometric mean. A U-Net's maps at SD
# sizes have a few hundred to a few thousand active pixels, a VAE decoder's at 512² tens of thousands: there,
# pixel-wise blocks (each pixel's 3x3 window a copy of its neighbours' channels) ran 1.4-1.9x slower than 8x8 blocks
# while the small region's constants priced them alike.
SIDE, LARGE_SIDE = 32, 128
LARGE_FROM = SIDE * LARGE_SIDE
# How a convolution runs on a batch of windows (`kernels.reference.conv_windows`): the convolution library on a
# contiguous NCHW copy of the windows, the same on the windows as gathered (channels-last strided), or im2col (each
# output pixel's kernel footprint a row, then one GEMM with the flattened kernel).
CONV_ALGORITHMS = ("nchw", "channels_last", "im2col")
# Which library multiplies im2col's rows with the flattened kernel (`kernels.reference.matmul_rows`): the BLAS behind
# `F.linear` (MKL on x86 CPUs, cuBLAS on CUDA), or oneDNN, the library behind PyTorch's CPU convolutions, through its
# linear primitive. On a 2-core AMD EPYC (AVX-512, torch 2.13, fp32) MKL's SGEMM ran at 93 GMAC/s and oneDNN at
# 210-225: the dense U-Net's 3x3 convolutions run in oneDNN, so with BLAS the sparse path's GEMMs ran at half the
# dense rate. oneDNN's linear reads the plain (out, k) kernel as it is, so it is faster from few rows on (30 rows of
# a 1280-channel 3x3 kernel: 3.1 ms against BLAS's 7.3; a 1x1 convolution of the rows, which reorders the kernel on
# every call, took 19.5), but costs ~12 us more per call: it pays from GEMMs of ONEDNN_MIN_MACS (rows x kernel
# elements; 16 rows of a 128-channel 3x3 kernel took 36 us by either).
GEMM_LIBRARIES = ("blas", "onednn")
ONEDNN_MIN_MACS = 2_000_000


@dataclasses.dataclass(frozen=True)
class CostConstants:
    """Per channel count C and block size b: the cost of one output pixel of a sparse layer relative to dense
    (`layer`), and the fastest convolution algorithm on windows (`conv`, one of `CONV_ALGORITHMS`; "nchw" where
    none was measured); and the faster library for im2col's float32 GEMMs (`gemm`, one of `GEMM_LIBRARIES`)."""

    layer: dict[int, dict[int, float]]
    conv: dict[int, dict[int, str]] = dataclasses.field(default_factory=dict)
    gemm: str = "blas"
    # The same measured on a larger region (`LARGE_SIDE`): what a map with more than `LARGE_FROM` active pixels
    # takes (`for_active`). None: these constants serve every map.
    large: CostConstants | None = None

    def __post_init__(self) -> None:
        for c, costs in self.layer.items():
            missing = set(BLOCK_SIZES) - set(costs)
            if missing:
                raise ValueError(f"CostConstants.layer[{c}] needs a cost for every block size in {BLOCK_SIZES}: "
                                 f"missing {sorted(missing)}")
        if not self.layer:
            raise ValueError("CostConstants.layer is empty: calibrate at least one channel count")
        for c, algorithms in self.conv.items():
            unknown = {a for a in algorithms.values() if a not in CONV_ALGORITHMS}
            if unknown:
                raise ValueError(f"CostConstants.conv[{c}] names unknown convolution algorithms {sorted(unknown)}: "
                                 f"choose among {CONV_ALGORITHMS}")
        if self.gemm not in GEMM_LIBRARIES:
            raise ValueError(f"CostConstants.gemm={self.gemm!r}: choose among {GEMM_LIBRARIES}")
        if self.large is not None and self.large.large is not None:
            raise ValueError("CostConstants.large holds one larger region's constants: it has no `large` of its own")

    def for_active(self, active_pixels: int) -> CostConstants:
        """The constants for a map with `active_pixels` active pixels: `large` above `LARGE_FROM`, where gathers
        and pixel-wise windows outgrow the caches that a small region's fit in."""
        return self.large if self.large is not None and active_pixels > LARGE_FROM else self

    def for_channels(self, channels: int | None) -> dict[int, float]:
        """The per-block costs of the calibrated channel count nearest to `channels` (in ratio); the widest one
        for unknown channels."""
        return self.layer[_nearest(self.layer, channels)]

    def conv_algorithm(self, channels: int, block: int) -> str:
        """The convolution algorithm for windows of `block` x `block` output pixels with `channels` input channels:
        the one measured for the nearest calibrated channel count (in ratio), "nchw" where none was."""
        if not self.conv:
            return "nchw"
        return self.conv[_nearest(self.conv, channels)].get(block, "nchw")

    def gemm_library(self, rows: int, kernel_elements: int, dtype: torch.dtype) -> str:
        """The library for an im2col GEMM of `rows` rows with a kernel of `kernel_elements` in `dtype`: `gemm` for
        float32 where oneDNN is built in and the GEMM is large enough to pay for its per-call cost
        (`ONEDNN_MIN_MACS`), else BLAS (for bfloat16 `F.linear` takes oneDNN by itself)."""
        onednn = (self.gemm == "onednn" and dtype == torch.float32 and rows * kernel_elements >= ONEDNN_MIN_MACS
                  and onednn_linear_available())
        return "onednn" if onednn else "blas"


def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN and its linear primitive (`torch.ops.mkldnn._linear_pointwise`)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _nearest(table: dict[int, object], channels: int | None) -> int:
    """The key of `table` nearest to `channels` in ratio; the largest for unknown channels."""
    if channels is None:
        return max(table)
    return min(table, key=lambda c: abs(math.log(c / channels)))


# `tuning.calibrate` on a 2-core AMD EPYC with AVX-512 (torch 2.13, fp32, im2col GEMMs in oneDNN, then still as 1x1
# convolutions: not re-measured with its linear primitive), 2026-12-04. In whole SD 2 calls at 96x96 latents (three
# dense/sparse pairs per mask) these constants, which take pixel-wise blocks at 96x96 too, ran 11.2x / 5.15x / 2.80x
# faster than dense for 5 / 15 / 30% ellipses, against 9.7x / 4.75x / 2.64x for the previous ones (calibrated on an
# EPYC without AVX-512, 4x4 blocks at 96x96), and took 8-11% fewer MACs. Convolutions on larger windows: im2col up
# to blocks of 4 (of 16 at 640 channels), then the library.
DEFAULT = CostConstants(
    layer={
        320: {1: 1.17, 2: 1.3, 4: 1.21, 8: 1.13, 16: 1.13, 32: 1.07},
        640: {1: 1.17, 2: 1.19, 4: 1.18, 8: 1.17, 16: 1.16, 32: 1.05},
        1280: {1: 1.53, 2: 1.55, 4: 1.59, 8: 1.43, 16: 1.48, 32: 1.23},
    },
    conv={
        320: {1: "im2col", 2: "im2col", 4: "im2col", 8: "channels_last", 16: "channels_last", 32: "channels_last"},
        640: {1: "im2col", 2: "im2col", 4: "im2col", 8: "im2col", 16: "im2col", 32: "channels_last"},
        1280: {1: "im2col", 2: "im2col", 4: "im2col", 8: "nchw", 16: "nchw", 32: "channels_last"},
    },
    gemm="onednn",
    # The larger region (`LARGE_SIDE`: a 128x128 square of a 256x256 map), measured the same way on the same CPU
    # (git 05e9b94, one run), for SD's U-Net widths and its VAE decoder's (128, 256, 512)
    large=CostConstants(
        layer={
            128: {1: 1.5, 2: 1.27, 4: 0.6, 8: 0.53, 16: 0.51, 32: 0.5},
            256: {1: 1.36, 2: 1.73, 4: 0.95, 8: 0.68, 16: 0.66, 32: 0.63},
            320: {1: 1.32, 2: 1.63, 4: 1.03, 8: 0.75, 16: 0.71, 32: 0.72},
            512: {1: 1.37, 2: 1.5, 4: 1.25, 8: 1.06, 16: 1.49, 32: 1.04},
            640: {1: 1.28, 2: 1.47, 4: 1.2, 8: 1.6, 16: 1.08, 32: 1.01},
            1280: {1: 1.23, 2: 1.22, 4: 1.21, 8: 1.19, 16: 1.05, 32: 0.98},
        },
        conv={
            128: {1: "im2col", 2: "channels_last", 4: "channels_last",
                  8: "channels_last", 16: "channels_last", 32: "channels_last"},
            256: {1: "im2col", 2: "channels_last", 4: "channels_last",
                  8: "channels_last", 16: "channels_last", 32: "channels_last"},
            320: {1: "im2col", 2: "im2col", 4: "channels_last",
                  8: "channels_last", 16: "channels_last", 32: "channels_last"},
            512: {1: "im2col", 2: "im2col", 4: "channels_last", 8: "channels_last", 16: "im2col", 32: "channels_last"},
            640: {1: "im2col", 2: "im2col", 4: "channels_last",
                  8: "channels_last", 16: "channels_last", 32: "channels_last"},
            1280: {1: "im2col", 2: "im2col", 4: "im2col", 8: "nchw", 16: "channels_last", 32: "channels_last"},
        },
        gemm="onednn",
    ),
)


def block_grid_count(active: torch.Tensor, block: int) -> int:
    """How many b x b blocks of the (H, W) bool map hold an active cell."""
    h, w = active.shape
    return int(active.reshape(h // block, block, w // block, block).any(dim=3).any(dim=1).sum())


def cost(active: torch.Tensor, block: int, constants: CostConstants = DEFAULT, channels: int | None = None) -> float:
    """The modelled cost of computing the active cells of `active` in blocks of `block` (see module docstring)."""
    h, w = active.shape
    if block >= max(h, w):
        return float(h * w)
    # At least the dense cost per pixel: a sparse resolution's other layers (attention, linear layers, region
    # entries and exits) gain nothing from blocking, so full coverage never beats dense. Blocks larger than any
    # measured (a non-square map's largest, its sides' common divisor: 64 for 128x64 latents) run at the dense rate.
    per_pixel = max(1.0, constants.for_active(int(active.sum())).for_channels(channels).get(block, 1.0))
    return block_grid_count(active, block) * block * block * per_pixel


def choose_block_size(active: torch.Tensor, candidates: tuple[int, ...] = BLOCK_SIZES,
                      constants: CostConstants = DEFAULT, channels: int | None = None) -> int:
    """The cheapest block size for the active cells of an (H, W) map with `channels` channels among `candidates`
    that divide it, or the map's size (dense: one block) if none beats dense. Ties go to the larger block."""
    h, w = active.shape
    dense = max(d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0)  # one block if the map is square
    options = [b for b in candidates if h % b == 0 and w % b == 0 and b < dense] + [dense]
    return min(reversed(options), key=lambda b: cost(active, b, constants, channels))


# --- calibration files ---------------------------------------------------------------------------------------


def calibration_path(device: torch.device) -> Path:
    """The calibration file of `device`, in $FISEDIT_CACHE_DIR (`environment.current().cache_dir`)."""
    root = environment.current().cache_dir
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{device.type}-{platform.machine()}"
    return root / f"cost-model-{name.replace(' ', '_').replace('/', '_')}.json"


def load_constants(device: torch.device) -> CostConstants:
    """The calibrated constants of `device` if `tuning.calibrate` saved them, else `DEFAULT` (on an accelerator,
    without its CPU-measured convolution algorithms and GEMM library: there the convolution library chooses, "nchw",
    and GEMMs take BLAS)."""
    path = calibration_path(device)
    if path.is_file():
        saved = json.loads(path.read_text())
        if isinstance(saved.get("layer"), dict):  # files of older versions (other fields) are ignored
            return constants_from_json(saved, default_gemm="onednn" if device.type == "cpu" else "blas")
    if device.type == "cpu":
        return DEFAULT
    large = DEFAULT.large and dataclasses.replace(DEFAULT.large, conv={}, gemm="blas")
    return dataclasses.replace(DEFAULT, conv={}, gemm="blas", large=large)


def constants_from_json(saved: dict, default_gemm: str) -> CostConstants:
    """`CostConstants` from `dataclasses.asdict` of them read back from JSON (keys are strings there); a file from
    before the larger region (no `large`) serves every map with its one region's constants."""
    gemm = saved.get("gemm", default_gemm)
    large = saved.get("large")
    return CostConstants(layer={int(c): {int(b): v for b, v in costs.items()} for c, costs in saved["layer"].items()},
                         conv={int(c): {int(b): v for b, v in algorithms.items()}
                               for c, algorithms in saved.get("conv", {}).items()},
                         gemm=gemm,
                         large=constants_from_json({**large, "gemm": gemm}, gemm) if isinstance(large, dict) else None)
