#!/usr/bin/env python
"""Seconds to an edited image: what a user would pick instead, against this project's edit (issue 14).

    python benchmarks/edit_vs_alternatives.py      # SD 1.5 at 512x512 (64x64 latents), 20 DDIM steps, 15% mask
    python benchmarks/edit_vs_alternatives.py --size tiny --latent-size 16 --steps 4 --out /tmp/e   # a smoke run

One process, a random-weight pipeline of the architecture (`models.random_pipeline`), DDIM, CFG 7.5, fp32, the
same initial latents for every run:

- dense: the pipeline generating the edited prompt (eager U-Net, eager decode), as a user without this project;
- dense, compiled: the same with the U-Net under `torch.compile` (Inductor; `--no-torch-compile` skips it), run
  twice: the first run compiles (reported), the second is the figure;
- DeepCache: the same with `DeepCacheSDHelper` (cache interval `--deepcache-interval`, branch 0), when the
  `DeepCache` package is installed;
- like for like: dense and DeepCache again with the U-Net's linear layers through oneDNN, the GEMM library our
  programs use on a CPU (`edit_setup.onednn_linears`; stock PyTorch multiplies them with MKL's BLAS), on a CPU;
- ours: an `EditSession` generates the source prompt (recorded: reported, paid once per source), then edits it
  to the edited prompt with an ellipse user mask, once per `--reuse` interval (`Policy.deep_reuse_interval`), each
  a try of the same source (`edit(keep=False)`), the image decoded sparse;
- head to head: then `--pairs` more DeepCache generations and edits at the first `--reuse` interval, alternated
  (ABBA), and the median of the per-pair ratios: the host's speed drifts by 10-20 % over the half hour that the
  runs above take, which the single runs read as a difference between contenders.

An untimed edit first binds the mask's sparse programs. The session is compiled with the largest interval, so
that every interval runs the same variants (interval 1 then runs the full calls' variant, which also hands the deep
outputs on: one scatter per cut more than a policy without reuse). Fidelity: PSNR inside the mask of each picture
against the interval-1 edit decoded densely (ours), and of DeepCache's against the dense generation. Results:
``<out>/edit-vs-alternatives_<arch>-<size>-<latent>.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling results_io, also when a test imports this file
from edit_setup import (DEEPCACHE_MISSING, add_edit_arguments, deepcache, deepcache_available,  # noqa: E402
                        onednn_linears)
from results_io import allocator_note, machine, set_up_allocator, write_results  # noqa: E402

import fisedit_compiler as fisedit  # noqa: E402
from fisedit_compiler.editing.masks import ellipse_mask  # noqa: E402
from fisedit_compiler.models import random_pipeline  # noqa: E402
from fisedit_compiler.training.quality import psnr  # noqa: E402

SOURCE = "a cabin in the woods at dusk, warm light in the windows"
EDITED = "a cabin in the woods at dusk, warm light in the windows, a river in front"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_edit_arguments(p)
    p.add_argument("--reuse", default="1,2,3", help="Policy.deep_reuse_interval values to edit with")
    p.add_argument("--pairs", type=int, default=2,
                   help="DeepCache generations and our edits timed again, alternated (0: none)")
    p.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                   help="skip the dense pipeline with its U-Net under torch.compile")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    set_up_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    intervals = [int(v) for v in args.reuse.split(",")]
    n = args.latent_size
    pipe = random_pipeline(args.arch, latent_size=n, seed=0, size=args.size, scheduler="ddim")
    latents = torch.randn(1, 4, n, n, generator=torch.Generator().manual_seed(0))
    common = {"num_inference_steps": args.steps, "guidance_scale": 7.5, "height": 8 * n, "width": 8 * n}
    mask = ellipse_mask(n, args.mask / 100, exact=True)
    pixels = np.kron(mask.numpy(), np.ones((8, 8), dtype=bool))
    runs: dict[str, dict] = {}

    def timed(fn):
        start = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - start

    with torch.no_grad():
        dense, seconds = timed(lambda: pipe(EDITED, latents=latents.clone(), **common).images[0])
    runs["dense"] = {"seconds": seconds}
    dense = np.asarray(dense)
    if args.torch_compile:
        eager_unet = pipe.unet
        pipe.unet = torch.compile(eager_unet)
        try:
            with torch.no_grad():
                _, first = timed(lambda: pipe(EDITED, latents=latents.clone(), **common))
                image, seconds = timed(lambda: pipe(EDITED, latents=latents.clone(), **common).images[0])
        finally:
            pipe.unet = eager_unet
        runs["dense_compiled"] = {"seconds": seconds, "first_run_seconds": first,
                                  "psnr_vs_dense": psnr(np.asarray(image), dense, np.ones_like(pixels))}
    if not deepcache_available():
        runs["deepcache"] = {"skipped": DEEPCACHE_MISSING}
    else:
        def deepcache_run():
            with deepcache(pipe, args.deepcache_interval), torch.no_grad():
                return timed(lambda: pipe(EDITED, latents=latents.clone(), **common).images[0])

        image, seconds = deepcache_run()
        runs["deepcache"] = {"seconds": seconds, "interval": args.deepcache_interval,
                             "psnr_in_mask_vs_dense": psnr(np.asarray(image), dense, pixels),
                             "psnr_vs_dense": psnr(np.asarray(image), dense, np.ones_like(pixels))}
    if pipe.device.type == "cpu":  # like for like: the programs' GEMM library
        with onednn_linears(pipe.unet), torch.no_grad():
            image, seconds = timed(lambda: pipe(EDITED, latents=latents.clone(), **common).images[0])
            runs["dense_onednn"] = {"seconds": seconds,
                                    "psnr_vs_dense": psnr(np.asarray(image), dense, np.ones_like(pixels))}
            if "seconds" in runs["deepcache"]:
                image, seconds = deepcache_run()
                runs["deepcache_onednn"] = {"seconds": seconds, "interval": args.deepcache_interval,
                                            "psnr_vs_dense": psnr(np.asarray(image), dense, np.ones_like(pixels))}

    policy = fisedit.Policy(deep_reuse_interval=max(intervals))
    session = fisedit.EditSession(pipe, policy, num_inference_steps=args.steps, guidance_scale=7.5,
                                  height=8 * n, width=8 * n)
    _, seconds = timed(lambda: session.generate(SOURCE, latents=latents.clone()))
    runs["source_run"] = {"seconds": seconds, "cache_bytes": session.cache.nbytes,
                          "cache_tier": cache_tier(session.cache.store)}
    # An untimed try first: it binds the sparse programs of this mask (full and reuse calls), which a session does
    # once per mask structure, so that the timed edits compare the steps themselves.
    _, runs["source_run"]["first_edit_seconds"] = timed(lambda: session.edit(EDITED, mask=mask, keep=False))
    reference = None
    for interval in intervals:
        session.unet.policy = dataclasses.replace(policy, deep_reuse_interval=interval)
        result, seconds = timed(lambda: session.edit(EDITED, mask=mask, keep=False))
        image = np.asarray(result.images[0])
        if reference is None:  # the first interval's edit, decoded densely
            with torch.no_grad():
                decoded = pipe.vae.decode(result.latents / pipe.vae.config.scaling_factor).sample
            reference = np.asarray(pipe.image_processor.postprocess(decoded, output_type="pil")[0])
        sparse = result.stats.get("sparse")
        decode = result.stats.get("decode")
        runs[f"ours_reuse{interval}"] = {
            "seconds": seconds, "interval": interval,
            "unet_seconds": sparse.seconds if sparse else 0.0, "unet_macs": sparse.macs if sparse else 0,
            "decode_seconds": decode.seconds if decode else None, "decode_mode": decode.mode if decode else None,
            "decode_recomputed": decode.recomputed if decode else None,
            "psnr_in_mask_vs_reference": psnr(image, reference, pixels),
            "cache_tier": cache_tier(session.cache.store),
        }
    if args.pairs and "seconds" in runs["deepcache"]:
        runs["head_to_head"] = head_to_head(args.pairs, deepcache_run, session, mask,
                                            dataclasses.replace(policy, deep_reuse_interval=intervals[0]))
    session.unet.policy = policy
    stock = ("dense", "dense_compiled", "deepcache")
    fastest = min(runs[k]["seconds"] for k in stock if "seconds" in runs.get(k, {}))
    like = [runs[k]["seconds"] for k in (*stock, "dense_onednn", "deepcache_onednn") if "seconds" in runs.get(k, {})]
    for key, run in runs.items():
        if key.startswith("ours"):
            run["speedup_vs_fastest_alternative"] = fastest / run["seconds"]
            run["speedup_vs_fastest_like_for_like"] = min(like) / run["seconds"]
    data = {"machine": machine(), "arch": args.arch, "size": args.size, "latent_size": n, "steps": args.steps,
            "mask_percent": args.mask, "source_prompt": SOURCE, "edited_prompt": EDITED, "runs": runs}
    write_results(args.out, f"edit-vs-alternatives_{args.arch}-{args.size}-{n}", data, _format(data))
    return data


def cache_tier(store) -> dict:
    """Where the session's cache lives so far: its memory budget, steps written to disk and read back, seconds the
    U-Net waited for the disk (a `TieredStore`; an unbounded store keeps everything in memory)."""
    if not hasattr(store, "budget_bytes"):
        return {"budget_bytes": None, "spilled_steps": 0, "loaded_steps": 0, "wait_seconds": 0.0}
    return {"budget_bytes": store.budget_bytes, "spilled_steps": store.spilled, "loaded_steps": store.loaded,
            "wait_seconds": store.wait_seconds}


def _tier_text(tier: dict) -> str:
    if tier["budget_bytes"] is None:
        return "cache in memory"
    return (f"cache budget {tier['budget_bytes'] / 2**30:.1f} GiB, steps written to disk so far "
            f"{tier['spilled_steps']}, read back {tier['loaded_steps']}, {tier['wait_seconds']:.1f} s waited for them")


def head_to_head(pairs: int, deepcache_run, session, mask, policy) -> dict:
    """DeepCache generations (stock, and with the U-Net's linear layers through oneDNN on a CPU) and our edits (at
    `policy`) alternated, in one order and then the reverse: seconds of each, and the medians of the per-round
    ratios DeepCache / ours. The pipeline runs DeepCache on the eager U-Net, our edit on the session's."""
    pipe, compiled = session.pipe, session.unet
    eager_unet = compiled.unet
    names = ["deepcache", *(["deepcache_onednn"] if compiled.device.type == "cpu" else []), "ours"]
    seconds: dict[str, list[float]] = {name: [] for name in names}

    def run(name):
        if name == "ours":
            compiled.policy = policy
            start = time.perf_counter()
            session.edit(EDITED, mask=mask, keep=False)
            seconds["ours"].append(time.perf_counter() - start)
            return
        pipe.unet = eager_unet
        try:
            with onednn_linears(eager_unet) if name == "deepcache_onednn" else contextlib.nullcontext():
                seconds[name].append(deepcache_run()[1])
        finally:
            pipe.unet = compiled

    for i in range(pairs):
        for name in (names if i % 2 == 0 else names[::-1]):
            run(name)
    result = {"pairs": pairs, "reuse_interval": policy.deep_reuse_interval,
              **{f"{name}_seconds": values for name, values in seconds.items()}}
    for name in names[:-1]:
        ratios = [d / o for d, o in zip(seconds[name], seconds["ours"])]
        suffix = name.removeprefix("deepcache")
        result[f"speedup_vs_deepcache{suffix}_pairs"] = ratios
        result[f"speedup_vs_deepcache{suffix}"] = statistics.median(ratios)
    return result


def _format(data: dict) -> str:
    m, runs = data["machine"], data["runs"]
    lines = [
        f"# Seconds to the edited image: {data['arch']} ({data['size']}) at {8 * data['latent_size']}x"
        f"{8 * data['latent_size']}, {data['steps']} DDIM steps, CFG 7.5, fp32, random weights, "
        f"{data['mask_percent']:g}% ellipse user mask",
        "",
        f"{m['date']}, git {m['git']}, {m.get('cpu', 'CPU not recorded')}, torch {m['torch']}, {m['threads']} threads"
        f"{allocator_note(m)}. "
        "`benchmarks/edit_vs_alternatives.py`.",
        "",
        "| run | seconds to the image | vs the fastest alternative | PSNR in the mask (dB) | notes |",
        "|---|---:|---:|---:|---|",
        f"| dense generation of the edited prompt | {runs['dense']['seconds']:.1f} | | | eager pipeline |",
    ]
    if "dense_compiled" in runs:
        compiled = runs["dense_compiled"]
        lines.append(f"| dense generation, U-Net under `torch.compile` | {compiled['seconds']:.1f} | | | first run "
                     f"(compiling) {compiled['first_run_seconds']:.1f} s; whole image {compiled['psnr_vs_dense']:.1f} "
                     "dB vs dense |")
    deepcache = runs["deepcache"]
    if "skipped" in deepcache:
        lines.append(f"| DeepCache | - | | | {deepcache['skipped']} |")
    else:
        lines.append(f"| DeepCache (interval {deepcache['interval']}) | {deepcache['seconds']:.1f} | | "
                     f"{deepcache['psnr_in_mask_vs_dense']:.1f} vs dense | whole image "
                     f"{deepcache['psnr_vs_dense']:.1f} dB vs dense |")
    for key, what in (("dense_onednn", "dense generation"), ("deepcache_onednn", "DeepCache")):
        if key in runs:
            lines.append(f"| {what}, linear layers through oneDNN (like for like) | {runs[key]['seconds']:.1f} | | | "
                         f"whole image {runs[key]['psnr_vs_dense']:.1f} dB vs dense |")
    for key, run in runs.items():
        if not key.startswith("ours"):
            continue
        decode = (f"decode {run['decode_mode']} {run['decode_seconds']:.1f} s"
                  + (f" ({100 * run['decode_recomputed']:.0f}% of pixels)" if run["decode_mode"] == "sparse" else ""))
        like = run["speedup_vs_fastest_like_for_like"]
        lines.append(f"| our edit, deep reuse every {run['interval']} | {run['seconds']:.1f} | "
                     f"{run['speedup_vs_fastest_alternative']:.2f}x (like for like {like:.2f}x) | "
                     f"{run['psnr_in_mask_vs_reference']:.1f} vs "
                     f"reuse 1 decoded dense | U-Net {run['unet_seconds']:.1f} s, {decode}; "
                     f"{_tier_text(run['cache_tier'])} |")
    if "head_to_head" in runs:
        h = runs["head_to_head"]
        lines += ["", f"Head to head, {h['pairs']} pairs alternated (ABBA) after the runs above: DeepCache "
                  + ", ".join(f"{v:.1f}" for v in h["deepcache_seconds"]) + " s; our edit (deep reuse every "
                  f"{h['reuse_interval']}) " + ", ".join(f"{v:.1f}" for v in h["ours_seconds"])
                  + f" s: **{h['speedup_vs_deepcache']:.2f}x** faster than DeepCache (median of the per-pair "
                  "ratios; the single runs above are minutes apart, and this host's speed drifts by 10-20 % over "
                  "minutes)."]
        if "deepcache_onednn_seconds" in h:
            lines[-1] += (" DeepCache with the linear layers through oneDNN in the same rounds: "
                          + ", ".join(f"{v:.1f}" for v in h["deepcache_onednn_seconds"])
                          + f" s: our edit **{h['speedup_vs_deepcache_onednn']:.2f}x** faster, like for like.")
    source = runs["source_run"]
    lines += ["", f"The source run (recorded, once per source picture): {source['seconds']:.1f} s, cache "
              f"{source['cache_bytes'] / 2**30:.2f} GiB ({_tier_text(source['cache_tier'])}). A first, untimed edit "
              "bound the mask's sparse programs: "
              f"{source['first_edit_seconds']:.1f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
