#!/usr/bin/env python
"""Seconds to an edited image with a ControlNet, against the plain edit (issue 45).

    python benchmarks/controlnet_edit.py          # SD 1.5 at 512x512 (64x64 latents), 20 DDIM steps, 15% mask
    python benchmarks/controlnet_edit.py --size tiny --latent-size 16 --steps 4 --out /tmp/c   # a smoke run

One process, random weights (`models.random_pipeline`, and a ControlNet made from its U-Net with
`ControlNetModel.from_unet`, its zero-initialised residual projections given weights), DDIM, CFG 7.5, fp32, the same
initial latents for every run, a canny-like control image (the outlines of a few seeded rectangles). For the plain
pipeline and for the ControlNet pipeline in turn:

- dense: the pipeline generating the edited prompt, eager (what a user without this project runs);
- DeepCache: the same with `DeepCacheSDHelper` (cache interval `--deepcache-interval`, branch 0) over the eager U-Net,
  when the `DeepCache` package is installed (the ControlNet still runs at every step: DeepCache caches the U-Net's
  deep levels only);
- ours: an `EditSession` generates the source prompt (recorded, paid once per source), then edits it to the edited
  prompt with an ellipse user mask (`keep=False`; an untimed edit first binds the mask's programs). Over the
  ControlNet pipeline the session compiles the ControlNet beside the U-Net (`editing/companions.py`).

Goal (issue 45): the ControlNet edit's speed-up over its dense regeneration within 10 % of the plain edit's.
Timings of one run each, in the order listed.
Results: ``<out>/controlnet-edit_<arch>-<size>-<latent>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edit_setup import DEEPCACHE_MISSING, add_edit_arguments, deepcache, deepcache_available  # noqa: E402
from results_io import machine, write_results  # noqa: E402

import fisedit_compiler as fisedit  # noqa: E402
from fisedit_compiler.editing.masks import ellipse_mask  # noqa: E402
from fisedit_compiler.models import random_pipeline  # noqa: E402
from fisedit_compiler.models.controlnet import controlnet_pipeline, random_controlnet  # noqa: E402

SOURCE = "a cabin in the woods at dusk, warm light in the windows"
EDITED = "a cabin in the woods at dusk, warm light in the windows, a river in front"


def control_image(size: int, seed: int = 0):
    """A canny-like edge map: the outlines of seeded rectangles, white on black."""
    from PIL import Image, ImageDraw

    g = np.random.RandomState(seed)
    image = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = g.randint(0, size * 3 // 4, 2)
        x1, y1 = x0 + g.randint(size // 8, size // 3), y0 + g.randint(size // 8, size // 3)
        draw.rectangle([int(x0), int(y0), int(x1), int(y1)], outline=(255, 255, 255), width=max(1, size // 128))
    return image


def measure(pipe, args, latents, mask, control) -> dict:
    extra = {} if control is None else {"image": control}
    eager = {"unet": pipe.unet, "controlnet": getattr(pipe, "controlnet", None)}  # the session compiles them in place

    def regenerate() -> float:
        start = time.perf_counter()
        pipe(EDITED, latents=latents.clone(), num_inference_steps=args.steps, guidance_scale=7.5, **extra)
        return time.perf_counter() - start

    dense = regenerate()
    if deepcache_available():
        with deepcache(pipe, args.deepcache_interval):
            cached = {"seconds": regenerate(), "interval": args.deepcache_interval}
    else:
        cached = {"skipped": DEEPCACHE_MISSING}
    session = fisedit.EditSession(pipe, num_inference_steps=args.steps, guidance_scale=7.5)
    start = time.perf_counter()
    session.generate(SOURCE, latents=latents.clone(), **({} if control is None else {"control_image": control}))
    source = time.perf_counter() - start
    session.edit(EDITED, mask=mask, keep=False)  # binds the mask's programs
    start = time.perf_counter()
    result = session.edit(EDITED, mask=mask, keep=False)
    edit = time.perf_counter() - start
    memory = session.memory_breakdown()
    session.close()
    for name, model in eager.items():
        if model is not None:
            setattr(pipe, name, model)
    return {"dense_seconds": dense, "deepcache": cached, "source_seconds": source, "edit_seconds": edit,
            "speedup": dense / edit,
            "unet_calls": {k: v.unet_calls for k, v in result.stats.items() if hasattr(v, "unet_calls")},
            "cache_bytes": {k: v for k, v in memory.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_edit_arguments(p)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    base = random_pipeline(args.arch, latent_size=args.latent_size, size=args.size)
    latents = torch.randn(1, 4, args.latent_size, args.latent_size, generator=torch.Generator().manual_seed(1))
    mask = ellipse_mask(args.latent_size, args.mask / 100, (0.45, 0.55), aspect=1.3, exact=True)
    control = control_image(8 * args.latent_size)
    with torch.no_grad():
        plain = measure(base, args, latents, mask, None)
        print(f"plain: dense {plain['dense_seconds']:.1f} s, edit {plain['edit_seconds']:.1f} s", flush=True)
        pipe = controlnet_pipeline(base, random_controlnet(base.unet, std=0.02))
        with_controlnet = measure(pipe, args, latents, mask, control)
    data = {"machine": machine(), "arch": args.arch, "size": args.size, "latent_size": args.latent_size,
            "steps": args.steps, "mask": mask.float().mean().item(), "plain": plain, "controlnet": with_controlnet,
            "relative": with_controlnet["speedup"] / plain["speedup"]}
    m = data["machine"]
    lines = [f"# An edit with a ControlNet against the plain edit ({args.arch}, {args.size}, {args.latent_size}² "
             f"latents, {args.steps} DDIM steps, {data['mask']:.1%} ellipse mask)", "",
             f"{m['date']}, git {m['git']}, {m['cpu']}, {m['threads']} threads, torch {m['torch']}. Produced by "
             "`benchmarks/controlnet_edit.py`.", "",
             "| pipeline | dense regeneration | DeepCache regeneration | source (recorded) | edit | speed-up over "
             "dense | over DeepCache |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in (("plain", plain), ("with a ControlNet", with_controlnet)):
        cached = r["deepcache"].get("seconds")
        lines.append(f"| {name} | {r['dense_seconds']:.1f} s | " + ("-" if cached is None else f"{cached:.1f} s")
                     + f" | {r['source_seconds']:.1f} s | {r['edit_seconds']:.1f} s | {r['speedup']:.2f}x | "
                     + ("-" if cached is None else f"{cached / r['edit_seconds']:.2f}x") + " |")
    lines += ["", f"The ControlNet edit's speed-up is {data['relative']:.0%} of the plain edit's (goal: at least 90 %). "
              f"Cache: {with_controlnet['cache_bytes'].get('controlnet', 0) / 2**30:.2f} GiB of ControlNet records "
              "beside the U-Net's.", ""]
    write_results(args.out, f"controlnet-edit_{args.arch}-{args.size}-{args.latent_size}", data, "\n".join(lines))
    return data


if __name__ == "__main__":
    main()
