"""Edit inside an unchanged diffusers pipeline with `fisedit.compile`: record a generation, then run an edited
prompt sparsely over a mask. Outside the mask's region every latent is the source's, bit for bit.

    python examples/pipeline_edit.py --out out/pipeline_edit                 # the embedded shapes model
    python examples/pipeline_edit.py --model PATH --prompt ... --edit ...    # a local diffusers pipeline folder
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
    parser.add_argument("--out", default="out/pipeline_edit")
    args = parser.parse_args(argv)

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    sparse_unet = fisedit.compile(pipe.unet, fisedit.Policy())
    pipe.unet = sparse_unet  # a drop-in U-Net: the pipeline is not changed
    size = pipe.unet.config.sample_size
    latents = torch.randn(1, pipe.unet.config.in_channels, size, size, generator=torch.Generator().manual_seed(5))
    call = dict(num_inference_steps=args.steps, guidance_scale=5.0, output_type="latent")

    with torch.no_grad(), sparse_unet.record():  # the source run: dense, recording what sparse calls read
        source = pipe(args.prompt, latents=latents.clone(), **call).images
    mask = torch.zeros(size, size, dtype=torch.bool)  # the right half of the picture, at latent resolution
    mask[:, size // 2:] = True
    with torch.no_grad(), sparse_unet.sparse(mask):  # the edit run: only the mask's region is computed
        recomputed = sparse_unet.active_pixels()
        edited = pipe(args.edit, latents=latents.clone(), **call).images

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    decode(pipe, source).save(out / "source.png")
    decode(pipe, edited).save(out / "edited.png")
    kept = torch.equal(source[..., ~recomputed], edited[..., ~recomputed])
    print(f"latents outside the recomputed region: {'identical to the source' if kept else 'CHANGED'}")
    print(f"recorded {len(sparse_unet.cache.steps)} steps ({sparse_unet.cache.nbytes / 2**20:.1f} MiB); the edit "
          f"recomputed {100 * recomputed.float().mean():.0f}% of the latents; wrote {out}/source.png, edited.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
