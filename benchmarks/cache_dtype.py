"""What half-precision cache storage (`Policy.cache_dtype`) costs in accuracy, and saves in bytes.

    .venv/bin/python benchmarks/cache_dtype.py             # writes benchmarks/results/cache-dtype.{json,md}
    .venv/bin/python benchmarks/cache_dtype.py --seeds 1   # a quick look

On the embedded shapes model (an fp32 pipeline): each edit case of `training.quality.EDIT_CASES` (one attribute
changed, mask detected), seeded, run as a session (generate, edit) with the cache stored in float32 (the reference:
sparse calls read exactly what the source run computed), float16 and bfloat16. Reported per dtype: the cache bytes
per step, the largest difference of the edit's final latents from the float32 session's, and the PSNR of the
edited picture against the float32 session's (outside the recomputed region the latents are the source's in
every case, so the difference is inside it).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import fisedit_compiler as fisedit
from fisedit_compiler.editing.session import EditSession
from fisedit_compiler.training import quality
from results_io import machine, write_results

DTYPES = (None, "float16", "bfloat16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(quality.SHAPES_MODEL))
    parser.add_argument("--seeds", type=int, default=2, help="seeds per edit case")
    parser.add_argument("--steps", type=int, default=quality.STEPS)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    start = time.perf_counter()
    pipe = quality.load_shapes_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for case in quality.EDIT_CASES:
        for seed in range(args.seeds):
            results = {}
            for dtype in DTYPES:
                session = EditSession(pipe, policy=fisedit.Policy(cache_dtype=dtype), num_inference_steps=args.steps,
                                      guidance_scale=quality.GUIDANCE)
                session.generate(case.prompt(case.old), generator=torch.Generator().manual_seed(seed))
                edit = session.edit(case.prompt(case.new))
                results[dtype] = (edit, session.cache.nbytes / max(1, len(session.cache.steps)))
            reference, _ = results[None]
            for dtype, (edit, step_bytes) in results.items():
                rows.append({
                    "edit": case.prompt(case.new), "seed": seed, "dtype": dtype or "float32",
                    "region_fraction": float(reference.region.float().mean()) if reference.region is not None else 0.0,
                    "same_region": bool(edit.region is not None and reference.region is not None
                                        and torch.equal(edit.region, reference.region)),
                    "cache_bytes_per_step": step_bytes,
                    "max_abs_latent_diff": float((edit.latents - reference.latents).abs().max()),
                    "psnr_vs_float32": quality.psnr(np.asarray(edit.images[0]), np.asarray(reference.images[0])),
                })
                print(rows[-1], flush=True)
    summary = {}
    for dtype in DTYPES:
        name = dtype or "float32"
        mine = [r for r in rows if r["dtype"] == name]
        finite = [r["psnr_vs_float32"] for r in mine if np.isfinite(r["psnr_vs_float32"])]
        summary[name] = {
            "cache_bytes_per_step": float(np.mean([r["cache_bytes_per_step"] for r in mine])),
            "max_abs_latent_diff": float(max(r["max_abs_latent_diff"] for r in mine)),
            "mean_psnr_vs_float32": float(np.mean(finite)) if finite else float("inf"),
            "min_psnr_vs_float32": float(min(finite)) if finite else float("inf"),
            "same_region_rate": float(np.mean([r["same_region"] for r in mine])),
        }
    data = {
        "model": quality.model_label(args.model), "steps": args.steps, "edits": len(rows) // len(DTYPES),
        "summary": summary, "rows": rows, "seconds": time.perf_counter() - start, "machine": machine(),
    }
    write_results(args.out, "cache-dtype", data, _format(data))


def _format(data: dict) -> str:
    lines = [
        "# Half-precision cache storage: bytes and accuracy",
        "",
        f"Model `{data['model']}` (fp32), {data['edits']} edits with detected masks, {data['steps']} DDIM steps; "
        f"{data['machine']['date']}, git {data['machine']['git']}, {data['seconds']:.0f} s. "
        "`benchmarks/cache_dtype.py`.",
        "",
        "| cache_dtype | MiB per step | same detected region as float32 | max latent difference | "
        "PSNR of the edit vs float32 storage (mean / worst, dB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in data["summary"].items():
        quality_text = "exact (the reference)" if name == "float32" else (
            f"{s['mean_psnr_vs_float32']:.1f} / {s['min_psnr_vs_float32']:.1f}")
        lines.append(f"| {name} | {s['cache_bytes_per_step'] / 2**20:.1f} | {100 * s['same_region_rate']:.0f}% | "
                     f"{s['max_abs_latent_diff']:.4f} | {quality_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
