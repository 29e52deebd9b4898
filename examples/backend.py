"""The same edit through `torch.compile(unet, backend="fisedit")`: dynamo captures the U-Net, and FISEdit's record
and sparse calls run on its graph. Calls outside `fisedit.record()` / `fisedit.sparse()` run dynamo's graph dense.

    python examples/backend.py --out out/backend
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import fisedit_compiler as fisedit
from fisedit_compiler.models import load_pipeline
from fisedit_compiler.training.quality import SHAPES_MODEL


@torch.no_grad()
def decode(pipe, latents: torch.Tensor):
    """The picture of final latents (the pipeline's own decode, done here so that the latents can be compared)."""
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image)[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SHAPES_MODEL), help="a diffusers pipeline folder")
    parser.add_argument("--prompt", default="a red circle and a blue square on a gray background")
    parser.add_argument("--edit", default="a red circle and a green square on a gray background")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="out/backend")
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    # backend="fisedit" takes the default Policy; fisedit.backend(policy) another one
    compiled = torch.compile(pipe.unet, backend=fisedit.backend(fisedit.Policy(block_size=4)))
    pipe.unet = compiled
    size = pipe.unet.config.sample_size
    latents = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(5))
    call = dict(num_inference_steps=args.steps, guidance_scale=5.0, output_type="latent")

    with torch.no_grad(), fisedit.record(compiled):
        source = pipe(args.prompt, latents=latents.clone(), **call).images
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[:, size // 2:] = True
    with torch.no_grad(), fisedit.sparse(compiled, mask) as session:
        recomputed = session.active_pixels()
        edited = pipe(args.edit, latents=latents.clone(), **call).images

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    decode(pipe, source).save(out / "source.png")
    decode(pipe, edited).save(out / "edited.png")
    kept = torch.equal(source[..., ~recomputed], edited[..., ~recomputed])
    print(f"latents outside the recomputed region: {'identical to the source' if kept else 'CHANGED'}")
    print(f"recorded {len(session.cache.steps)} steps through dynamo's graph; the edit recomputed "
          f"{100 * recomputed.float().mean():.0f}% of the latents; wrote {out}/source.png, edited.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
