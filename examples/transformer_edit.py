"""An edit session over a diffusion transformer (SD3, FLUX or FLUX Kontext): generate, then edit inside a mask; the
transformer runs sparsely over the mask's tokens. Outside the mask every latent is the source's, bit for bit.

    python examples/transformer_edit.py --family flux --out out/transformer_edit   # a tiny random FLUX pipeline
    python examples/transformer_edit.py --family sd3                                # a tiny random SD3 pipeline
    python examples/transformer_edit.py --family kontext --image photo.png          # FLUX Kontext edits a picture
    python examples/transformer_edit.py --model PATH --prompt ... --edit ...        # a local SD3 or FLUX folder

Random weights draw noise, not pictures: the example shows what the session computes and keeps, not edit quality.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fisedit_compiler as fisedit
from fisedit_compiler.editing.masks import ellipse_mask


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd3", "flux", "kontext"), default="flux",
                        help="the tiny random pipeline's")
    parser.add_argument("--model", help="a local SD3, FLUX or FLUX Kontext diffusers pipeline folder instead")
    parser.add_argument("--image", help="FLUX Kontext: the picture its prompts edit (default: a drawn circle)")
    parser.add_argument("--prompt", default="a cabin in the woods")
    parser.add_argument("--edit", default="a cabin in the woods with a river")
    parser.add_argument("--size", type=int, default=512, help="picture side in pixels")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", default="out/transformer_edit")
    args = parser.parse_args(argv)

    if args.model:
        from fisedit_compiler.models import load_pipeline

        pipe = load_pipeline(args.model)
    else:
        from fisedit_compiler.models import random_flux_pipeline, random_sd3_pipeline

        if args.family == "sd3":
            pipe = random_sd3_pipeline(latent_size=args.size // 8)
        else:
            pipe = random_flux_pipeline(latent_size=args.size // 8, kontext=args.family == "kontext")
    session = fisedit.EditSession(pipe, num_inference_steps=args.steps, guidance_scale=5.0,
                                  height=args.size, width=args.size)
    # a FLUX Kontext pipeline edits a picture it is given (its prompts are instructions)
    picture = picture_for(args) if session.control_model else None
    source = session.generate(args.prompt, generator=torch.Generator().manual_seed(0), control_image=picture)
    latent = source.latents.shape[-1]
    mask = ellipse_mask(latent, 0.15, center=(0.6, 0.5), grid_offset=0)  # a user's mask at latent resolution
    edit = session.edit(args.edit, mask=mask)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source.images[0].save(out / "source.png")
    edit.images[0].save(out / "edited.png")
    kept = torch.equal(edit.latents[..., ~mask], source.latents[..., ~mask])
    sparse, dense = edit.stats["sparse"], edit.stats.get("dense")
    per_call = (dense.macs / dense.unet_calls) if dense and dense.unet_calls else None
    saving = f", {per_call / (sparse.macs / sparse.unet_calls):.1f}x fewer MACs per call" if per_call else ""
    print(f"{type(pipe.transformer.unet).__name__}: latents outside the mask: "
          f"{'identical to the source' if kept else 'CHANGED'}; {sparse.unet_calls} sparse transformer calls over "
          f"{100 * edit.region.float().mean():.0f}% of the latents{saving}; wrote {out}/source.png, edited.png")
    return 0


def picture_for(args):
    """The picture a FLUX Kontext pipeline edits: `--image`, or a red circle drawn on gray."""
    from PIL import Image, ImageDraw

    if args.image:
        return Image.open(args.image).convert("RGB")
    picture = Image.new("RGB", (args.size, args.size), (128, 128, 128))
    r = args.size // 5
    ImageDraw.Draw(picture).ellipse((args.size // 2 - r, args.size // 2 - r, args.size // 2 + r, args.size // 2 + r),
                                    fill=(200, 30, 30))
    return picture


if __name__ == "__main__":
    sys.exit(main())
