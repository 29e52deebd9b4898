#!/usr/bin/env python
"""Kernel benchmark of issue 6: achieved bandwidth (gathers) and FLOP/s (attention) of the sparse path's
kernels, Triton against the PyTorch reference, and both against the device's peak.

    python benchmarks/kernel_speed.py                      # SD 2 sizes: 96x96 latents, 320 channels, 20% mask
    python benchmarks/kernel_speed.py --latent-size 32     # a quick check

On CUDA it times the Triton version and the reference of every kernel (`triton.testing.do_bench`, medians, after
Triton's autotuning has run) and checks that they agree. On CPU it times the references only and says so: no
CUDA device is present, and Triton kernels on CPU run in Triton's interpreter, whose timings mean nothing.

Each case counts the bytes the operation itself must move, its inputs read once and its output written once,
index tensors included; a gather reads only the rows it uses. Bandwidth is those bytes over the time, for both
implementations, so a reference that materialises intermediates shows as slower, not as moving more. Attention
counts 4 x batch x heads x queries x keys x head_dim FLOPs (QK^T and PV).

Peaks: on CUDA the DRAM bandwidth from the device's memory clock and bus width (`triton.testing.get_dram_gbps`);
measured on every device, the bandwidth of a large device-to-device copy and the FLOP/s of a large matmul in the
benchmark dtype (what the device achieves with vendor kernels). Fractions are of the measured peaks.

Results go to ``<out>/kernels-<device>.json`` (device: the CUDA device name or ``cpu-<N>core``) and a table is
printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fisedit_compiler import kernels
from fisedit_compiler.editing.masks import ellipse_mask
from fisedit_compiler.ir import ActivePixels, ConvWindows, GatherIndex, SpatialLayout
from fisedit_compiler.kernels import reference
from fisedit_compiler.policy import Policy
from fisedit_compiler.runtime.mask_plan import MaskPlan

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INDEX_BYTES = 8  # int64 index tensors, as `MaskPlan` builds them


@dataclasses.dataclass
class Case:
    """One kernel call to time: the same arguments for both implementations."""

    kernel: str
    description: str
    args: tuple
    bytes_moved: int
    flops: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latent-size", type=int, default=96, help="latent side; default 96 (SD 2 at 768x768)")
    p.add_argument("--channels", type=int, default=320, help="channels of the gathered maps (SD's first level)")
    p.add_argument("--mask-fraction", type=float, default=0.2, help="edit mask coverage of the latent (0..1)")
    p.add_argument("--batch", type=int, default=2, help="batch (2: classifier-free guidance)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: fp16 on CUDA, fp32 on CPU")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: benchmarks/results)")
    args = p.parse_args(argv)
    if not 0 < args.mask_fraction <= 1:
        p.error("--mask-fraction must be in (0, 1]")
    return args


def gather_bytes(index: GatherIndex, rest: int, batch: int, element: int) -> int:
    """Bytes a gather over `index` moves: the rows it reads from each source, the rows it writes, and its index
    tensors (int64 indices, bool flags)."""
    pixels, inside = index.inside.numel(), int(index.inside.sum())
    rows_read = inside  # fresh rows replace recorded ones, which are then not read
    index_bytes = pixels * (INDEX_BYTES + (0 if index.all_inside else 1))
    if index.from_fresh is not None:
        index_bytes += pixels * (INDEX_BYTES + 1)
    return batch * rest * element * (rows_read + pixels) + index_bytes


def build_cases(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """SD-like calls of every kernel at one resolution: conv windows (plain, and with GroupNorm and SiLU fused) and
    a transformer's self-attention (head dims 64 as in SD 2 and 40 as in SD 1.5)."""
    size, channels, batch = args.latent_size, args.channels, args.batch
    res = (size, size)
    element = torch.finfo(dtype).bits // 8
    plan = MaskPlan(ellipse_mask(size, args.mask_fraction, (0.4, 0.6), grid_offset=0).to(device), Policy())
    blocks = plan.layout(res).num_blocks
    layout = SpatialLayout("map", res, (2, 3), (batch, channels, size, size))

    def randn(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    recorded, fresh_full = randn(*layout.shape), randn(*layout.shape)
    fresh = reference.gather_pixels(None, fresh_full, plan.gather_index(ActivePixels(res), False), layout, 0)
    windows = plan.gather_index(ConvWindows(res, res, (3, 3), (1, 1), (1, 1), (1, 1)), True)
    scale, shift = torch.rand(batch, channels, device=device) + 0.5, torch.randn(batch, channels, device=device)

    positions = plan.gather_index(ActivePixels(res), False).recorded_index
    tokens, active = size * size, positions.numel()
    where = f"@{size}x{size}, {channels} ch, {plan.layout(res).active_fraction:.0%} active"
    cases = [
        Case("gather_pixels", f"3x3 conv windows {where}", (fresh, recorded, windows, layout, blocks),
             gather_bytes(windows, channels, batch, element)),
        Case("gather_pixels_affine_silu", f"3x3 conv windows + GroupNorm affine + SiLU {where}",
             ([fresh], [recorded], windows, layout, blocks, scale, shift),
             gather_bytes(windows, channels, batch, element) + 2 * scale.numel() * 4),
    ]
    for head_dim in (64, 40):
        heads = max(1, channels // head_dim)
        q, kf, vf = (randn(batch, heads, active, head_dim) for _ in range(3))
        kr, vr = randn(batch, heads, tokens, head_dim), randn(batch, heads, tokens, head_dim)
        cases.append(Case(
            "active_query_attention", f"self-attention {heads} heads x {head_dim} {where}",
            (q, kf, vf, kr, vr, positions),
            bytes_moved=element * (4 * q.numel() + 2 * (kr.numel() - batch * heads * active * head_dim)),
            flops=4 * batch * heads * active * tokens * head_dim,
        ))
    return cases


def time_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """Median milliseconds per call, after one untimed call (Triton compiles and autotunes in it)."""
    fn()
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    times = []
    deadline = time.perf_counter() + 2.0
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 100):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measured_peaks(device: torch.device, dtype: torch.dtype) -> dict[str, float | None]:
    """What the device achieves with vendor kernels: a 256 MiB copy (GB/s, read plus write) and a square matmul
    (TFLOP/s); on CUDA also the DRAM bandwidth its clocks and bus width allow."""
    source = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    copy_ms = time_ms(lambda: target.copy_(source), device)
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    matmul_ms = time_ms(lambda: a @ b, device)
    peaks: dict[str, float | None] = {
        "copy_gbps_measured": 2 * source.numel() * 4 / copy_ms / 1e6,
        "matmul_tflops_measured": 2 * n**3 / matmul_ms / 1e9,
        "dram_gbps_spec": None,
    }
    if device.type == "cuda":
        import triton.testing

        peaks["dram_gbps_spec"] = triton.testing.get_dram_gbps()
    return peaks


def measure(case: Case, implementation: Any, device: torch.device, peaks: dict) -> dict[str, float]:
    ms = time_ms(lambda: getattr(implementation, case.kernel)(*case.args), device)
    result = {"ms": ms, "gbps": case.bytes_moved / ms / 1e6}
    result["fraction_of_copy_peak"] = result["gbps"] / peaks["copy_gbps_measured"]
    if case.flops:
        result["tflops"] = case.flops / ms / 1e9
        result["fraction_of_matmul_peak"] = result["tflops"] / peaks["matmul_tflops_measured"]
    return result


def device_label(device: torch.device) -> str:
    """The CUDA device's name in file-name form, or ``cpu-<N>core``."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-") or "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu-{cores}core"


def run(args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if cuda else torch.float32)
    triton_implementations = None
    if cuda and kernels.triton_importable():
        from fisedit_compiler.kernels import triton_attention, triton_gather

        triton_implementations = {"triton_gather": triton_gather, "triton_attention": triton_attention}
    peaks = measured_peaks(device, dtype)
    rows = []
    for case in build_cases(args, device, dtype):
        row: dict[str, Any] = {"kernel": case.kernel, "case": case.description, "bytes": case.bytes_moved,
                               "flops": case.flops or None,
                               "reference": measure(case, reference, device, peaks), "triton": None}
        if triton_implementations is not None:
            module = triton_implementations["triton_attention" if "attention" in case.kernel else "triton_gather"]
            row["triton"] = measure(case, module, device, peaks)
            got = getattr(module, case.kernel)(*case.args).float()
            want = getattr(reference, case.kernel)(*case.args).float()
            row["triton"]["max_abs_difference_from_reference"] = (got - want).abs().max().item() if got.numel() else 0.0
            row["triton_speedup"] = row["reference"]["ms"] / row["triton"]["ms"]
        rows.append(row)
    if not cuda:
        note = ("no CUDA device is present: only the PyTorch references were timed (Triton kernels on CPU run in "
                "Triton's interpreter, whose timings mean nothing)")
    elif triton_implementations is None:
        note = "triton is not installed: only the PyTorch references were timed"
    else:
        note = "Triton kernels and PyTorch references timed on CUDA"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "cuda": cuda,
        "note": note,
        "versions": {"torch": torch.__version__, "triton": _triton_version()},
        "config": {"latent_size": args.latent_size, "channels": args.channels, "batch": args.batch,
                   "mask_fraction": args.mask_fraction, "dtype": str(dtype).removeprefix("torch.")},
        "peaks": peaks,
        "kernels": rows,
        "loadavg_at_end": list(os.getloadavg()),  # CPU timings are only as good as the machine was idle
    }


def _triton_version() -> str | None:
    if not kernels.triton_importable():
        return None
    import triton

    return triton.__version__


def render_table(result: dict[str, Any]) -> str:
    lines = [result["note"], "",
             f"{'kernel':<27} {'reference':>20} {'triton':>20}  case",
             f"{'':<27} {'ms':>8} {'GB/s|TF/s':>11} {'ms':>8} {'GB/s|TF/s':>11}"]
    for row in result["kernels"]:
        cells = []
        for name in ("reference", "triton"):
            m = row[name]
            if m is None:
                cells.append(f"{'-':>8} {'-':>11}")
            else:
                rate = f"{m['tflops']:.2f} TF/s" if "tflops" in m else f"{m['gbps']:.1f} GB/s"
                cells.append(f"{m['ms']:>8.3f} {rate:>11}")
        lines.append(f"{row['kernel']:<27} {cells[0]} {cells[1]}  {row['case']}")
    peaks = result["peaks"]
    spec = f", DRAM spec {peaks['dram_gbps_spec']:.0f} GB/s" if peaks["dram_gbps_spec"] else ""
    lines += ["", f"peaks: copy {peaks['copy_gbps_measured']:.1f} GB/s, matmul "
                  f"{peaks['matmul_tflops_measured']:.2f} TFLOP/s{spec}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels-{device_label(torch.device('cuda' if result['cuda'] else 'cpu'))}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(render_table(result))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
