"""A scripted edit session and its report: generate (or load a picture), apply edits in turn, and write each edit's
pictures beside the dense regeneration of its prompt, with a per-phase report of U-Net calls, MACs and seconds.

`fisedit edit` and the demo (`examples/demo.py`) run sessions with it; benchmarks reuse its pictures.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .editing import GUIDANCE_SCALE
from .editing.session import EditResult, EditSession, PhaseStats, _Meter
from .editing.token_alignment import token_ids
from .policy import Policy
from .runtime.collector import freeze_long_lived_objects

RANDOM_WEIGHTS_NOTE = (
    "This model has random weights (--random), so its pictures are noise and its detected masks do not follow the "
    "prompt's meaning; the numbers (MACs, seconds, cache bytes) are real. Leave out --random for the embedded "
    "shapes model, or point --model at a local diffusers folder."
)


def mask_overlay(image: Image.Image, mask: torch.Tensor) -> Image.Image:
    """The image with the latent-resolution mask drawn over it in red."""
    upsampled = Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255).resize(image.size, Image.NEAREST)
    red = Image.new("RGB", image.size, (255, 0, 0))
    return Image.composite(Image.blend(image.convert("RGB"), red, 0.5), image.convert("RGB"), upsampled)


def dense_regeneration(session: EditSession, prompt: str, inputs: dict | None = None,
                       ) -> tuple[PhaseStats, Image.Image]:
    """Regenerate `prompt` densely with the eager U-Net (same latents, steps and scheduler; `inputs`: an inpainting
    pipeline's picture and mask, `EditSession.inputs_for`), metered the same way: what a user without FISEdit
    would run."""
    meter = _Meter(session.unet, session.call_macs)  # outside record()/sparse() the compiled U-Net runs the eager one
    try:
        images = session._call_pipeline(prompt, lambda pipe, i, t, kwargs: {}, inputs=inputs)
    finally:
        phases = meter.close()
    return phases["dense"], images[0]


SIDE_BY_SIDE_LABELS = ("source", "edited (FISEdit)", "recomputed region", "dense regeneration")
PANEL_GAP = 4  # pixels between `side_by_side`'s panels


def side_by_side(source: Image.Image, edited: Image.Image, mask: torch.Tensor | None,
                 dense: Image.Image, labels=SIDE_BY_SIDE_LABELS) -> Image.Image:
    """One picture per edit: source | edited | recomputed region over the source | dense regeneration."""
    from PIL import ImageDraw

    overlay = mask_overlay(source, mask) if mask is not None else source.convert("RGB")
    panels = [source.convert("RGB"), edited.convert("RGB"), overlay, dense.convert("RGB")]
    w, h = panels[0].size
    scale = max(1, 256 // w)
    gap, caption = PANEL_GAP, 14
    canvas = Image.new("RGB", (len(panels) * (w * scale + gap) - gap, h * scale + caption), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x = i * (w * scale + gap)
        canvas.paste(panel.resize((w * scale, h * scale), Image.NEAREST), (x, caption))
        draw.text((x + 2, 1), label, fill=(0, 0, 0))
    return canvas


def _row(name: str, stats: PhaseStats | None) -> dict:
    if stats is None or not stats.unet_calls:
        return {"phase": name, "unet_calls": 0, "gmacs": 0.0, "seconds": 0.0, "gmacs_per_call": 0.0,
                "seconds_per_call": 0.0}
    return {"phase": name, "unet_calls": stats.unet_calls, "gmacs": stats.macs / 1e9, "seconds": stats.seconds,
            "gmacs_per_call": stats.macs / 1e9 / stats.unet_calls, "seconds_per_call": stats.seconds / stats.unet_calls}


def report(source: EditResult, edits: list[EditResult], dense: list[PhaseStats], note: str | None,
           walls: list[tuple[float, float]] | None = None) -> dict:
    """Per-phase rows and the savings of each edit against the dense regeneration of its prompt; `walls`: per edit,
    the wall-clock seconds of the edit and of the regeneration, everything included (text encoding, mask detection,
    mask plans, first calls, decoding): the time to the picture a user waits for."""
    rows = [_row("source (record)", source.stats.get("dense"))]
    if "inversion" in source.stats:  # a loaded picture: its DDIM inversion came first
        rows.insert(0, _row("source (inversion)", source.stats["inversion"]))
    summary = []
    walls = walls or [(None, None)] * len(edits)
    for n, (result, regeneration, (wall, wall_dense)) in enumerate(zip(edits, dense, walls), 1):
        phases = {name: result.stats.get(name) for name in ("dense", "sparse")}
        rows += [_row(f"edit {n}: {name}", stats) for name, stats in phases.items()]
        rows.append(_row(f"edit {n}: dense regeneration (for comparison)", regeneration))
        macs = sum(s.macs for s in phases.values() if s)
        seconds = sum(s.seconds for s in phases.values() if s)
        sparse = phases["sparse"]
        summary.append({
            "edit": n, "prompt": result.prompt,
            "mask_fraction": float(result.mask.float().mean()) if result.mask is not None else 0.0,
            "region_fraction": float(result.region.float().mean()) if result.region is not None else 0.0,
            "macs_saved_vs_dense": 1 - macs / regeneration.macs,
            "seconds_saved_vs_dense": 1 - seconds / regeneration.seconds,
            "sparse_call_macs_ratio": (regeneration.macs / regeneration.unet_calls) / (sparse.macs / sparse.unet_calls)
            if sparse and sparse.macs else None,
            "sparse_call_speedup": (regeneration.seconds / regeneration.unet_calls)
            / (sparse.seconds / sparse.unet_calls) if sparse and sparse.seconds else None,
            "seconds_to_picture": wall, "regeneration_seconds_to_picture": wall_dense,
            "cache_bytes": result.stats["cache_bytes"],
            "decode": dataclasses.asdict(result.stats["decode"], dict_factory=_json_fields)
            if "decode" in result.stats else None,
        })
    return {"phases": rows, "edits": summary, "note": note}


def _json_fields(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """A dataclass's fields for the report's JSON: tensors (a decode's region map) left out."""
    return {key: value for key, value in items if not isinstance(value, torch.Tensor)}


def _decode_text(decode: dict | None) -> str:
    if decode is None:
        return ""
    if decode["mode"] in ("record", "dense"):
        return f"; the image decoded dense ({decode['seconds']:.2f} s)"
    return (f"; the image decoded sparse, {100 * decode['recomputed']:.1f}% of its pixels recomputed "
            f"({decode['seconds']:.2f} s)")


def _wall_text(edit: dict) -> str:
    if edit.get("seconds_to_picture") is None:
        return ""
    return (f"; the edited picture came after {edit['seconds_to_picture']:.2f} s, the regeneration's after "
            f"{edit['regeneration_seconds_to_picture']:.2f} s (everything included)")


def _time_saved(fraction: float) -> str:
    if fraction >= 0:
        return f"saves {100 * fraction:.1f}% of the U-Net time"
    return f"takes {100 * -fraction:.1f}% more U-Net time"


def format_report(data: dict) -> str:
    lines = ["| phase | U-Net calls | GMACs | seconds | GMACs/call | s/call |", "|---|---:|---:|---:|---:|---:|"]
    for r in data["phases"]:
        lines.append(f"| {r['phase']} | {r['unet_calls']} | {r['gmacs']:.2f} | {r['seconds']:.2f} | "
                     f"{r['gmacs_per_call']:.3f} | {r['seconds_per_call']:.3f} |")
    lines.append("")
    for e in data["edits"]:
        per_call = ""
        if e["region_fraction"] == 1.0:
            per_call = "; the region to recompute is every latent pixel, so the steps after the switch ran dense"
        elif e["sparse_call_macs_ratio"]:
            speedup = e["sparse_call_speedup"]
            pace = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower (per-op overhead)"
            per_call = (f"; a sparse U-Net call costs {e['sparse_call_macs_ratio']:.2f}x fewer MACs and runs "
                        f"{pace} than a dense one")
        lines.append(
            f"edit {e['edit']} ({e['prompt']!r}): mask covers {100 * e['mask_fraction']:.1f}% of the latents, "
            f"the recomputed region {100 * e['region_fraction']:.1f}%; "
            f"against a dense regeneration it saves {100 * e['macs_saved_vs_dense']:.1f}% of the U-Net MACs and "
            f"{_time_saved(e['seconds_saved_vs_dense'])}{per_call}; cache "
            f"{e['cache_bytes'] / 2**20:.1f} MiB{_decode_text(e['decode'])}{_wall_text(e)}."
        )
    if data["note"]:
        lines += ["", data["note"]]
    return "\n".join(lines)


@dataclasses.dataclass
class ScriptedEdit:
    """One edit of a scripted session: the edited prompt, and its mask: None (detected), a mask `EditSession.edit`
    takes, or a function of the current image (a PIL image) that returns one (a user drawing on what they see);
    `paste_back`: `EditSession.edit`'s."""

    prompt: str
    mask: Any = None
    paste_back: int | None = None


def run_session(pipe, prompt: str | None, edits: list[ScriptedEdit], out: Path, steps: int, seed: int, policy: Policy,
                log=print, note: str | None = None, guidance_scale: float = GUIDANCE_SCALE,
                session_dir: Path | None = None, image: Any = None) -> dict:
    """Generate `prompt` (or load `image`, described by `prompt`), apply `edits` in turn (continuous: each edits
    the previous result), and write per edit a side-by-side picture (`edit_<n>.png`) with the dense regeneration
    of its prompt (from the same initial latents: for a loaded image, its inverted noise), and a report, into `out`.

    `session_dir`: a saved session (`EditSession.save`) to continue instead of generating, if it holds one; the
    session after the edits is saved there."""
    saved = session_dir is not None and (session_dir / "session.json").is_file()
    if prompt is None and not saved:
        raise ValueError("a source prompt is needed (--prompt), unless --session names a saved session")
    for text in [*([prompt] if prompt else []), *(edit.prompt for edit in edits)]:  # fail before any work
        token_ids(pipe.tokenizer, text)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if saved:
        session = EditSession.load(session_dir, pipe)
        source = session.current
        log(f"continuing the session in {session_dir}: {source.prompt!r}")
    else:
        session = EditSession(pipe, policy=policy, num_inference_steps=steps, guidance_scale=guidance_scale)
        if session.inpainting and any(edit.mask is None for edit in edits):  # fail before the inversion
            raise ValueError("an inpainting model repaints the mask it is given: give every edit a mask (--mask)")
        if image is not None and session.edits_its_picture:  # FLUX Kontext: the picture is the one it edits
            source = session.generate(prompt, generator=torch.Generator().manual_seed(seed), control_image=image)
            log(f"source: the picture, regenerated under {prompt!r} ({time.perf_counter() - start:.1f}s)")
        elif image is not None:
            source = session.load_image(image, prompt)
            log(f"source: the picture, described as {prompt!r}, inverted and recorded "
                f"({time.perf_counter() - start:.1f}s)")
        else:
            source = session.generate(prompt, generator=torch.Generator().manual_seed(seed))
            log(f"source: {prompt!r} ({time.perf_counter() - start:.1f}s)")
    source.images[0].save(out / "source.png")
    start = time.perf_counter()  # while the user looks at the source: what the first edit would otherwise wait for
    session.prepare_edits()
    freeze_long_lived_objects()  # the pipeline, its graph variants and programs, the record: no full collection
    log(f"prepared the edits' programs ({time.perf_counter() - start:.1f}s)")
    results, regenerations, walls = _run_edits(session, source, edits, out, log)
    if session_dir is not None:
        session.save(session_dir)
        log(f"saved the session to {session_dir} (continue it with --session {session_dir})")
    data = report(source, results, regenerations, note, walls)
    (out / "report.json").write_text(json.dumps(data, indent=2, default=_jsonable))
    text = format_report(data)
    (out / "report.md").write_text(text + "\n")
    return data


def _run_edits(session: EditSession, source: EditResult, edits: list[ScriptedEdit], out: Path, log
               ) -> tuple[list[EditResult], list[PhaseStats], list[tuple[float, float]]]:
    """`run_session`'s edits, each followed by the dense regeneration of its prompt: the results, the
    regenerations' stats, and per edit the wall-clock seconds of the edit and of its regeneration."""
    results, regenerations, walls, current = [], [], [], source
    for n, edit in enumerate(edits, 1):
        start = time.perf_counter()
        mask = edit.mask(current.images[0]) if callable(edit.mask) else edit.mask
        picture = session.picture
        result = session.edit(edit.prompt, mask=mask, paste_back=edit.paste_back)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        stats, dense_image = dense_regeneration(session, edit.prompt, session.inputs_for(picture, result.mask))
        walls.append((seconds, time.perf_counter() - start))
        result.images[0].save(out / f"edited_{n}.png")
        mask_overlay(current.images[0], result.mask).save(out / f"mask_{n}.png")
        side_by_side(current.images[0], result.images[0], result.region, dense_image).save(out / f"edit_{n}.png")
        results.append(result)
        regenerations.append(stats)
        how = "detected mask" if mask is None else "given mask"
        log(f"edit {n}: {edit.prompt!r}, {how} ({seconds:.1f}s)")
        current = result
    return results, regenerations, walls


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
