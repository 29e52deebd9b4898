"""What the embedded shapes model draws and how well FISEdit edits it (issue 15's semantic check).

    .venv/bin/python benchmarks/shapes_quality.py                 # writes benchmarks/results/shapes-quality.{json,md}
    .venv/bin/python benchmarks/shapes_quality.py --n 10 --seeds 1 --out /tmp/q   # a quick look

Measured with the pixel evaluator (`fisedit_compiler.training.evaluator`) on seeded generations of the shipped
model (`fisedit_compiler/assets/shapes`, or `--model DIR`); see `fisedit_compiler.training.quality` for each figure.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from fisedit_compiler.training import quality
from results_io import machine, write_results


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.0f}%"


def _format(data: dict) -> str:
    g, e = data["generation"], data["edits"]["summary"]
    lines = [
        "# The shapes model: generation and editing quality",
        "",
        f"Model `{data['model']}`, {data['steps']} DDIM steps, guidance {quality.GUIDANCE}, seeded; "
        f"{data['machine']['date']}, git {data['machine']['git']}, {data['seconds']:.0f} s.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| one-object prompts: named colour and shape found ({g['one_object_n']} generations) | "
        f"{100 * g['one_object_rate']:.0f}% |",
        f"| two-object prompts: both objects found ({g['two_object_n']} generations) | "
        f"{_percent(g['two_object_both_rate'])} |",
        f"| two-object prompts: objects found, of those named | {_percent(g['two_object_mean_found'])} |",
        f"| edits ({e['edits']}): source object found | {100 * e['source_object_rate']:.0f}% |",
        f"| edits: new attribute found | {100 * e['new_attribute_rate']:.0f}% |",
        "| edits: detected mask IoU with the changed object (mean) | "
        + (f"{e['mean_mask_iou']:.2f} |" if e["mean_mask_iou"] is not None else "n/a |"),
        "| edits: recomputed region (detected mask, halo, blocks) IoU with the changed object (mean) | "
        + (f"{e['mean_region_iou']:.2f} |" if e.get("mean_region_iou") is not None else "n/a |"),
        f"| edits: detected mask, share of the latents (mean) | {100 * e.get('mean_detected_fraction', 0):.1f}% |",
        f"| edits: recomputed region, share of the latents (mean) | {100 * e['mean_mask_fraction']:.1f}% |",
        f"| edits: latents outside the region bit-identical to the source | {e['outside_bit_identical']} |",
        f"| sparse edit: share of pixels that changed (> 24/255) | {100 * e['mean_sparse_changed_fraction']:.1f}% |",
        f"| dense regeneration of the edited prompt: share of pixels that changed | "
        f"{100 * e['mean_dense_changed_fraction']:.1f}% |",
        "",
        "PSNR inside the detected region, given as a user mask (its halo and blocks recomputed as context), sparse "
        "edit vs the dense edit with the same mask and blend (higher: closer to exact):",
        "",
        "| policy | PSNR (dB) |",
        "|---|---:|",
    ]
    for name, value in e["mean_psnr_in_mask"].items():
        lines.append(f"| {name} | {value:.1f} |" if math.isfinite(value) else f"| {name} | exact |")
    lines += ["", "Per edit:", "",
              "| source | edit | seed | region % | mask IoU | region IoU | new found | dense changed % |",
              "|---|---|---:|---:|---:|---:|---|---:|"]
    for r in data["edits"]["edits"]:
        iou, region_iou = (f"{r[name]:.2f}" if name in r else "-" for name in ("mask_iou", "region_iou"))
        lines.append(f"| {r['source']} | {r['edit']} | {r['seed']} | {100 * r['mask_fraction']:.1f} | {iou} | "
                     f"{region_iou} | {r['new_found']} | {100 * r['dense_changed_fraction']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(quality.SHAPES_MODEL))
    parser.add_argument("--n", type=int, default=50, help="one-object generations")
    parser.add_argument("--n-two", type=int, default=30, help="two-object generations")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per edit case")
    parser.add_argument("--steps", type=int, default=quality.STEPS)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    pipe = quality.load_shapes_pipeline(args.model)
    generation = quality.generation_rates(pipe, n=args.n, n_two=args.n_two, steps=args.steps)
    print(generation, flush=True)
    edits = quality.edit_quality(pipe, seeds=tuple(range(args.seeds)), steps=args.steps)
    print(edits["summary"], flush=True)
    data = {
        "model": quality.model_label(args.model), "steps": args.steps, "generation": generation, "edits": edits,
        "seconds": time.perf_counter() - start, "machine": machine(),
    }
    write_results(args.out, "shapes-quality", data, _format(data))


if __name__ == "__main__":
    main()
