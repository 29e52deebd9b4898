"""Save an edit session to a folder and load it back: safetensors files and a JSON manifest, never pickle.

    session.save("my-session")                       # after generate() / edit()
    session = EditSession.load("my-session", pipe)   # later, in another process: edit() goes on from there

The folder holds `session.json` (format, prompts, policy, scheduler class and config, steps, guidance, size,
noise seed, the record cache's latent shape and step keys, and a fingerprint of the U-Net: its class, config and
a SHA-256 of its weights), `latents.safetensors` (the initial noise, the current run's latents after every step,
its mask and recomputed region) and one `steps/<n>.safetensors` per recorded step (every recorded tensor, named in the
file's metadata by its stable key and role). Loading checks the fingerprint, the scheduler and the shapes, and
refuses a mismatch or a damaged file with an error that names it; nothing is loaded into an existing session, so
a failed load loses nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..ir.signature import Settings
from ..policy import Policy
from ..runtime.tiered_store import MemoryBudget, make_store
from ..runtime.cache import RecordCache, StepKey, StepRecord
from ..runtime.safetensors_io import read_safetensors, write_safetensors
from .pipelines import denoiser

PICTURE = "picture.png"  # the picture a FLUX Kontext session edits
FORMAT = "fisedit-session/2"  # 2: residual sums are recorded instead of their terms (passes/windows.py)
MANIFEST = "session.json"
LATENTS = "latents.safetensors"
STEPS = "steps"


class SessionFileError(ValueError):
    """A session folder that cannot be loaded: missing or damaged files, or one made for another model,
    scheduler or latent size."""


def unet_fingerprint(unet: torch.nn.Module) -> dict[str, Any]:
    """The class, config and a SHA-256 of the weights (names, dtypes, shapes and bytes) of a model."""
    digest = hashlib.sha256()
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    config = dict(getattr(unet, "config", {}) or {})
    return {"class": type(unet).__name__, "config": json.loads(json.dumps(config, default=str)),
            "weights_sha256": digest.hexdigest()}


def _jsonable_config(config) -> dict[str, Any]:
    return json.loads(json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, default=str))


def save_session(session, path: str | Path) -> Path:
    """Write `session` (an `EditSession` with a current run) to the folder `path`; see the module docstring."""
    if session._source is None:
        raise RuntimeError("nothing to save: call generate(prompt) first")
    folder = Path(path)
    (folder / STEPS).mkdir(parents=True, exist_ok=True)
    cache, run = session.cache, session._source
    steps = []
    for n, key in enumerate(cache.steps):
        tensors, names = cache.step(key).to_tensors(contiguous=False)
        file = f"{STEPS}/{n:04d}.safetensors"
        write_safetensors(folder / file, tensors, {"refs": json.dumps(names)})
        steps.append({"file": file, "direction": key.direction, "timesteps": list(key.timesteps),
                      "batch": key.batch, "occurrence": key.occurrence})
    latents = {"initial": session._latents, **{f"step_{i}": z for i, z in enumerate(run.trajectory)},
               **{f"reference_{i}": z for i, z in enumerate(run.reference or [])}}
    for name in ("mask", "region"):
        if getattr(run.result, name) is not None:
            latents[name] = getattr(run.result, name).to(torch.uint8)
    picture = session._control_image if session.edits_its_picture else None  # the picture FLUX Kontext edits
    if isinstance(picture, torch.Tensor):
        latents["picture"] = picture
    elif picture is not None:
        picture.save(folder / PICTURE)
    write_safetensors(folder / LATENTS, {k: v.detach().cpu() for k, v in latents.items()}, {})
    scheduler = session.pipe.scheduler
    manifest = {
        "format": FORMAT,
        "prompt": run.prompt, "maps_prompt": run.maps_prompt,
        "policy": dataclasses.asdict(session.policy),  # one dict per group; `Policy.from_dict` reads it back
        "scheduler": {"class": type(scheduler).__name__, "config": _jsonable_config(scheduler.config)},
        "num_inference_steps": session.num_inference_steps, "guidance_scale": session.guidance_scale,
        "height": session.height, "width": session.width, "noise_seed": session.noise_seed,
        "latent_shape": list(cache.latent_shape), "extent": list(cache.extent),
        "cache_dtype": str(cache.dtype) if cache.dtype else None,
        "settings": cache.settings.to_json(),  # LoRA state and options: edits of the loaded session must match them
        "trajectory_steps": len(run.trajectory), "reference_steps": len(run.reference or []),
        "loaded_size": list(session._loaded_size) if session._loaded_size else None,
        "picture": picture is not None,
        "steps": steps,
        "unet": unet_fingerprint(session.unet.unet),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    run.result.images[0].save(folder / "image.png")
    return folder


def _read(folder: Path, file: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
    """The file's slab (the one allocation its tensors are views of), tensors and metadata (`read_safetensors`)."""
    path = folder / file
    if not path.is_file():
        raise SessionFileError(f"{path} is missing: the session folder is incomplete")
    try:
        return read_safetensors(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SessionFileError(f"{path} is damaged and cannot be read: {e}") from e


def _check_same(what: str, saved: dict, current: dict) -> None:
    differing = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    if differing:
        shown = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in differing[:3])
        raise SessionFileError(f"the session was saved with another {what} ({shown})")


def _saved_policy(folder: Path, saved: dict[str, Any]) -> Policy:
    """The saved policy: one dict per group, or the flat dict of sessions saved before the groups (`Policy.from_dict`)."""
    try:
        return Policy.from_dict(saved)
    except (TypeError, ValueError) as e:
        raise SessionFileError(f"{folder / MANIFEST} holds a policy this version does not read: {e}") from e


@dataclasses.dataclass
class SavedSession:
    """What a session folder holds, checked against a pipeline (`read_session`); `EditSession.load` builds the
    session from it."""

    prompt: str
    maps_prompt: str
    policy: Policy
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    noise_seed: int | None
    cache: RecordCache
    initial_latents: torch.Tensor
    trajectory: list[torch.Tensor]
    reference: list[torch.Tensor] | None  # a loaded image's detection reference (`session._Run.reference`)
    loaded_size: tuple[int, int] | None
    mask: torch.Tensor | None
    region: torch.Tensor | None
    image: Any
    picture: Any = None  # the picture a FLUX Kontext session edits (its pipeline's `image`)


def _check_pipeline(manifest: dict[str, Any], pipe) -> None:
    """The pipeline's denoiser (class, config, weights) and scheduler are those the session was saved with (its LoRA
    settings are checked by the first edit's calls, as the cache's `settings`)."""
    from ..compiler import CompiledUNet

    model = denoiser(pipe)
    unet = model.unet if isinstance(model, CompiledUNet) else model
    saved, current = manifest["unet"], unet_fingerprint(unet)
    if saved["class"] != current["class"]:
        raise SessionFileError(f"the session was saved with a {saved['class']}, the pipeline has a {current['class']}")
    _check_same("U-Net config", saved["config"], current["config"])
    if saved["weights_sha256"] != current["weights_sha256"]:
        raise SessionFileError("the session was saved with other U-Net weights (their SHA-256 differs): load it "
                               "with the model it was made with")
    scheduler = manifest["scheduler"]
    if scheduler["class"] != type(pipe.scheduler).__name__:
        raise SessionFileError(f"the session was saved with a {scheduler['class']}, the pipeline has a "
                               f"{type(pipe.scheduler).__name__}")
    _check_same("scheduler config", scheduler["config"], _jsonable_config(pipe.scheduler.config))


def read_session(path: str | Path, pipe, memory_budget: MemoryBudget | None = None) -> SavedSession:
    """Read and check the session folder `path` against `pipe`; see the module docstring. The cache read keeps
    within `memory_budget` if given (shared with other sessions: a service's), else a budget made from the saved
    policy (`cache.store.budget`, which the loaded session then shares)."""
    from PIL import Image

    folder = Path(path)
    if not (folder / MANIFEST).is_file():
        raise SessionFileError(f"{folder / MANIFEST} is missing: {folder} is not a saved session")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except json.JSONDecodeError as e:
        raise SessionFileError(f"{folder / MANIFEST} is damaged: {e}") from e
    if manifest.get("format") != FORMAT:
        raise SessionFileError(f"{folder} holds format {manifest.get('format')!r}, expected {FORMAT!r}: it was saved "
                               "by another version of fisedit-compiler, whose recorded tensors this one does not "
                               "read; generate (or load) the source picture again")
    _check_pipeline(manifest, pipe)
    _, latents, _ = _read(folder, LATENTS)
    policy = _saved_policy(folder, manifest["policy"])
    cache = RecordCache(getattr(torch, manifest["cache_dtype"].removeprefix("torch.")) if manifest["cache_dtype"]
                        else None, make_store(policy, memory_budget))
    latent_shape = tuple(manifest["latent_shape"])
    settings = Settings.from_json(manifest.get("settings", []))
    for step in manifest["steps"]:
        slab, tensors, metadata = _read(folder, step["file"])
        key = StepKey(tuple(step["timesteps"]), step["batch"], step["occurrence"], step["direction"])
        record = cache.new_step(key, latent_shape, settings, manifest.get("extent"))
        record.update(StepRecord.from_tensors(tensors, json.loads(metadata.get("refs", "[]")), cache.dtype))
        record.slabs = [slab]  # read into one allocation: nothing to compact
        cache.step_done(key)  # complete: a store with a budget may move it to disk
    initial = latents["initial"]
    if tuple(initial.shape[-2:]) != latent_shape[-2:]:
        raise SessionFileError(f"the saved latents are {tuple(initial.shape)}, the cache {latent_shape}")
    return SavedSession(
        prompt=manifest["prompt"], maps_prompt=manifest["maps_prompt"], policy=policy,
        num_inference_steps=manifest["num_inference_steps"], guidance_scale=manifest["guidance_scale"],
        height=manifest["height"], width=manifest["width"], noise_seed=manifest["noise_seed"], cache=cache,
        initial_latents=initial, trajectory=[latents[f"step_{i}"] for i in range(manifest["trajectory_steps"])],
        reference=[latents[f"reference_{i}"] for i in range(manifest.get("reference_steps", 0))] or None,
        loaded_size=tuple(manifest["loaded_size"]) if manifest.get("loaded_size") else None,
        mask=latents["mask"].bool() if "mask" in latents else None,
        region=latents["region"].bool() if "region" in latents else None,
        image=Image.open(folder / "image.png").convert("RGB"),
        picture=(latents["picture"] if "picture" in latents else Image.open(folder / PICTURE).convert("RGB"))
        if manifest.get("picture") else None,
    )
