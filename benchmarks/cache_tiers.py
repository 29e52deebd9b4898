#!/usr/bin/env python
"""The record cache in memory vs with a byte budget and the disk tier (issue 13): peak memory and step times.

    python benchmarks/cache_tiers.py                                   # SD 2 at 96x96 latents, 10 steps, 2 GiB
    python benchmarks/cache_tiers.py --arch sd15 --latent-size 32 --steps 6 --budget-mib 256 --out /tmp/c
    python benchmarks/cache_tiers.py --arch sdxl --latent-size 128 --bytes-only    # one recorded step's bytes

Each mode runs in its own process (peak resident memory, `resource.getrusage` max RSS, is per process; on Linux
also per phase, from /proc's VmHWM: building and compiling the model, recording, replaying): a U-Net
with seeded random weights (`fisedit_compiler.models.random_unet`), CFG batch 2, fp32, compiled with
`fisedit.compile`; a record run of `--steps` calls at distinct timesteps, then a sparse replay of the same steps at a
15% ellipse mask. Reported per mode: peak RSS, cache bytes per step by kind (`RecordCache.breakdown`), median seconds
per record and per sparse call, the time sparse calls waited for the disk tier, and steps written to and read
from disk. Results
go to ``<out>/cache-tiers_<arch>-<latent>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from results_io import git_revision

RESULTS = Path(__file__).resolve().parent / "results"


def phase_peak() -> int | None:
    """The process's peak resident bytes since the last call (Linux: VmHWM, then reset through clear_refs), or
    None where /proc does not offer it."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, StopIteration):
        return None
    return kib * 1024


def measure(arch: str, latent: int, steps: int, budget: int | None, cache_dtype: str | None = None) -> dict:
    """One mode, in this process."""
    import torch

    import fisedit_compiler as fisedit
    from fisedit_compiler.editing.masks import ellipse_mask
    from fisedit_compiler.models import example_unet_inputs, random_unet

    torch.manual_seed(0)
    unet = random_unet(arch, "full", seed=0, sample_size=latent)
    inputs = example_unet_inputs(unet, 2, latent, 0)
    folder = tempfile.mkdtemp(prefix="fisedit-cache-bench-")
    policy = fisedit.Policy(cache_budget="unbounded" if budget is None else budget, cache_dir=folder,
                            cache_dtype=cache_dtype)
    compiled = fisedit.compile(unet, policy)
    peaks = {"setup": phase_peak()}
    call_peaks = {"record": [], "replay": []}  # per call: flat, whatever the number of steps
    timesteps = [int(t) for t in torch.linspace(950, 50, steps)]
    record_s, sparse_s = [], []
    with torch.no_grad():
        with compiled.record():
            for t in timesteps:
                start = time.perf_counter()
                compiled(**{**inputs, "timestep": torch.tensor(t)})
                record_s.append(time.perf_counter() - start)
                call_peaks["record"].append(phase_peak())
        peaks["record"] = max(filter(None, call_peaks["record"]), default=None)
        with compiled.sparse(ellipse_mask(latent, 0.15)):
            for t in timesteps:
                start = time.perf_counter()
                compiled(**{**inputs, "timestep": torch.tensor(t)})
                sparse_s.append(time.perf_counter() - start)
                call_peaks["replay"].append(phase_peak())
        peaks["replay"] = max(filter(None, call_peaks["replay"]), default=None)
    store = compiled.cache.store
    # before `breakdown`, which reads every step (those on disk too)
    wait_seconds, steps_written = getattr(store, "wait_seconds", 0.0), getattr(store, "spilled", 0)
    steps_read = getattr(store, "loaded", 0)
    per_step = compiled.cache.breakdown()["total"]
    cache_bytes = compiled.cache.nbytes
    compiled.cache.clear()
    if hasattr(store, "close"):
        store.close()
    shutil.rmtree(folder, ignore_errors=True)  # a given cache_dir is the caller's to remove
    return {
        "budget_bytes": budget,  # (getrusage's max RSS restarts with every VmHWM reset: the phases' maximum)
        "peak_rss_bytes": max([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024]
                              + [v for v in peaks.values() if v is not None]),
        "peak_rss_bytes_by_phase": peaks, "peak_rss_bytes_by_call": call_peaks,
        "weights_bytes": sum(p.numel() * p.element_size() for p in unet.parameters()),
        "cache_bytes": cache_bytes, "bytes_per_step_by_kind": {k: v // steps for k, v in per_step.items()},
        "record_seconds": statistics.median(record_s[1:]), "sparse_seconds": statistics.median(sparse_s[1:]),
        "sparse_seconds_all": sparse_s, "wait_seconds": wait_seconds, "steps_written": steps_written,
        "steps_read": steps_read,
    }


def step_bytes(arch: str, latent: int) -> list[dict]:
    """The bytes of one recorded step (CFG batch 2, fp32 U-Net), by kind, stored in fp32 and in float16."""
    import torch

    import fisedit_compiler as fisedit
    from fisedit_compiler.models import example_unet_inputs, random_unet

    unet = random_unet(arch, "full", seed=0, sample_size=latent)
    inputs = example_unet_inputs(unet, 2, latent, 0)
    rows = []
    for cache_dtype in (None, "float16"):
        compiled = fisedit.compile(unet, fisedit.Policy(cache_budget="unbounded", cache_dtype=cache_dtype))
        with torch.no_grad(), compiled.record():
            compiled(**inputs)
        rows.append({"cache_dtype": cache_dtype or "float32", "bytes": compiled.cache.nbytes,
                     "by_kind": compiled.cache.breakdown()["total"]})
        compiled.cache.clear()
    return rows


def render(r: dict) -> str:
    c = r["config"]
    lines = [f"# Record cache: in memory vs {c['budget_mib']} MiB resident + disk ({c['arch']} at {c['latent']}x"
             f"{c['latent']} latents, CFG batch 2, fp32 U-Net, cache stored in {c.get('cache_dtype') or 'fp32'}, "
             f"{c['steps']} steps, 15% ellipse mask)", "",
             "| mode | peak RSS | of it: setup / record / replay | weights | cache (all steps) | record s/call | "
             "sparse s/call | waited for disk | steps written | steps read |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def phases(m: dict) -> str:
        peaks = m.get("peak_rss_bytes_by_phase") or {}
        return " / ".join("-" if peaks.get(k) is None else f"{peaks[k] / 2**30:.2f}" for k in ("setup", "record",
                                                                                               "replay"))
    for name, m in r["modes"].items():
        lines.append(f"| {name} | {m['peak_rss_bytes'] / 2**30:.2f} GiB | {phases(m)} | "
                     f"{m['weights_bytes'] / 2**30:.2f} GiB | "
                     f"{m['cache_bytes'] / 2**30:.2f} GiB | {m['record_seconds']:.3f} | {m['sparse_seconds']:.3f} | "
                     f"{m['wait_seconds']:.3f} s | {m['steps_written']} | {m.get('steps_read', '-')} |")
    memory, tiered = r["modes"]["memory"], r["modes"]["tiered"]
    lines += ["", f"Sparse call with the disk tier / in memory: {tiered['sparse_seconds'] / memory['sparse_seconds']:.2f}"
              f"x. Bytes per step by kind: " + ", ".join(f"{k} {v / 2**20:.1f} MiB"
                                                        for k, v in memory["bytes_per_step_by_kind"].items()) + ".",
              "", f"{r['date']}, git {r['git']}, 1-minute load average at the end {r['loadavg_1min_at_end']:.1f} on "
              f"{os.cpu_count()} CPUs. Medians over the calls after the first."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="sd2")
    p.add_argument("--latent-size", type=int, default=96)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--budget-mib", type=int, default=2048)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--bytes-only", action="store_true",
                   help="record one step (fp32 and float16 storage) and report its bytes by kind, nothing else")
    p.add_argument("--cache-dtype", choices=("float16", "bfloat16"), help="store the cache in this dtype")
    p.add_argument("--mode", choices=("memory", "tiered"), help=argparse.SUPPRESS)  # one mode, in a child
    args = p.parse_args()
    budget = args.budget_mib * 2**20
    args.out.mkdir(parents=True, exist_ok=True)
    if args.bytes_only:
        rows = step_bytes(args.arch, args.latent_size)
        result = {"config": {"arch": args.arch, "latent": args.latent_size}, "steps": rows, "git": git_revision(),
                  "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        stem = args.out / f"cache-bytes_{args.arch}-{args.latent_size}"
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        lines = [f"# One recorded step: {args.arch} at {args.latent_size}x{args.latent_size} latents, CFG batch 2", "",
                 "| storage | bytes per step | by kind |", "|---|---:|---|"]
        for row in rows:
            kinds = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in row["by_kind"].items())
            lines.append(f"| {row['cache_dtype']} | {row['bytes'] / 2**30:.2f} GiB | {kinds} |")
        lines += ["", f"{result['date']}, git {result['git']}. `benchmarks/cache_tiers.py --bytes-only`."]
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    if args.mode:
        print(json.dumps(measure(args.arch, args.latent_size, args.steps,
                                 None if args.mode == "memory" else budget, args.cache_dtype)))
        return
    modes = {}
    for mode in ("memory", "tiered"):
        done = subprocess.run([sys.executable, __file__, "--arch", args.arch, "--latent-size", str(args.latent_size),
                               "--steps", str(args.steps), "--budget-mib", str(args.budget_mib), "--mode", mode,
                               *(["--cache-dtype", args.cache_dtype] if args.cache_dtype else [])],
                              check=True, capture_output=True, text=True)
        modes[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        print(mode, {k: v for k, v in modes[mode].items() if k != "sparse_seconds_all"}, flush=True)
    result = {"config": {"arch": args.arch, "latent": args.latent_size, "steps": args.steps,
                         "budget_mib": args.budget_mib, "cache_dtype": args.cache_dtype}, "modes": modes,
              "git": git_revision(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_1min_at_end": os.getloadavg()[0]}
    stem = args.out / f"cache-tiers_{args.arch}-{args.latent_size}{'_' + args.cache_dtype if args.cache_dtype else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
