"""The demo edit session (`make demo`): an image generated on the embedded shapes model, then three edits, each
written beside the dense regeneration of its prompt, with the MACs and time saved and a graph dump.

    python examples/demo.py --out out/demo            # the shapes model shipped in the package
    python examples/demo.py --random --out out/demo   # a random-weight SD-layout U-Net (numbers only)
    python examples/demo.py --model PATH              # a local diffusers pipeline folder, the shapes scene's prompts

It takes the model arguments of `fisedit edit` (`fisedit edit --help`).
"""

from __future__ import annotations

import argparse
import sys

import torch
from PIL import Image

from fisedit_compiler import cli
from fisedit_compiler.editing.masks import ellipse_mask
from fisedit_compiler.report import ScriptedEdit
from fisedit_compiler.training.evaluator import find_objects

SHAPES_PROMPT = "a red circle and a blue square on a gray background"
# The source noise of the demo session. With it the source draws exactly the two named objects and each edit changes
# only the object it names (looked at for seeds 0-5: every seed's edits show the new attributes, but seed 0 draws a
# third object and seed 4's shape change also shrinks the circle; the dense regenerations move and resize objects).
SHAPES_SEED = 5
SHAPES_NOTE = (
    "The embedded shapes model draws the named objects in 98% of one-object and 90% of two-object generations "
    "(benchmarks/results/shapes-quality.md); the demo changes one object of a two-object scene at a time, and the "
    "dense regeneration of each edited prompt shows what a user would get without FISEdit."
)
SHAPES_STEPS = 20


def drawn_box_mask(colour: str, shape: str, latent: int, scale_factor: int, pad: int = 1):
    """A user's mask as a function of the image they see: a box around the (colour, shape) object found in it (the
    evaluator's pixel statistics), grown by `pad` latent pixels; the largest object if that one is not found."""
    def mask(image: Image.Image) -> torch.Tensor:
        found = find_objects(image)
        chosen = next((o for o in found if (o.colour, o.shape) == (colour, shape)), found[0] if found else None)
        box = torch.zeros(latent, latent, dtype=torch.bool)
        if chosen is None:  # nothing to draw around: the centre quarter
            box[latent // 4: 3 * latent // 4, latent // 4: 3 * latent // 4] = True
            return box
        y0, x0, y1, x1 = chosen.bbox
        box[max(0, y0 // scale_factor - pad): min(latent, -(-y1 // scale_factor) + pad),
            max(0, x0 // scale_factor - pad): min(latent, -(-x1 // scale_factor) + pad)] = True
        return box

    return mask


def shapes_edits(latent: int, scale_factor: int) -> list[ScriptedEdit]:
    """The shapes model's session: two edits of the square whose masks are detected (its colour, then its shape;
    continuous), and one with a box the user draws around the circle (a shape change: with this model a new colour
    can move the object, which a box then cuts away, while a detected mask follows it)."""
    return [
        ScriptedEdit("a red circle and a green square on a gray background"),
        ScriptedEdit("a red circle and a green triangle on a gray background"),
        ScriptedEdit("a red cross and a green triangle on a gray background",
                 drawn_box_mask("red", "circle", latent, scale_factor)),
    ]


RANDOM_PROMPT = "a cabin in the woods"


def random_edits(latent: int) -> list[ScriptedEdit]:
    """The random-weight model's session: the first edit detects its mask; the second gives one (a 10% ellipse),
    so that it shows sparse savings although random weights make detected masks cover most of the image."""
    given = ellipse_mask(latent, 0.1, center=(0.55, 0.35), grid_offset=0)  # left of centre
    return [ScriptedEdit("a cabin in the woods with a river"),
            ScriptedEdit("a cabin in the woods with a river at night", given)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="examples/demo.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_model_arguments(parser, latent_size=64)
    parser.add_argument("--out", default="out/demo")
    args = parser.parse_args(argv)
    try:
        pipe = cli.pipeline_from_args(args)
        latent = cli.latent_shape(args, args.latent_size if args.random else None)[0]
        if args.random:
            prompt, edits, seed = RANDOM_PROMPT, random_edits(latent), None
        else:
            prompt, edits = SHAPES_PROMPT, shapes_edits(latent, pipe.vae_scale_factor)
            seed = SHAPES_SEED if args.seed is None else args.seed
        # the shapes model's note explains the choice of scene
        note = SHAPES_NOTE if not args.model else None
        return cli.run_edits(args, prompt, edits, note=note, seed=seed, steps=args.steps or SHAPES_STEPS,
                             guidance_scale=args.guidance_scale,
                             pipe=pipe)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
