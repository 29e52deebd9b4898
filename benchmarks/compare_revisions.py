#!/usr/bin/env python
"""Is a revision slower than another? `unet_speed.py` of two checkouts, run alternately, compared per mask.

    git worktree add /tmp/old <rev>
    python benchmarks/compare_revisions.py --old /tmp/old --new . --rounds 2 \
        --config "--size tiny --latent-size 32 --repeats 5" --config "--repeats 3" --out /tmp/compare

Each round runs every configuration once per checkout, old then new, each in its own process with that checkout's
package first on `sys.path` (its own `benchmarks/unet_speed.py`, its own `fisedit_compiler`). Alternating spreads
the host's drift over both. Per configuration and mask it reports each run's sparse/dense speed-up (the median of
`unet_speed.py`'s dense/sparse pairs, which already cancels most drift), sparse seconds and MACs, and the ratio of
the new revision's median speed-up to the old one's. ``--summarize DIR`` only reads a folder such runs wrote.
Writes ``<out>/compare.json`` and ``<out>/compare.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path


def run(tree: Path, config: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    command = [sys.executable, str(tree / "benchmarks" / "unet_speed.py"), *shlex.split(config), "--quiet",
               "--out", str(out)]
    subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)


def results(folder: Path) -> dict:
    (path,) = folder.glob("*.json")
    return json.loads(path.read_text())


def summarize(out: Path) -> dict:
    """{config: {mask: {"old": [...runs], "new": [...]}}} from `<out>/<config>/<tree>-<round>/`."""
    table: dict = {}
    for config_dir in sorted(p for p in out.iterdir() if p.is_dir()):
        for run_dir in sorted(config_dir.iterdir()):
            tree = run_dir.name.split("-")[0]
            data = results(run_dir)
            for mask in data["masks"]:
                table.setdefault(config_dir.name, {}).setdefault(mask["name"], {"old": [], "new": []})[tree].append({
                    "git": data["machine"].get("git"), "speedup": mask["speedup"],
                    "sparse_seconds": mask["sparse_seconds"], "sparse_macs": mask["sparse_macs"],
                    "dense_seconds": data["dense"]["seconds"]})
    for masks in table.values():
        for runs in masks.values():
            old, new = (statistics.median(r["speedup"] for r in runs[t]) for t in ("old", "new"))
            runs["new_over_old_speedup"] = new / old
    return table


def markdown(table: dict) -> str:
    lines = ["| configuration | mask | revision | speed-ups (dense/sparse, per run) | sparse ms (per run) | "
             "sparse GMACs | new / old median speed-up |", "|---|---|---|---|---|---|---|"]
    for config, masks in table.items():
        for mask, runs in masks.items():
            for tree in ("old", "new"):
                rs = runs[tree]
                lines.append(
                    f"| {config} | {mask} | {tree} ({rs[0]['git']}) | "
                    + ", ".join(f"{r['speedup']:.2f}x" for r in rs) + " | "
                    + ", ".join(f"{1e3 * r['sparse_seconds']:.1f}" for r in rs)
                    + f" | {rs[0]['sparse_macs'] / 1e9:.2f} | "
                    + (f"{runs['new_over_old_speedup']:.3f}" if tree == "new" else "") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", type=Path, help="checkout of the old revision")
    p.add_argument("--new", type=Path, help="checkout of the new revision")
    p.add_argument("--config", action="append", default=[], help="unet_speed.py arguments; repeat for several")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--summarize", action="store_true", help="only summarize what --out holds")
    args = p.parse_args(argv)
    if not args.summarize:
        for n, config in enumerate(args.config):
            for round_ in range(1, args.rounds + 1):
                for tree, path in (("old", args.old), ("new", args.new)):
                    run(path.resolve(), config, args.out / f"config{n}" / f"{tree}-{round_}")
    table = summarize(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(table, indent=1))
    text = markdown(table)
    (args.out / "compare.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
