"""Editing real pictures: what inversion step skipping (EEdit's ISS) costs and buys, and an edit's seconds against
the usual inversion-based baseline.

    .venv/bin/python benchmarks/inversion.py              # writes benchmarks/results/inversion.{json,md}
    .venv/bin/python benchmarks/inversion.py --scenes 2   # a quick look

On the embedded shapes model (`--model DIR` for another SD 1.x/2.x folder), pictures rendered by the scene
generator the model was trained on (one object each, seeded), each described by its caption. Per ISS m:
- `load_image` seconds and U-Net calls (inversion, then the source run recorded on the inversion trajectory);
- PSNR of the picture `load_image` returns against the input (the VAE's reconstruction: the recorded run follows the
  inversion, so it does not depend on m);
- PSNR of a free DDIM run from the inverted noise against the input, with guidance 1 (how well the noise encodes
  the picture: what m costs) and with the session's guidance (what a dense edit run starts from).
Per picture (m = the policy default): a user-mask edit that recolours the object (a box around it) against the
baseline: DDIM inversion with m = 1 and a dense run of the edited prompt from its noise.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import fisedit_compiler as fisedit
from fisedit_compiler.editing.inversion import ddim_inversion, image_tensor
from fisedit_compiler.editing.session import EditSession
from fisedit_compiler.training import quality
from fisedit_compiler.training.shapes import COLOURS, render_scene
from results_io import machine, write_results

SKIPS = (1, 2, 3, 4)


def scenes(n: int) -> list:
    """`n` one-object scenes on plain backgrounds, seeded."""
    found, index = [], 0
    while len(found) < n:
        scene = render_scene(np.random.default_rng([7, index]))
        index += 1
        if len(scene.objects) == 1 and scene.spec.texture == "plain":
            found.append(scene)
    return found


def free_run(session: EditSession, prompt: str, guidance: float) -> np.ndarray:
    """A plain DDIM run of `prompt` from the session's initial latents (the inverted noise)."""
    image = session.pipe(prompt, latents=session._latents.clone(), num_inference_steps=session.num_inference_steps,
                         guidance_scale=guidance, height=session.height, width=session.width).images[0]
    return np.asarray(image)


def recoloured(scene) -> tuple[str, str]:
    """The scene's caption with its object in another colour, and that colour."""
    obj = scene.objects[0]
    colour = next(c for c in COLOURS if c not in (obj.colour, scene.spec.background))
    return scene.caption.replace(obj.colour, colour, 1), colour


def box_mask(scene, latent: int, factor: int, pad: int = 1) -> torch.Tensor:
    y0, x0, y1, x1 = scene.objects[0].bbox
    mask = torch.zeros(latent, latent, dtype=torch.bool)
    mask[max(0, y0 // factor - pad): min(latent, -(-y1 // factor) + pad),
         max(0, x0 // factor - pad): min(latent, -(-x1 // factor) + pad)] = True
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(quality.SHAPES_MODEL))
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=quality.STEPS)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    from PIL import Image

    start = time.perf_counter()
    pipe = quality.load_shapes_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    guidance = quality.GUIDANCE
    rows, edits = [], []
    default_skip = fisedit.Policy().inversion_skip
    for n, scene in enumerate(scenes(args.scenes)):
        picture = Image.fromarray(scene.image)
        for skip in SKIPS:
            session = EditSession(pipe, policy=fisedit.Policy(inversion_skip=skip),
                                  num_inference_steps=args.steps, guidance_scale=guidance)
            t0 = time.perf_counter()
            source = session.load_image(picture, scene.caption)
            seconds = time.perf_counter() - t0
            rows.append({
                "scene": n, "caption": scene.caption, "skip": skip, "load_seconds": seconds,
                "inversion_unet_calls": source.stats["inversion"].unet_calls,
                "record_unet_calls": source.stats["dense"].unet_calls,
                "psnr_loaded": quality.psnr(np.asarray(source.images[0]), scene.image),
                "psnr_free_guidance_1": quality.psnr(free_run(session, scene.caption, 1.0), scene.image),
                "psnr_free_guidance": quality.psnr(free_run(session, scene.caption, guidance), scene.image),
            })
            print(rows[-1], flush=True)
            if skip != default_skip:
                continue
            prompt, colour = recoloured(scene)
            mask = box_mask(scene, session._latents.shape[-1], pipe.vae_scale_factor)
            t0 = time.perf_counter()
            edit = session.edit(prompt, mask=mask)
            edit_seconds = time.perf_counter() - t0
            # the baseline: plain DDIM inversion (m = 1) and a dense run of the edited prompt from its noise
            baseline = EditSession(pipe, policy=fisedit.Policy(inversion_skip=1), num_inference_steps=args.steps,
                                   guidance_scale=guidance)
            t0 = time.perf_counter()
            with torch.no_grad():
                pixels = image_tensor(picture, baseline.height, baseline.width)
                clean = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
                pipe.scheduler.set_timesteps(args.steps)
                text, _ = pipe.encode_prompt(scene.caption, clean.device, 1, False)
                inversion = ddim_inversion(
                    pipe.unet, pipe.scheduler, clean, text, pipe.scheduler.timesteps.clone())
            baseline._latents = inversion.latents[0]
            dense = free_run(baseline, prompt, guidance)
            baseline_seconds = time.perf_counter() - t0
            outside = ~np.kron(mask.numpy(), np.ones((pipe.vae_scale_factor,) * 2, dtype=bool))
            edits.append({
                "scene": n, "edit": prompt, "mask_fraction": float(mask.float().mean()),
                "edit_seconds": edit_seconds, "baseline_seconds": baseline_seconds,
                "edit_psnr_outside_mask": quality.psnr(np.asarray(edit.images[0]), scene.image, outside),
                "baseline_psnr_outside_mask": quality.psnr(dense, scene.image, outside),
            })
            print(edits[-1], flush=True)
    summary = {}
    for skip in SKIPS:
        mine = [r for r in rows if r["skip"] == skip]
        summary[skip] = {key: float(np.mean([r[key] for r in mine])) for key in (
            "load_seconds", "inversion_unet_calls", "record_unet_calls", "psnr_loaded", "psnr_free_guidance_1",
            "psnr_free_guidance")}
    edit_summary = {key: float(np.mean([e[key] for e in edits])) for key in (
        "mask_fraction", "edit_seconds", "baseline_seconds", "edit_psnr_outside_mask", "baseline_psnr_outside_mask")}
    data = {
        "model": quality.model_label(args.model), "steps": args.steps, "guidance": guidance, "scenes": args.scenes, "default_skip": default_skip,
        "per_skip": summary, "edit": edit_summary, "rows": rows, "edits": edits,
        "seconds": time.perf_counter() - start, "machine": machine(),
    }
    write_results(args.out, "inversion", data, _format(data))


def _format(data: dict) -> str:
    lines = [
        "# Real pictures: inversion step skipping and the cost of an edit",
        "",
        f"Model `{data['model']}`, {data['scenes']} rendered one-object pictures (128x128), {data['steps']} DDIM "
        f"steps, guidance {data['guidance']}; {data['machine']['date']}, git {data['machine']['git']}, "
        f"{data['machine']['threads']} threads, {data['seconds']:.0f} s. `benchmarks/inversion.py`.",
        "",
        "| ISS m | U-Net calls: inversion + recording | load_image s | PSNR of load_image's picture (dB) | "
        "PSNR, free run from the inverted noise, guidance 1 | the same, guidance " + f"{data['guidance']:g} |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for skip, s in data["per_skip"].items():
        lines.append(f"| {skip} | {s['inversion_unet_calls']:.0f} + {s['record_unet_calls']:.0f} | "
                     f"{s['load_seconds']:.2f} | {s['psnr_loaded']:.1f} | {s['psnr_free_guidance_1']:.1f} | "
                     f"{s['psnr_free_guidance']:.1f} |")
    e = data["edit"]
    lines += [
        "",
        "The picture `load_image` returns is the VAE's reconstruction for every m: the source run is recorded on the "
        "inversion trajectory, and edits keep it outside their mask. m only changes how well the inverted noise "
        "encodes the picture (the free runs), which a dense baseline depends on and an edit does not outside its "
        "mask.",
        "",
        f"An edit that recolours the object inside a box around it (m = {data['default_skip']}, "
        f"mask {100 * e['mask_fraction']:.1f}% of the latents): {e['edit_seconds']:.2f} s after `load_image`, "
        f"against {e['baseline_seconds']:.2f} s for the usual baseline (plain DDIM inversion and a dense run of the "
        f"edited prompt from its noise). PSNR outside the mask against the input: edit "
        f"{e['edit_psnr_outside_mask']:.1f} dB, baseline {e['baseline_psnr_outside_mask']:.1f} dB.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
