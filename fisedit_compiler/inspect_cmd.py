"""`fisedit inspect`: compile a random-weight U-Net, record one step, run one sparse call, and write down what the
compiler did.

    fisedit inspect --arch sd2 --size tiny --latent-size 32 --mask-fraction 0.05 --out out/inspect

Writes into ``--out``:

    graphs/index.html       graph dumps of every pass of every variant (docs/dumps.md)
    layers.md, layers.csv   per layer (every node with multiply-accumulates: convolutions, linears, attention):
                            resolution, sparse or dense, block size, active fraction, and the MACs of the captured
                            (dense) graph and of the sparse call, counted per node (macs.NodeMacCounter)
    mask_levels.png         the mask as every resolution of the graph sees it, after pooling and dilation, with the
                            active blocks that sparse layers compute
    summary.json            settings, totals, and the sparse call's deviation from the recorded output

The weights are random (`fisedit_compiler.models`): shapes, graphs and MACs are those of the real architecture.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from . import models
from .compiler import compile as compile_unet
from .dump import format_count, short_op
from .ir import LAYOUT, SPARSE
from .editing.mask_image import load_mask_image
from .editing.masks import ellipse_mask
from .macs import node_macs
from .policy import Policy
from .runtime.mask_plan import MaskPlan

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fisedit inspect`."""
    parser.add_argument("--arch", choices=models.ARCHS, default="sd2", help="U-Net architecture (default sd2)")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny",
                        help="tiny channel counts (seconds on a CPU) or the real architecture (default tiny)")
    parser.add_argument("--latent-size", type=int, default=96, help="latent height and width (default 96: 768 px)")
    mask = parser.add_mutually_exclusive_group()
    mask.add_argument("--mask-fraction", type=float, default=0.05,
                      help="an ellipse covering this fraction of the latents (default 0.05)")
    mask.add_argument("--mask", type=Path, help="a mask image (white: edit), at any size: max-pooled to the latents")
    parser.add_argument("--block-size", type=int, default=Policy.block_size,
                        help="Policy.block_size (default: the cost model picks one per resolution for the mask)")
    parser.add_argument("--halo", type=int, default=Policy.halo, help="Policy.halo")
    parser.add_argument("--halo-unit", default=Policy.halo_unit, choices=["cells", "latent_pixels"],
                        help="Policy.halo_unit")
    parser.add_argument("--max-sparse-downscale", type=int, default=Policy.max_sparse_downscale,
                        help="Policy.max_sparse_downscale")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the U-Net call (default 2: CFG)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-svg", action="store_true", help="skip rendering the graph dumps with Graphviz")
    parser.add_argument("--out", type=Path, required=True, help="output folder")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run `fisedit inspect`: write its files into `args.out`; returns the summary (also in summary.json)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    latent = args.latent_size
    unet = models.random_unet(args.arch, args.size, seed=args.seed, sample_size=latent)
    # in CompiledUNet.forward's argument order, so that `compiled.variants(inputs)` finds the variants its calls built
    inputs = models.example_unet_inputs(unet, args.batch, latent, args.seed)
    if not args.mask and not 0 < args.mask_fraction <= 1:
        raise ValueError(f"--mask-fraction must be in (0, 1], got {args.mask_fraction}")
    mask = load_mask(args.mask, latent) if args.mask else ellipse_mask(latent, args.mask_fraction)
    policy = Policy(block_size=args.block_size, halo=args.halo, halo_unit=args.halo_unit,
                    max_sparse_downscale=args.max_sparse_downscale,
                    dump_dir=str(out / "graphs"), dump_svg=not args.no_svg)

    compiled = compile_unet(unet, policy)
    with torch.no_grad():
        with compiled.record():
            recorded = compiled(**inputs).sample
        with compiled.sparse(mask):
            replay = compiled(**inputs).sample
        variants = compiled.variants(inputs)  # built by the calls above
        plan = compiled.mask_plan(mask)
        step = compiled.cache.step(compiled.cache.steps[0])
        dense_macs = _with_macs(node_macs(variants.captured, inputs))
        program = variants.sparse_program(plan)
        program_macs = node_macs(program.gm, *program.arguments(inputs, step, plan))
        sparse_macs = _with_macs(program.by_ir_node(program_macs))

    rows = layer_table(variants.captured, variants.sparse, dense_macs, sparse_macs, plan, policy)
    write_tables(rows, out)
    save_mask_levels(mask, variants.sparse, plan, policy, out / "mask_levels.png")
    total_dense, total_sparse = sum(dense_macs.values()), sum(sparse_macs.values())
    deviation = (replay - recorded).abs().max().item()
    summary = {
        "arch": args.arch, "size": args.size, "latent_size": latent, "batch": args.batch,
        "mask": str(args.mask) if args.mask else f"ellipse, fraction {args.mask_fraction}",
        "mask_fraction": mask.float().mean().item(), "policy": policy.flat_dict(),
        "macs_dense": total_dense, "macs_sparse": total_sparse, "sparse_over_dense": total_sparse / total_dense,
        "replay_max_abs_deviation": deviation,
        "files": ["graphs/index.html", "layers.md", "layers.csv", "mask_levels.png", "summary.json"],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def describe(summary: dict[str, Any], out: Path) -> str:
    """What `run` found and wrote, for the terminal."""
    lines = [
        f"{summary['arch']} ({summary['size']}) at {summary['latent_size']}x{summary['latent_size']} latents, "
        f"mask {summary['mask_fraction']:.1%} of the latents",
        f"MACs: dense {format_count(summary['macs_dense'])}, sparse {format_count(summary['macs_sparse'])} "
        f"({summary['sparse_over_dense']:.1%}); sparse replay deviates by "
        f"{summary['replay_max_abs_deviation']:.2e} from the record",
    ]
    return "\n".join(lines + [f"  {out / name}" for name in summary["files"]])


# --- masks -------------------------------------------------------------------------------------------------------


def load_mask(path: Path, latent: int) -> torch.Tensor:
    """A non-empty (latent, latent) mask from an image at latent or image resolution."""
    mask = load_mask_image(path, (latent, latent))
    if not mask.any():
        raise ValueError(f"the mask {path} has no bright pixel: nothing to edit")
    return mask


# --- MACs per node -----------------------------------------------------------------------------------------------


def _with_macs(macs: dict[str, int]) -> dict[str, int]:
    """The nodes with multiply-accumulates of a `node_macs` count."""
    return {name: m for name, m in macs.items() if m}


def layer_table(captured: fx.GraphModule, sparse: fx.GraphModule, dense_macs: dict[str, int],
                sparse_macs: dict[str, int], plan: MaskPlan, policy: Policy) -> list[dict[str, Any]]:
    """One row per captured node with MACs, matched by name to the sparse variant's node (passes rewrite layers in
    place, so names survive), plus a row for MACs of nodes that only the sparse variant has."""
    sparse_nodes = {n.name: n for n in sparse.graph.nodes}
    rows = []
    for node in captured.graph.nodes:
        if node.name not in dense_macs:
            continue
        twin = sparse_nodes.get(node.name)
        layout = twin.meta.get(LAYOUT) if twin is not None else None
        res = getattr(layout, "res", None)
        is_sparse = bool(twin is not None and twin.meta.get(SPARSE))
        rows.append({
            "node": node.name,
            "op": short_op(node),
            "resolution": f"{res[0]}x{res[1]}" if res else "",
            "mode": "sparse" if is_sparse else "dense",
            "block": plan.block_size(res) if is_sparse and res else "",
            "active": round(plan.layout(res).active_fraction, 4) if is_sparse and res else 1.0,
            "macs_dense": dense_macs[node.name],
            "macs_sparse": sparse_macs.get(node.name, 0),
        })
    extra = sum(m for name, m in sparse_macs.items() if name not in dense_macs)
    if extra:
        rows.append({"node": "(inserted by passes)", "op": "", "resolution": "", "mode": "", "block": "",
                     "active": "", "macs_dense": 0, "macs_sparse": extra})
    return rows


def write_tables(rows: list[dict[str, Any]], out: Path) -> None:
    fields = ["node", "op", "resolution", "mode", "block", "active", "macs_dense", "macs_sparse"]
    with open(out / "layers.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    total_dense = sum(r["macs_dense"] for r in rows)
    total_sparse = sum(r["macs_sparse"] for r in rows)
    lines = [
        "| node | op | resolution | mode | block | active | MACs dense | MACs sparse | sparse / dense |",
        "|---|---|---|---|---|---|---:|---:|---:|",
    ]
    for r in rows:
        ratio = f"{r['macs_sparse'] / r['macs_dense']:.1%}" if r["macs_dense"] else ""
        active = f"{r['active']:.1%}" if isinstance(r["active"], float) else ""
        lines.append(f"| {r['node']} | {r['op']} | {r['resolution']} | {r['mode']} | {r['block']} | {active} | "
                     f"{format_count(r['macs_dense'])} | {format_count(r['macs_sparse'])} | {ratio} |")
    lines.append(f"| **total** | | | | | | {format_count(total_dense)} | {format_count(total_sparse)} | "
                 f"{total_sparse / total_dense:.1%} |")
    (out / "layers.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- the mask at every resolution --------------------------------------------------------------------------------

PANEL = 160  # pixels per panel side
COLOURS = {"inactive": (40, 40, 40), "block": (70, 110, 200), "active": (255, 220, 80), "dense": (150, 150, 150)}


def save_mask_levels(mask: torch.Tensor, gm: fx.GraphModule, plan: MaskPlan, policy: Policy, path: Path) -> None:
    """Tile the mask as each resolution of `gm` sees it, largest first: yellow cells are active after
    max-pooling and dilation by the halo (`MaskPlan.active_map`), blue ones lie in active blocks and are computed
    too (`active_pixels`), dark ones are taken from the record; grey panels are resolutions that run dense."""
    from PIL import Image, ImageDraw

    latent = plan.latent_res
    resolutions = sorted({n.meta[LAYOUT].res for n in gm.graph.nodes if getattr(n.meta.get(LAYOUT), "res", None)},
                         reverse=True)
    panels = [(_panel(mask.bool(), None), f"mask {latent[0]}x{latent[1]}")]
    for res in resolutions:
        if policy.is_sparse_resolution(res, latent):
            layout = plan.layout(res)
            cells = plan.active_pixels(res).long() + plan.active_map(res).long()  # 0, 1 (block only), 2 (active)
            caption = f"{res[0]}x{res[1]}  block {layout.block}  {layout.active_fraction:.0%} computed"
            panels.append((_panel(cells, "levels"), caption))
        else:
            panels.append((_panel(torch.ones(res, dtype=torch.bool), "dense"), f"{res[0]}x{res[1]} dense"))
    gap, caption_h = 8, 18
    sheet = Image.new("RGB", (len(panels) * (PANEL + gap) + gap, PANEL + caption_h + 2 * gap), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(panels):
        x = gap + i * (PANEL + gap)
        sheet.paste(image, (x, gap))
        draw.text((x, gap + PANEL + 3), caption, fill=(0, 0, 0))
    sheet.save(path)


def _panel(cells: torch.Tensor, kind: str | None):
    """A PANEL x PANEL picture of a cell map (nearest-neighbour scaling keeps the cells visible)."""
    from PIL import Image

    if kind is None:  # the mask: active or not
        palette = [COLOURS["inactive"], COLOURS["active"]]
    elif kind == "dense":
        palette = [COLOURS["dense"], COLOURS["dense"]]
    else:
        palette = [COLOURS["inactive"], COLOURS["block"], COLOURS["active"]]
    table = torch.tensor(palette, dtype=torch.uint8)
    rgb = table[cells.long().cpu()]  # (H, W, 3)
    h, w = cells.shape
    image = Image.frombytes("RGB", (w, h), rgb.contiguous().numpy().tobytes())
    return image.resize((PANEL, PANEL), Image.NEAREST)


def main(argv: list[str] | None = None) -> int:
    """`python -m fisedit_compiler.inspect_cmd ...`, the same as `fisedit inspect ...`."""
    parser = argparse.ArgumentParser(prog="fisedit inspect", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
