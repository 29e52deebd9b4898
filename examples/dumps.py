"""Graph dumps: every variant's graph before and after each pass (DOT, and SVG where Graphviz is installed), with
a summary per pass, written when a compiled U-Net captures an input signature (docs/dumps.md).

    python examples/dumps.py --out out/dumps     # then open out/dumps/index.html
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fisedit_compiler as fisedit
from fisedit_compiler.models import example_unet_inputs, random_unet


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd2", choices=["sd15", "sd2", "sdxl"],
                        help="a tiny random-weight U-Net of this architecture")
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--svg", action="store_true", help="render SVGs too (slower; needs Graphviz's dot)")
    parser.add_argument("--out", default="out/dumps")
    args = parser.parse_args(argv)

    unet = random_unet(args.arch)
    policy = fisedit.Policy(dump_dir=args.out, dump_svg=args.svg)
    compiled = fisedit.compile(unet, policy)
    with torch.no_grad(), compiled.record():  # the first recorded call captures and runs the pass pipelines
        compiled(**example_unet_inputs(unet, size=args.latent_size))
    folders = sorted(p.parent for p in Path(args.out).glob("*/index.html"))
    print(f"wrote {args.out}/index.html: " + ", ".join(f"{folder.name}/index.html" for folder in folders))
    return 0


if __name__ == "__main__":
    sys.exit(main())
