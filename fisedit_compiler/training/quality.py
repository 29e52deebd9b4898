"""What the embedded shapes model draws and how FISEdit edits it, measured with the pixel evaluator.

    pipe = load_shapes_pipeline()
    generation_rates(pipe, n=50)            # one-object prompts: is the named (colour, shape) there?
    edit_quality(pipe, EDIT_CASES)          # detected masks, new attributes, dense regeneration, approximations

`benchmarks/shapes_quality.py` runs these and writes the results file; `tests/test_shapes_model.py` checks them
with modest thresholds on fewer samples.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..policy import Policy
from .evaluator import count_matches, find_objects
from .shapes import COLOURS, SHAPES, with_article

SHAPES_MODEL = Path(__file__).resolve().parent.parent / "assets" / "shapes"
STEPS = 20
GUIDANCE = 5.0
BACKGROUND = "gray"


def model_label(path: str | Path) -> str:
    """How a result file names the model at `path`: the shipped one by its place in the repository."""
    return "fisedit_compiler/assets/shapes" if Path(path).resolve() == SHAPES_MODEL else str(path)


def load_shapes_pipeline(path: str | Path = SHAPES_MODEL):
    """The shipped shapes model (fp16 on disk) as an fp32 pipeline, through `models.load_pipeline`."""
    from ..models import load_pipeline

    return load_pipeline(path, dtype=torch.float32)


def one_object_prompts() -> list[tuple[str, str, str]]:
    """(prompt, colour, shape) for every colour that shows on the gray background and every shape."""
    colours = [c for c in COLOURS if c != BACKGROUND]
    return [(f"{with_article(f'{colour} {shape}')} on a {BACKGROUND} background", colour, shape) for shape in SHAPES
            for colour in colours]


TWO_OBJECT_PROMPTS = [
    ("a red circle and a blue square on a gray background", [("red", "circle"), ("blue", "square")]),
    ("a yellow triangle and a green cross on a gray background", [("yellow", "triangle"), ("green", "cross")]),
    ("a white square and a purple circle on a gray background", [("white", "square"), ("purple", "circle")]),
]


@dataclasses.dataclass(frozen=True)
class EditCase:
    """A one-attribute edit: the source object (colour, shape) becomes `new` (colour, shape)."""

    old: tuple[str, str]
    new: tuple[str, str]

    def prompt(self, which: tuple[str, str]) -> str:
        return f"{with_article(' '.join(which))} on a {BACKGROUND} background"


EDIT_CASES = [
    EditCase(("blue", "square"), ("green", "square")),
    EditCase(("red", "circle"), ("red", "triangle")),
    EditCase(("yellow", "circle"), ("purple", "circle")),
    EditCase(("white", "square"), ("white", "cross")),
    EditCase(("orange", "triangle"), ("blue", "triangle")),
]


def generate(pipe, prompt: str, seed: int, steps: int = STEPS, guidance: float = GUIDANCE) -> np.ndarray:
    """One seeded generation as an (H, W, 3) uint8 array."""
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(image.convert("RGB"))


def generation_rates(pipe, n: int = 50, n_two: int = 30, steps: int = STEPS) -> dict[str, Any]:
    """The fraction of `n` one-object generations (prompts cycling through `one_object_prompts`, seeds 0..n-1)
    where the named object is found, and of `n_two` two-object generations where both are."""
    prompts = one_object_prompts()
    hits = [count_matches(find_objects(generate(pipe, prompts[i % len(prompts)][0], seed=i, steps=steps),
                                       BACKGROUND), [prompts[i % len(prompts)][1:]]) == 1 for i in range(n)]
    two_hits = []
    for i in range(n_two):
        prompt, wanted = TWO_OBJECT_PROMPTS[i % len(TWO_OBJECT_PROMPTS)]
        found = find_objects(generate(pipe, prompt, seed=1000 + i, steps=steps), BACKGROUND)
        two_hits.append(count_matches(found, wanted))
    return {
        "one_object_rate": float(np.mean(hits)), "one_object_n": n,
        "two_object_both_rate": float(np.mean([h == 2 for h in two_hits])) if two_hits else None,
        "two_object_mean_found": float(np.mean(two_hits)) / 2 if two_hits else None, "two_object_n": n_two,
    }


def _latent_mask_to_image(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    factor = size[0] // mask.shape[0]
    return np.kron(mask.cpu().numpy().astype(np.uint8), np.ones((factor, factor), np.uint8)).astype(bool)


def _object_region(image: np.ndarray, wanted: tuple[str, str]) -> np.ndarray | None:
    """The mask of the largest found object with the wanted colour and shape, or None."""
    for obj in find_objects(image, BACKGROUND):
        if (obj.colour, obj.shape) == wanted:
            return obj.mask
    return None


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR (dB, 8-bit range) of two images over the pixels of `where` (all of them by default); inf if they are
    equal there."""
    squared = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = float((squared if where is None else squared[where]).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


APPROXIMATIONS: dict[str, Policy] = {
    # every approximation of the default policy: recorded GroupNorm statistics, inactive tokens not refreshed, halo 1
    "default (recorded stats, halo 1)": Policy(block_size=4),
    "fresh GroupNorm statistics": Policy(block_size=4, norm_stats="fresh"),
    "halo 2": Policy(block_size=4, halo=2),
    "fresh statistics, halo 2": Policy(block_size=4, norm_stats="fresh", halo=2),
}


def _dense_blended_edit(session, prompt: str, region: torch.Tensor, source: list[torch.Tensor]) -> np.ndarray:
    """The edit computed densely at every step (the eager U-Net: every token refreshed, exact statistics, no cut
    receptive field), with the same blend as a sparse edit: outside `region` the latents are those of the run
    whose trajectory is `source`."""
    def on_step_end(pipe, i, t, kwargs):
        return {"latents": torch.where(region, kwargs["latents"], source[i])}

    images = session._call_pipeline(prompt, on_step_end)
    return np.asarray(images[0].convert("RGB"))


def edit_quality(pipe, cases: list[EditCase] = EDIT_CASES, seeds: tuple[int, ...] = (0, 1), steps: int = STEPS,
                 policy: Policy | None = None, approximations: bool = True) -> dict[str, Any]:
    """Per case and seed: a source generation, an edit with a detected mask, a dense regeneration, and (with
    `approximations`) the detected mask replayed as a user mask under each of `APPROXIMATIONS` against a dense edit
    with the same blend."""
    unets = _CompiledUNets(pipe)
    rows = []
    for case in cases:
        for seed in seeds:
            session = unets.session(policy or Policy(), steps)
            source = session.generate(case.prompt(case.old), generator=torch.Generator().manual_seed(seed))
            source_image = np.asarray(source.images[0].convert("RGB"))
            edited = session.edit(case.prompt(case.new))
            edited_image = np.asarray(edited.images[0].convert("RGB"))
            region = edited.mask
            old_region, new_region = _object_region(source_image, case.old), _object_region(edited_image, case.new)
            row: dict[str, Any] = {"source": case.prompt(case.old), "edit": case.prompt(case.new), "seed": seed,
                                   "old_found": old_region is not None, "new_found": new_region is not None}
            row["mask_fraction"] = float(region.float().mean()) if region is not None else 0.0
            if region is not None:
                outside = ~region
                row["outside_bit_identical"] = bool(torch.equal(edited.latents[..., outside],
                                                                source.latents[..., outside]))
                if old_region is not None or new_region is not None:
                    changed = np.zeros(source_image.shape[:2], bool)
                    for r in (old_region, new_region):
                        if r is not None:
                            changed |= r
                    for name, mask in (("mask_iou", edited.detected), ("region_iou", region)):
                        found = _latent_mask_to_image(mask, source_image.shape[:2])
                        row[name] = float((found & changed).sum() / max((found | changed).sum(), 1))
                    row["detected_fraction"] = float(edited.detected.float().mean())
            # a dense regeneration of the edited prompt from the same noise: how much of the picture moves
            pipe.unet = unets.eager
            dense = generate(pipe, case.prompt(case.new), seed=seed, steps=steps)
            row["dense_changed_fraction"] = float((np.abs(dense.astype(int) - source_image.astype(int)).max(-1)
                                                   > 24).mean())
            row["sparse_changed_fraction"] = float((np.abs(edited_image.astype(int) - source_image.astype(int))
                                                    .max(-1) > 24).mean())
            if approximations and region is not None and not region.all():
                row["psnr_in_mask"] = _approximation_psnr(unets, case, seed, region, steps)
            rows.append(row)
    pipe.unet = unets.eager
    return {"edits": rows, "summary": _summarise(rows)}


class _CompiledUNets:
    """One compiled U-Net per policy (compiling is per policy, not per edit), and sessions over them."""

    def __init__(self, pipe):
        from ..compiler import CompiledUNet

        self.pipe = pipe
        self.eager = pipe.unet.unet if isinstance(pipe.unet, CompiledUNet) else pipe.unet
        self.compiled: dict[Policy, Any] = {}

    def session(self, policy: Policy, steps: int):
        from ..compiler import compile
        from ..editing.session import EditSession

        if policy not in self.compiled:
            self.compiled[policy] = compile(self.eager, policy)
        self.pipe.unet = self.compiled[policy]
        return EditSession(self.pipe, num_inference_steps=steps, guidance_scale=GUIDANCE)


def _approximation_psnr(unets: _CompiledUNets, case: EditCase, seed: int, region: torch.Tensor, steps: int) -> dict:
    """PSNR inside `region` of sparse edits (given as a user mask, so every step is sparse and its halo and blocks
    are recomputed as context) against the dense edit with the same mask and blend, per policy of `APPROXIMATIONS`."""
    result = {}
    references: dict[bytes, np.ndarray] = {}
    for name, policy in APPROXIMATIONS.items():
        session = unets.session(policy, steps)
        session.generate(case.prompt(case.old), generator=torch.Generator().manual_seed(seed))
        source = session.source_trajectory
        sparse = session.edit(case.prompt(case.new), mask=region)
        key = sparse.mask.numpy().tobytes()
        if key not in references:
            references[key] = _dense_blended_edit(session, case.prompt(case.new), sparse.mask, source)
        image = np.asarray(sparse.images[0].convert("RGB"))
        result[name] = psnr(image, references[key], _latent_mask_to_image(sparse.mask, image.shape[:2]))
    return result


def _summarise(rows: list[dict]) -> dict[str, Any]:
    ious = [r["mask_iou"] for r in rows if "mask_iou" in r]
    region_ious = [r["region_iou"] for r in rows if "region_iou" in r]
    psnrs: dict[str, list[float]] = {}
    for r in rows:
        for name, value in r.get("psnr_in_mask", {}).items():
            psnrs.setdefault(name, []).append(value)
    return {
        "edits": len(rows),
        "mean_mask_iou": float(np.mean(ious)) if ious else None,  # the detected mask's
        "mean_region_iou": float(np.mean(region_ious)) if region_ious else None,  # the recomputed region's
        "mean_detected_fraction": float(np.mean([r["detected_fraction"] for r in rows if "detected_fraction" in r]
                                                or [0.0])),
        "new_attribute_rate": float(np.mean([r["new_found"] for r in rows])),
        "source_object_rate": float(np.mean([r["old_found"] for r in rows])),
        "outside_bit_identical": all(r.get("outside_bit_identical", True) for r in rows),
        "mean_mask_fraction": float(np.mean([r["mask_fraction"] for r in rows])),
        "mean_dense_changed_fraction": float(np.mean([r["dense_changed_fraction"] for r in rows])),
        "mean_sparse_changed_fraction": float(np.mean([r["sparse_changed_fraction"] for r in rows])),
        "mean_psnr_in_mask": {name: float(np.mean([v for v in values if math.isfinite(v)] or [math.inf]))
                              for name, values in psnrs.items()},
    }
