"""How many sparse programs a run of varied masks binds, and what a mask's first call costs, per
`Policy.block_count_steps` (block counts rounded up so that masks of about the same size share a program).

    .venv/bin/python benchmarks/program_reuse.py            # writes benchmarks/results/program-reuse.{json,md}
    .venv/bin/python benchmarks/program_reuse.py --masks 8  # a quick look

On the embedded shapes model's U-Net (one CFG batch of 2, seeded latents and text embeddings, one timestep): per
setting and mask set a fresh `fisedit.compile`, one recorded call, then the set's `--masks` ellipse masks, each
called sparse twice. Two sets, drawn by a fixed seed: "varied" (5-30% of the latents, centres anywhere: different
objects) and "one object" (one centre, 15% +- 15%: the masks that continuous edits of one object detect, each a
little larger or smaller than the last). Reported per set and setting:
the sparse programs bound (a new mask structure binds one: lowering and code generation, on the mask's first
call), the mean first and second call seconds, and the share of the gathered blocks that are repeats (computed
for nothing: the price of sharing). Edits call a mask 14-16 times (a 20-step edit's sparse steps), so a first
call's extra time is spread over them; a program is kept by the compiled model for later edits.

Eager programs (the default) take block counts as arguments, so one serves every mask and N only adds repeated
blocks; the setting is for `--backend inductor`, whose programs take the counts as constants.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import fisedit_compiler as fisedit
from fisedit_compiler.editing.masks import ellipse_mask
from fisedit_compiler.runtime.mask_plan import MaskPlan
from fisedit_compiler.training import quality
from results_io import machine, write_results

SETTINGS = (0, 4, 8, 16)
MASK_SETS = ("varied", "one object")


def masks(kind: str, count: int, size: int, seed: int) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    if kind == "varied":
        return [ellipse_mask(size, float(rng.uniform(0.05, 0.30)), center=tuple(rng.uniform(0.25, 0.75, 2)))
                for _ in range(count)]
    return [ellipse_mask(size, 0.15 * float(rng.uniform(0.85, 1.15)), center=(0.45, 0.55)) for _ in range(count)]


def repeated_share(plan: MaskPlan, resolutions: list[tuple[int, int]]) -> float:
    """Of the pixels the plan's blocks gather at `resolutions`, the share in repeated blocks."""
    layouts = [plan.layout(res) for res in resolutions]
    repeated = sum(layout.repeated * layout.block ** 2 for layout in layouts)
    return repeated / max(1, sum(layout.num_pixels for layout in layouts))


def run_setting(unet, steps: int, mask_list: list[torch.Tensor], inputs: dict, backend: str | None) -> dict:
    compiled = fisedit.compile(unet, fisedit.Policy(block_count_steps=steps, program_backend=backend))
    with torch.no_grad():
        with compiled.record():
            compiled(**inputs)
        first, second, shares, bound = [], [], [], 0
        for mask in mask_list:
            plan = compiled.mask_plan(mask)  # (the same blocks as the call's own plan)
            kept = compiled.variants(inputs).sparse_programs.values()  # (the executor keeps the latest few)
            bound += not any(program.fits(plan) for programs in kept for program in programs)
            with compiled.sparse(mask):
                for times in (first, second):
                    start = time.perf_counter()
                    compiled(**inputs)
                    times.append(time.perf_counter() - start)
            size = mask.shape[-1]
            shares.append(repeated_share(plan, [(size // f, size // f) for f in (1, 2, 4)]))
    return {"block_count_steps": steps, "programs": bound, "first_call_s": float(np.mean(first)),
            "second_call_s": float(np.mean(second)), "repeated_share": float(np.mean(shares))}


def markdown(data: dict) -> str:
    lines = [f"# Sparse programs bound over {data['masks']} masks per set, shapes model U-Net, programs "
             f"{'compiled by ' + data['backend'] if data['backend'] else 'eager'}", "",
             f"Machine: {data['machine']['cpu']}, git {data['machine']['git']}, {data['machine']['date']}. "
             "`benchmarks/program_reuse.py`.", "",
             "| masks | block_count_steps | programs bound | first call (mean) | second call (mean) "
             "| repeated blocks |", "|---|---:|---:|---:|---:|---:|"]
    for r in data["settings"]:
        lines.append(f"| {r['set']} | {r['block_count_steps']} | {r['programs']} | {r['first_call_s'] * 1e3:.0f} ms "
                     f"| {r['second_call_s'] * 1e3:.1f} ms | {r['repeated_share']:.1%} |")
    return "\n".join(lines) + "\n"


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default=",".join(map(str, SETTINGS)), help="block_count_steps values")
    parser.add_argument("--sets", default=",".join(MASK_SETS))
    parser.add_argument("--backend", default=None, help="Policy.program_backend (e.g. inductor: a compile per "
                        "program bound)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = quality.load_shapes_pipeline().unet
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(args.seed)
    inputs = {"sample": torch.randn(2, unet.config.in_channels, size, size, generator=generator),
              "timestep": torch.tensor(500.0),
              "encoder_hidden_states": torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)}
    settings = []
    for kind in args.sets.split(","):
        mask_list = masks(kind, args.masks, size, args.seed)
        settings += [{"set": kind, **run_setting(unet, int(steps), mask_list, inputs, args.backend)}
                     for steps in args.settings.split(",")]
    data = {"machine": machine(), "masks": args.masks, "seed": args.seed, "backend": args.backend,
            "settings": settings}
    write_results(args.out, "program-reuse" + (f"_{args.backend}" if args.backend else ""), data, markdown(data))
    return data


if __name__ == "__main__":
    main()
