"""What an edit's policy settings cost and buy on the embedded shapes model: EEdit's periodic refresh
(`Policy.refresh_every`), a halo in latent pixels (`Policy.halo_unit`) and temporal reuse of the deep levels
(`Policy.deep_reuse_interval`). The edits' pictures are decoded sparse (the session's default), the dense edit
they are compared with densely.

    .venv/bin/python benchmarks/edit_settings.py             # writes benchmarks/results/edit-settings.{json,md}
    .venv/bin/python benchmarks/edit_settings.py --seeds 1   # a quick look

For each edit case of `training.quality.EDIT_CASES` and seed: the source generation, an edit with a detected mask
(default policy) to find the region, then that region given as a user mask (every step after the switch sparse)
under each setting. Reported: the PSNR inside the mask against the dense edit with the same mask and blend
(what the sparse approximations cost), and the edit's U-Net MACs against a dense regeneration.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fisedit_compiler.policy import Policy
from fisedit_compiler.training import quality
from results_io import machine, write_results

SETTINGS = {
    "default policy": {},
    "halo 1 cell at every resolution": {"halo": 1, "halo_unit": "cells"},
    "halo 1 latent pixel": {"halo": 1, "halo_unit": "latent_pixels"},
    "halo 2 latent pixels": {"halo": 2, "halo_unit": "latent_pixels"},
    "blocks of 4": {"block_size": 4},
    "refresh every 4 steps": {"refresh_every": 4},
    "refresh every 2 steps": {"refresh_every": 2},
    "deep levels reused every 2 sparse steps": {"deep_reuse_interval": 2},
    "deep levels reused every 3 sparse steps": {"deep_reuse_interval": 3},
}


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
    unets = quality._CompiledUNets(pipe)
    rows = []
    for case in quality.EDIT_CASES:
        for seed in range(args.seeds):
            session = unets.session(Policy(), args.steps)
            source = session.generate(case.prompt(case.old), generator=torch.Generator().manual_seed(seed))
            dense_macs = source.stats["dense"].macs
            region = session.edit(case.prompt(case.new)).mask
            if region is None or not region.any() or region.all():
                continue
            reference = None
            for name, fields in SETTINGS.items():
                session = unets.session(Policy(**fields), args.steps)
                session.generate(case.prompt(case.old), generator=torch.Generator().manual_seed(seed))
                trajectory = session.source_trajectory
                edit = session.edit(case.prompt(case.new), mask=region)
                if reference is None:
                    reference = quality._dense_blended_edit(session, case.prompt(case.new), region, trajectory)
                image = np.asarray(edit.images[0].convert("RGB"))
                macs = sum(edit.stats[p].macs for p in ("dense", "sparse") if p in edit.stats)
                rows.append({
                    "edit": case.prompt(case.new), "seed": seed, "setting": name,
                    "mask_fraction": float(region.float().mean()),
                    "psnr_in_mask": quality.psnr(image, reference, quality._latent_mask_to_image(region, image.shape[:2])),
                    "macs_vs_dense": macs / dense_macs,
                    "dense_calls": edit.stats["dense"].unet_calls if "dense" in edit.stats else 0,
                })
                print(rows[-1], flush=True)
    summary = {name: {key: float(np.mean([r[key] for r in rows if r["setting"] == name and np.isfinite(r[key])]))
                      for key in ("psnr_in_mask", "macs_vs_dense", "dense_calls")} for name in SETTINGS}
    data = {
        "model": quality.model_label(args.model), "steps": args.steps, "policy": _policy_label(Policy()),
        "edits": len(rows) // len(SETTINGS),
        "summary": summary, "rows": rows, "seconds": time.perf_counter() - start, "machine": machine(),
    }
    write_results(args.out, "edit-settings", data, _format(data))


def _policy_label(policy: Policy) -> str:
    """The policy fields the settings above change, as they are by default."""
    blocks = "chosen by the cost model" if policy.block_size is None else f"of {policy.block_size}"
    unit = "cell" if policy.halo_unit == "cells" else "latent pixel"
    reuse = policy.deep_reuse_interval if policy.deep_reuse_interval > 1 else "off"
    return (f"blocks {blocks}, halo {policy.halo} {unit}{'s' if policy.halo != 1 else ''}, refresh "
            f"{policy.refresh_every or 'off'}, deep reuse {reuse}")


def _format(data: dict) -> str:
    lines = [
        "# Edit settings: what they cost and buy",
        "",
        f"Model `{data['model']}`, {data['edits']} edits (the detected region of each given as a user mask: every "
        f"step sparse), {data['steps']} DDIM steps; each setting changes the default policy (`fisedit.Policy()`: "
        f"{data['policy']}) in the fields named; {data['machine']['date']}, git "
        f"{data['machine']['git']}, {data['seconds']:.0f} s. `benchmarks/edit_settings.py`.",
        "",
        "| setting | dense steps per edit | U-Net MACs vs a dense regeneration | PSNR in the mask vs the dense edit (dB) |",
        "|---|---:|---:|---:|",
    ]
    for name, s in data["summary"].items():
        lines.append(f"| {name} | {s['dense_calls']:.1f} | {100 * s['macs_vs_dense']:.0f}% | {s['psnr_in_mask']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
