#!/usr/bin/env python
"""A long edit session under the default memory settings: does the process stay within its memory bound?

    python benchmarks/memory_soak.py                                  # SD 1.5 at 512x512 (64x64 latents), 50 steps
    python benchmarks/memory_soak.py --arch sd2 --latent-size 96      # SD 2 at 768x768
    python benchmarks/memory_soak.py --arch sd15 --latent-size 16 --size tiny --steps 8 --edits 2 --out /tmp/s

An `EditSession` over a pipeline with seeded random weights (`random_pipeline`), default `Policy()` (the cache's
budget: `cache_budget` = 0.5 of the memory available when the session is made, shared by the cache, an edit's
pending records and the decoder's record), CFG 7.5: `generate`, an edit with a 15% ellipse mask, a detected edit,
then `--edits` more edits with masks of 5-30%, each after a `keep=False` try; then `close()`. A phase that raises
(a disk too small for the records, say) is reported with its error, and the session goes on with the next. Per
phase: seconds, the process's peak and final resident memory (VmHWM, reset per phase; VmRSS), the most bytes of
records the budget held, bytes on disk in the spill folders. Resident memory is sampled every 0.5 s over the
whole run (a CSV and an SVG plot beside the results). The bound checked is the one the session states when it is made
(`session.memory_budget.bound`, `MemoryBound`: the process's anonymous memory then + the cache budget + what is
left for a call's transients beside 10% of the memory available for the system), and the edits' peaks do not grow
from one to the next. Results go to
``<out>/memory-soak_<arch>-<latent>-<steps>.{json,md,csv,svg}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import fisedit_compiler as fisedit  # noqa: E402
from cache_tiers import phase_peak  # noqa: E402
from fisedit_compiler.editing.masks import ellipse_mask  # noqa: E402
from fisedit_compiler.models import random_pipeline  # noqa: E402
from fisedit_compiler.runtime.tiered_store import SPILL_PREFIX, anonymous_memory  # noqa: E402
from results_io import machine, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT = "a cabin in the woods"
EDITS = ["a red cabin in the woods", "a cabin in the woods with a river", "a cabin in the snowy woods",
         "a small cabin in the woods", "a cabin in the woods at night", "a wooden cabin in the woods",
         "a cabin in the woods with a lake", "a cabin in the autumn woods", "a stone cabin in the woods",
         "a cabin in the woods with a fence"]


def status(*fields: str) -> tuple[int, ...]:
    """Fields of /proc/self/status in bytes, e.g. VmRSS (all resident pages), RssAnon (anonymous: what the kernel
    cannot drop and kills for), RssFile (file pages mapped, such as spilled steps read back: page cache it
    reclaims first)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in fields:
                values[name] = int(rest.split()[0]) * 1024
    return tuple(values[name] for name in fields)


def resident() -> int:
    """The process's resident bytes now (VmRSS)."""
    return status("VmRSS")[0]


class Sampler(threading.Thread):
    """Resident and anonymous memory every `interval` seconds, with the phase it was sampled in."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.samples, self.phase = interval, [], "setup"
        self._stop_event, self._start = threading.Event(), time.perf_counter()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            rss, anon = status("VmRSS", "RssAnon")
            self.samples.append((time.perf_counter() - self._start, rss, anon, self.phase))

    def peak_anonymous(self, phase: str) -> int:
        """The most anonymous bytes sampled in `phase` (0 if none was)."""
        return max((anon for _, _, anon, p in self.samples if p == phase), default=0)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for d in folder.glob(f"{SPILL_PREFIX}*") for f in d.rglob("*") if f.is_file())


def svg_plot(samples: list[tuple[float, int, int, str]], bound: int, title: str) -> str:
    """Resident and anonymous GiB over seconds as SVG polylines, with the bound as a dashed line."""
    width, height, pad = 800, 300, 40
    t_max = max(t for t, *_ in samples) or 1.0
    y_max = max(max(r for _, r, _, _ in samples), bound) * 1.05
    x = lambda t: pad + (width - 2 * pad) * t / t_max  # noqa: E731
    y = lambda r: height - pad - (height - 2 * pad) * r / y_max  # noqa: E731
    resident_points = " ".join(f"{x(t):.1f},{y(r):.1f}" for t, r, _, _ in samples)
    anonymous_points = " ".join(f"{x(t):.1f},{y(a):.1f}" for t, _, a, _ in samples)
    lines = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<text x="{pad}" y="16">{title}</text>',
             f'<polyline fill="none" stroke="steelblue" points="{resident_points}"/>',
             f'<polyline fill="none" stroke="darkorange" points="{anonymous_points}"/>',
             f'<line x1="{pad}" x2="{width - pad}" y1="{y(bound):.1f}" y2="{y(bound):.1f}" stroke="red" '
             'stroke-dasharray="4"/>',
             f'<text x="{width - pad - 120}" y="{y(bound) - 4:.1f}" fill="red">bound {bound / 2**30:.1f} GiB</text>',
             f'<text x="{pad}" y="{height - 8}">0 s</text>',
             f'<text x="{width - pad - 40}" y="{height - 8}">{t_max:.0f} s</text>',
             f'<text x="2" y="{y(0):.1f}">0</text>',
             f'<text x="2" y="{y(y_max / 1.05):.1f}">{y_max / 1.05 / 2**30:.1f} GiB</text>', "</svg>"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--latent-size", type=int, default=64)
    parser.add_argument("--size", default="full")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--edits", type=int, default=10)
    parser.add_argument("--cache-dir", help="parent folder of the spill folders (default: the temporary folder)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    parent = Path(args.cache_dir or tempfile.mkdtemp(prefix="memory-soak-"))
    sampler = Sampler()
    sampler.start()
    torch.manual_seed(0)
    pipe = random_pipeline(args.arch, latent_size=args.latent_size, seed=0, size=args.size)
    pipe.set_progress_bar_config(disable=True)
    phase_peak()
    start_rss, start_anon = resident(), anonymous_memory()
    session = fisedit.EditSession(pipe, fisedit.Policy(cache_dir=str(parent)), num_inference_steps=args.steps)
    budget = session.memory_budget
    phases: list[dict] = []

    def phase(name: str, action) -> None:
        sampler.phase = name
        budget.peak = budget.held()
        start, result, error = time.perf_counter(), None, None
        try:
            with torch.no_grad():
                result = action()
        except (MemoryError, OSError, RuntimeError) as e:  # e.g. a disk too small: the session must stay usable
            error = f"{type(e).__name__}: {e}"
        row = {"phase": name, "seconds": time.perf_counter() - start, "peak_rss": phase_peak(),
               "rss_after": resident(), "peak_anon": max(sampler.peak_anonymous(name), anonymous_memory()),
               "anon_after": anonymous_memory(), "records_peak": budget.peak, "records_after": budget.held(),
               "disk_bytes": disk_bytes(parent)}
        if result is not None and getattr(result, "mask", None) is not None:
            row["mask_fraction"] = float(result.mask.float().mean())
        if error is not None:
            row["error"] = error
            print(f"{name}: {error}", flush=True)
        phases.append(row)
        print(f"{name}: {row['seconds']:.0f} s, peak {row['peak_rss'] / 2**30:.2f} GiB (anonymous "
              f"{row['peak_anon'] / 2**30:.2f} GiB), after "
              f"{row['rss_after'] / 2**30:.2f} GiB, records {row['records_after'] / 2**30:.2f} GiB, disk "
              f"{row['disk_bytes'] / 2**30:.2f} GiB", flush=True)

    latent = args.latent_size
    phase("generate", lambda: session.generate(PROMPT, generator=torch.Generator().manual_seed(0)))
    phase("edit (15% mask)", lambda: session.edit(EDITS[0], mask=ellipse_mask(latent, 0.15)))
    phase("edit (detected)", lambda: session.edit(EDITS[1]))
    fractions = [0.05 + 0.25 * i / max(1, args.edits - 1) for i in range(args.edits)]
    for i, fraction in enumerate(fractions):
        prompt = EDITS[(i + 2) % len(EDITS)]
        mask = ellipse_mask(latent, fraction, center=(0.3 + 0.4 * (i % 3) / 2, 0.35 + 0.3 * (i % 2)))
        phase(f"try {i + 1} (keep=False, {fraction:.0%})", lambda: session.edit(prompt, mask=mask, keep=False))
        phase(f"edit {i + 1} ({fraction:.0%})", lambda: session.edit(prompt, mask=mask))
    phase("close", session.close)
    sampler.stop()
    left = disk_bytes(parent)

    # the bound, on anonymous memory (what the kernel cannot reclaim: file pages of spilled steps read back are
    # page cache, dropped before anything is killed): the session's (`MemoryBound`), stated when it was made
    stated = budget.bound
    bound = stated.total
    for p in phases:  # each phase's most memory beyond the records held and the base: its calls' transients
        p["transients"] = max(0, p["peak_anon"] - stated.base - p["records_peak"])
    transients = max(p["transients"] for p in phases)
    peak = max(p["peak_rss"] for p in phases)
    peak_anon = max(p["peak_anon"] for p in phases)
    edit_peaks = [p["peak_anon"] for p in phases if p["phase"].startswith("edit ")]
    data = {"machine": machine(), "arch": args.arch, "latent_size": latent, "size": args.size, "steps": args.steps,
            "available_at_start": stated.available, "rss_at_session_start": start_rss,
            "anon_at_session_start": start_anon,
            "budget_bytes": budget.nbytes, "bound_base_bytes": stated.base, "calls_bytes": stated.calls,
            "headroom_bytes": stated.headroom, "transients_bytes": transients, "bound_bytes": bound, "peak_rss": peak,
            "peak_anon": peak_anon, "within_bound": peak_anon <= bound,
            "edit_peak_growth": (edit_peaks[-1] - edit_peaks[0]) if len(edit_peaks) > 1 else 0,
            "disk_bytes_after_close": left, "phases": phases}
    name = f"memory-soak_{args.arch}-{latent}-{args.steps}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.csv").write_text("seconds,rss_bytes,anon_bytes,phase\n" + "".join(
        f"{t:.2f},{r},{a},{p}\n" for t, r, a, p in sampler.samples))
    if sampler.samples:
        (out / f"{name}.svg").write_text(svg_plot(sampler.samples, bound, f"{name}: resident (blue) and "
                                                                          "anonymous (orange) memory"))
    write_results(args.out, name, data, markdown(data))
    return data


def markdown(d: dict) -> str:
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    lines = [f"# Memory soak: {d['arch']} at {d['latent_size']}x{d['latent_size']} latents ({d['size']}), "
             f"{d['steps']} steps, default Policy", "",
             f"Machine: {d['machine']['cpu']}, git {d['machine']['git']}, {d['machine']['date']}", "",
             f"Available when the session was made: {gib(d['available_at_start'])}; resident then "
             f"{gib(d['rss_at_session_start'])} (anonymous {gib(d['anon_at_session_start'])}); cache budget "
             f"{gib(d['budget_bytes'])}. The session's bound on anonymous memory (`MemoryBound`): "
             f"{gib(d['bound_base_bytes'])} held when its budget was made + the cache budget + "
             f"{gib(d['calls_bytes'])} for a call's transients = {gib(d['bound_bytes'])}, leaving "
             f"{gib(d['headroom_bytes'])} of the memory available to the system. The largest transients measured "
             f"(a phase's peak beyond the base and the records it held): {gib(d['transients_bytes'])}. Peak "
             f"anonymous {gib(d['peak_anon'])} (sampled every 0.5 s): "
             f"{'within' if d['within_bound'] else 'OVER'} the bound; peak resident, file pages included, "
             f"{gib(d['peak_rss'])}. Edit peaks grew by {gib(d['edit_peak_growth'])} from the first edit to the "
             f"last; spill files left after close: {gib(d['disk_bytes_after_close'])}.", "",
             "| phase | seconds | peak RSS | peak anonymous | RSS after | anonymous after | records held (peak) | "
             "transients | on disk |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in d["phases"]:
        lines.append(f"| {p['phase']} | {p['seconds']:.1f} | {gib(p['peak_rss'])} | {gib(p['peak_anon'])} | "
                     f"{gib(p['rss_after'])} | {gib(p['anon_after'])} | {gib(p['records_peak'])} | "
                     f"{gib(p['transients'])} | {gib(p['disk_bytes'])} |")
    for p in d["phases"]:
        if "error" in p:
            lines.append(f"\n{p['phase']} raised (the session went on with the next phase): `{p['error']}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
