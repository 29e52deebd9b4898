#!/usr/bin/env python
"""What recording costs a user: a source run (`EditSession.generate`) against the same pipeline generating densely.

    python benchmarks/source_run.py                                  # SD 1.5 at 512x512 (64x64 latents), 20 steps
    python benchmarks/source_run.py --latent-size 32 --steps 4 --out /tmp/b      # a quick check
    python benchmarks/source_run.py --cache-dtype float16            # the session's cache stored in float16

One process, a random-weight pipeline of the architecture (`models.random_pipeline`, full-size configs unless
`--size tiny`), DDIM, classifier-free guidance 7.5, the same prompt and seed for all: `pipe(...)` as a user would
call it, then the source run of an `EditSession`, which compiles the U-Net on its first call and records every step,
then `pipe(...)` again. The dense figures are those of both dense runs (mean seconds, median call): they bracket the
source run, so that a drift of the machine's speed over the minutes of the benchmark (a shared host) weighs on both
sides alike; the two dense runs' difference is reported as the noise floor. Where that floor is wider than the
overhead, the figure to read is the alternated one: `--pairs` rounds of a dense U-Net call, a recording call (a fresh
`fisedit.compile` of the pipeline's U-Net recording one step per call) and a dense call with its linear layers in the
library the recording call takes (`linear_layers_as_compiled`), all on the same inputs, whose per-round ratios no
slow drift moves: record / dense is what a user's call costs more, record / same-library dense what the recording
itself costs (taps, cache), the library left out.

Reported: seconds of each whole generation (text encoder, U-Net steps, VAE decode), U-Net seconds of each (forward
hooks), the compile time of the first recording call, the overhead of the source run over the dense one (issue 14's
goal: under 10%), the system CPU time of the U-Net calls (a source run holds its cache, so its calls touch memory
the process never had, which the kernel zeroes), and how the source run's picture differs from the dense run's.
Results go to ``<out>/source-run_<arch>[-tiny]-<latent>[_<cache dtype>].{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling results_io, also when a test imports this file
from results_io import allocator_note, machine, set_up_allocator, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a cabin in the woods at dusk, warm light in the windows"


class UNetClock:
    """Seconds spent in each call of a module (forward pre/post hooks), and the process's system CPU seconds
    meanwhile (the kernel's share: page faults, zeroing fresh memory)."""

    def __init__(self, module):
        self.seconds: list[float] = []
        self.system_seconds: list[float] = []
        self._start = (0.0, 0.0)
        module.register_forward_pre_hook(self._before)
        module.register_forward_hook(self._after)

    def _before(self, module, args):
        self._start = (time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime)

    def _after(self, module, args, output):
        self.seconds.append(time.perf_counter() - self._start[0])
        self.system_seconds.append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - self._start[1])

    def take(self) -> tuple[list[float], list[float]]:
        taken = self.seconds, self.system_seconds
        self.seconds, self.system_seconds = [], []
        return taken


@contextlib.contextmanager
def linear_layers_as_compiled(device):
    """Inside, every `F.linear` multiplies by the library a compiled model's dense variants take for it
    (`CostConstants.gemm_library` of `device`'s constants; `passes/select_linear_library.py`): the eager U-Net
    computed as a record call computes it, without the recording."""
    import torch
    from fisedit_compiler.cost_model import load_constants
    from fisedit_compiler.kernels.onednn import onednn_linear

    constants, original = load_constants(torch.device(device)), torch.nn.functional.linear

    def linear(x, weight, bias=None):
        if constants.gemm_library(x.numel() // x.shape[-1], weight.numel(), x.dtype) == "onednn":
            return onednn_linear(x, weight, bias)
        return original(x, weight, bias)

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original


def alternated_calls(unet, compiled, inputs: dict, pairs: int) -> dict:
    """`pairs` rounds of three calls at one timestep each: a dense call of `unet`, a recording call of `compiled`
    (its first, compiling call before them, untimed), and a dense call of `unet` with its linear layers in the
    library the recording call takes (`linear_layers_as_compiled`). The overhead is the median of the per-round
    ratios record / dense (what a user's call costs more); the recording's own cost is record / the same-library
    dense call (what the taps and the cache cost, the library left out)."""
    import torch

    def timed(fn, timestep: int) -> float:
        start = time.perf_counter()
        fn(**{**inputs, "timestep": torch.tensor(timestep)})
        return time.perf_counter() - start

    dense, record, same_library = [], [], []
    with torch.no_grad(), compiled.record():
        timed(compiled, 999)
        for i in range(pairs):
            dense.append(timed(unet, 990 - 10 * i))
            record.append(timed(compiled, 990 - 10 * i))
            with linear_layers_as_compiled(inputs["sample"].device):
                same_library.append(timed(unet, 990 - 10 * i))

    def change(seconds: list[float], reference: list[float]) -> float | None:
        return statistics.median(s / r for s, r in zip(seconds, reference)) - 1 if seconds else None

    return {"dense": dense, "record": record, "dense_same_library": same_library,
            "overhead": change(record, dense), "recording_cost": change(record, same_library),
            "library_change": change(same_library, dense)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd15", choices=("sd15", "sd2"))
    p.add_argument("--size", default="full", choices=("full", "tiny"),
                   help="the architecture's full config, or a tiny one (a smoke run)")
    p.add_argument("--latent-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dtype", choices=("float16", "bfloat16"), help="the session stores its cache in this dtype")
    p.add_argument("--pairs", type=int, default=5,
                   help="rounds of alternated dense, recording and same-library dense U-Net calls (0: none)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    import fisedit_compiler as fisedit
    from fisedit_compiler.models import example_unet_inputs, random_pipeline

    set_up_allocator()  # for the dense runs too
    torch.manual_seed(0)
    pipe = random_pipeline(args.arch, latent_size=args.latent_size, seed=0, size=args.size, scheduler="ddim")
    size = 8 * args.latent_size
    clock = UNetClock(pipe.unet)
    common = {"num_inference_steps": args.steps, "guidance_scale": 7.5, "height": size, "width": size}

    def dense_run() -> tuple[float, list[float], list[float], np.ndarray]:
        clock.take()  # drop calls of the eager U-Net that the source run made (capturing it)
        with torch.no_grad():
            start = time.perf_counter()
            image = pipe(PROMPT, generator=torch.Generator().manual_seed(args.seed), **common).images[0]
            seconds = time.perf_counter() - start
        return (seconds, *clock.take(), np.asarray(image))

    before = dense_run()
    unet = pipe.unet  # the session puts its compiled U-Net into the pipeline; the dense run after it takes this back
    session = fisedit.EditSession(pipe, fisedit.Policy(cache_dtype=args.cache_dtype), num_inference_steps=args.steps,
                                  guidance_scale=7.5, height=size, width=size)
    source_clock = UNetClock(session.unet)
    start = time.perf_counter()
    result = session.generate(PROMPT, generator=torch.Generator().manual_seed(args.seed))
    source_s = time.perf_counter() - start
    source_unet, source_system = source_clock.take()
    # the source run's picture against the dense run's (its record calls equal the eager U-Net up to float rounding
    # where their linear layers take another library)
    pixels = np.abs(np.asarray(result.images[0]).astype(int) - before[3].astype(int))
    pipe.unet = unet
    after = dense_run()
    cache_bytes = session.cache.nbytes
    phases = {k: vars(v) for k, v in result.stats.items() if hasattr(v, "unet_calls")}
    del session, result  # the pairs below hold a cache of their own
    pairs = alternated_calls(unet, fisedit.compile(unet, fisedit.Policy(cache_dtype=args.cache_dtype)),
                             example_unet_inputs(unet, 2, args.latent_size, args.seed), args.pairs)
    dense_s = (before[0] + after[0]) / 2
    # calls after the first of each dense run (the first call of a run warms caches)
    dense_unet = before[1][1:] + after[1][1:]
    dense_system = before[2][1:] + after[2][1:]
    first_extra = source_unet[0] - statistics.median(dense_unet)

    data = {
        "config": {"arch": args.arch, "size": args.size, "latent": args.latent_size, "steps": args.steps,
                   "guidance": 7.5, "prompt": PROMPT, "cache_dtype": args.cache_dtype},
        "dense_seconds": dense_s, "dense_seconds_each": [before[0], after[0]], "source_seconds": source_s,
        "overhead": source_s / dense_s - 1, "overhead_without_compile": (source_s - first_extra) / dense_s - 1,
        "dense_unet_seconds_each": [before[1], after[1]], "source_unet_seconds": source_unet,
        "dense_unet_system_seconds_each": [before[2], after[2]], "source_unet_system_seconds": source_system,
        "unet_overhead": sum(source_unet) / ((sum(before[1]) + sum(after[1])) / 2) - 1,
        "unet_overhead_after_first_call": statistics.median(source_unet[1:]) / statistics.median(dense_unet) - 1,
        "first_call_extra_seconds": first_extra,
        "cache_bytes": cache_bytes, "phases": phases, "alternated_calls": pairs,
        "source_vs_dense_image": {"max_abs_difference": int(pixels.max()),
                                  "pixels_differing": float((pixels.max(axis=-1) > 0).mean())},
        "machine": machine(), "loadavg_1min_at_end": os.getloadavg()[0],
    }
    text = "\n".join([
        f"# What a source run costs over a dense generation: {args.arch}"
        f"{' (tiny config)' if args.size == 'tiny' else ''} at {size}x{size} ({args.latent_size}x"
        f"{args.latent_size} latents), {args.steps} DDIM steps, CFG 7.5, fp32, random weights"
        + (f", cache stored in {args.cache_dtype}" if args.cache_dtype else ""), "",
        "| | dense `pipe(...)`, before / after | source run (`EditSession.generate`) | overhead |",
        "|---|---:|---:|---:|",
        f"| whole generation | {before[0]:.1f} / {after[0]:.1f} s | {source_s:.1f} s | "
        f"{100 * data['overhead']:+.1f}% |",
        f"| whole generation, the first call's compile left out | | {source_s - first_extra:.1f} s | "
        f"{100 * data['overhead_without_compile']:+.1f}% |",
        f"| U-Net, all calls | {sum(before[1]):.1f} / {sum(after[1]):.1f} s | {sum(source_unet):.1f} s | "
        f"{100 * data['unet_overhead']:+.1f}% |",
        f"| U-Net call, median after the first | {statistics.median(dense_unet):.2f} s | "
        f"{statistics.median(source_unet[1:]):.2f} s | {100 * data['unet_overhead_after_first_call']:+.1f}% |",
        f"| of it, system CPU time (median) | {statistics.median(dense_system):.2f} s | "
        f"{statistics.median(source_system[1:]):.2f} s | |",
        *([f"| U-Net calls alternated ({len(pairs['dense'])} rounds), median of the per-round ratios | "
           f"{statistics.median(pairs['dense']):.2f} s | {statistics.median(pairs['record']):.2f} s | "
           f"{100 * pairs['overhead']:+.1f}% |",
           f"| the recording's own cost: against the dense call with its linear layers in the record call's "
           f"library, alternated in the same rounds | {statistics.median(pairs['dense_same_library']):.2f} s | "
           f"{statistics.median(pairs['record']):.2f} s | {100 * pairs['recording_cost']:+.1f}% |"]
          if pairs["dense"] else []),
        "", f"The dense runs bracket the source run; they differ by {100 * (after[0] / before[0] - 1):+.1f}% "
        f"(the machine's drift: read smaller overheads as noise). The first recording call compiles the U-Net "
        f"(capture and passes): {first_extra:.1f} s over a dense call, once per session. Cache: "
        f"{data['cache_bytes'] / 2**30:.2f} GiB for {args.steps} steps. The source run's picture against the first "
        f"dense run's: {100 * data['source_vs_dense_image']['pixels_differing']:.2f}% of the pixels differ, by at "
        f"most {data['source_vs_dense_image']['max_abs_difference']} of 255 (record calls equal the eager U-Net up "
        "to float rounding where their linear layers take another library than `F.linear`; "
        "`passes/select_linear_library.py`).", "",
        f"{data['machine']['date']}, git {data['machine']['git']}, {data['machine'].get('cpu', 'CPU not recorded')}, "
        f"{data['machine']['threads']} threads{allocator_note(data['machine'])}, load "
        f"average at the end {data['loadavg_1min_at_end']:.1f}. `benchmarks/source_run.py`.", ""])
    suffix = f"_{args.cache_dtype}" if args.cache_dtype else ""
    tiny = "-tiny" if args.size == "tiny" else ""
    write_results(args.out, f"source-run_{args.arch}{tiny}-{args.latent_size}{suffix}", data, text)
    return data


if __name__ == "__main__":
    main()
