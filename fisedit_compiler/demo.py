"""The demo edit session and the `fisedit edit` command: generate, edit, write pictures and a per-phase report."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .editing.session import EditResult, EditSession, PhaseStats, _Meter
from .editing.token_alignment import token_ids
from .policy import Policy

RANDOM_WEIGHTS_NOTE = (
    "The default model has random weights (no pretrained weights can be downloaded), so its pictures are noise "
    "and its detected masks do not follow the prompt's meaning; the numbers (MACs, seconds, cache bytes) are real. "
    "Point --model at a local diffusers folder for real images."
)


def mask_overlay(image: Image.Image, mask: torch.Tensor) -> Image.Image:
    """The image with the latent-resolution mask drawn over it in red."""
    upsampled = Image.fromarray(mask.cpu().numpy().astype(np.uint8) * 255).resize(image.size, Image.NEAREST)
    red = Image.new("RGB", image.size, (255, 0, 0))
    return Image.composite(Image.blend(image.convert("RGB"), red, 0.5), image.convert("RGB"), upsampled)


def dense_regeneration(session: EditSession, prompt: str) -> PhaseStats:
    """Regenerate `prompt` densely with the eager U-Net (same latents, steps and scheduler), metered the same way."""
    meter = _Meter(session.unet)  # outside record()/sparse() the compiled U-Net runs the eager one
    try:
        session._call_pipeline(prompt, lambda pipe, i, t, kwargs: {})
    finally:
        phases = meter.close()
    return phases["dense"]


def _row(name: str, stats: PhaseStats | None) -> dict:
    if stats is None or not stats.unet_calls:
        return {"phase": name, "unet_calls": 0, "gmacs": 0.0, "seconds": 0.0, "gmacs_per_call": 0.0,
                "seconds_per_call": 0.0}
    return {"phase": name, "unet_calls": stats.unet_calls, "gmacs": stats.macs / 1e9, "seconds": stats.seconds,
            "gmacs_per_call": stats.macs / 1e9 / stats.unet_calls, "seconds_per_call": stats.seconds / stats.unet_calls}


def report(source: EditResult, edits: list[EditResult], dense: PhaseStats) -> dict:
    """Per-phase rows and the savings of each edit against the dense regeneration of its prompt."""
    rows = [_row("source (record)", source.stats.get("dense"))]
    summary = []
    for n, result in enumerate(edits, 1):
        phases = {name: result.stats.get(name) for name in ("dense", "sparse")}
        rows += [_row(f"edit {n}: {name}", stats) for name, stats in phases.items()]
        macs = sum(s.macs for s in phases.values() if s)
        seconds = sum(s.seconds for s in phases.values() if s)
        sparse = phases["sparse"]
        summary.append({
            "edit": n, "prompt": result.prompt,
            "mask_fraction": float(result.mask.float().mean()) if result.mask is not None else 0.0,
            "macs_saved_vs_dense": 1 - macs / dense.macs,
            "seconds_saved_vs_dense": 1 - seconds / dense.seconds,
            "sparse_call_macs_ratio": (dense.macs / dense.unet_calls) / (sparse.macs / sparse.unet_calls)
            if sparse and sparse.macs else None,
            "sparse_call_speedup": (dense.seconds / dense.unet_calls) / (sparse.seconds / sparse.unet_calls)
            if sparse and sparse.seconds else None,
            "cache_bytes": result.stats["cache_bytes"],
        })
    rows.append(_row("dense regeneration of the last prompt", dense))
    return {"phases": rows, "edits": summary, "note": RANDOM_WEIGHTS_NOTE}


def format_report(data: dict) -> str:
    lines = ["| phase | U-Net calls | GMACs | seconds | GMACs/call | s/call |", "|---|---:|---:|---:|---:|---:|"]
    for r in data["phases"]:
        lines.append(f"| {r['phase']} | {r['unet_calls']} | {r['gmacs']:.2f} | {r['seconds']:.2f} | "
                     f"{r['gmacs_per_call']:.3f} | {r['seconds_per_call']:.3f} |")
    lines.append("")
    for e in data["edits"]:
        per_call = ""
        if e["mask_fraction"] == 1.0:
            per_call = "; the region to recompute is every latent pixel, so the steps after the switch ran dense"
        elif e["sparse_call_macs_ratio"]:
            per_call = (f"; a sparse U-Net call costs {e['sparse_call_macs_ratio']:.2f}x fewer MACs and runs "
                        f"{e['sparse_call_speedup']:.2f}x faster than a dense one")
        lines.append(
            f"edit {e['edit']} ({e['prompt']!r}): mask covers {100 * e['mask_fraction']:.1f}% of the latents; "
            f"against a dense regeneration it saves {100 * e['macs_saved_vs_dense']:.1f}% of the U-Net MACs and "
            f"{100 * e['seconds_saved_vs_dense']:.1f}% of the U-Net time{per_call}; cache "
            f"{e['cache_bytes'] / 2**20:.1f} MiB."
        )
    lines += ["", data["note"]]
    return "\n".join(lines)


def run_session(pipe, prompt: str, edits: list[tuple[str, torch.Tensor | None]], out: Path, steps: int, seed: int,
                policy: Policy, log=print) -> dict:
    """Generate `prompt`, apply `edits` (prompt, mask or None to detect it) in turn (continuous), write pictures
    and a report into `out`."""
    for text in [prompt, *(edited for edited, _ in edits)]:  # fail before any work on an over-long prompt
        token_ids(pipe.tokenizer, text)
    out.mkdir(parents=True, exist_ok=True)
    session = EditSession(pipe, policy=policy, num_inference_steps=steps)
    start = time.perf_counter()
    source = session.generate(prompt, generator=torch.Generator().manual_seed(seed))
    source.images[0].save(out / "source.png")
    log(f"source: {prompt!r} ({time.perf_counter() - start:.1f}s)")
    results = []
    for n, (edited_prompt, mask) in enumerate(edits, 1):
        start = time.perf_counter()
        result = session.edit(edited_prompt, mask=mask)
        suffix = "" if len(edits) == 1 else f"_{n}"
        result.images[0].save(out / f"edited{suffix}.png")
        mask_overlay(source.images[0], result.mask).save(out / f"mask{suffix}.png")
        results.append(result)
        how = "detected mask" if mask is None else "given mask"
        log(f"edit {n}: {edited_prompt!r}, {how} ({time.perf_counter() - start:.1f}s)")
    dense = dense_regeneration(session, edits[-1][0])
    data = report(source, results, dense)
    (out / "report.json").write_text(json.dumps(data, indent=2, default=_jsonable))
    text = format_report(data)
    (out / "report.md").write_text(text + "\n")
    return data


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
