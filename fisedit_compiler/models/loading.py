"""What the production path and the trainer use: local pipeline folders and SD's schedulers.

``load_pipeline`` only reads local folders (never the hub), after checking the folder so that a wrong path fails
with an error naming what is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SchedulerName = Literal["ddim", "dpm", "pndm", "euler"]
SCHEDULERS: tuple[str, ...] = ("ddim", "dpm", "pndm", "euler")


# ---------------------------------------------------------------------------
# Schedulers
# ---------------------------------------------------------------------------

# SD 1.x / 2.x / XL training schedule and inference spacing.  prediction_type is
# "epsilon" for every arch - a deliberate simplification: the real SD 2.1-768 is a
# v-prediction model, but with random weights the parameterisation carries no
# meaning, and one prediction type keeps the three archs interchangeable in tests.
_SD_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def make_scheduler(name: SchedulerName = "ddim") -> SchedulerMixin:
    """Return the scheduler ``name`` with SD's beta schedule.

    ddim -> DDIMScheduler, dpm -> DPMSolverMultistepScheduler (DPM-Solver++ 2M),
    pndm -> PNDMScheduler (PLMS only, as in SD), euler -> EulerDiscreteScheduler.
    """
    if name == "ddim":
        return DDIMScheduler(**_SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    if name == "dpm":
        return DPMSolverMultistepScheduler(**_SD_SCHEDULE, algorithm_type="dpmsolver++", solver_order=2)
    if name == "pndm":
        return PNDMScheduler(**_SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler(**_SD_SCHEDULE)
    raise ValueError(f"unknown scheduler {name!r}; expected one of {SCHEDULERS}")


# ---------------------------------------------------------------------------
# Pipeline folders
# ---------------------------------------------------------------------------


def _check_pipeline_folder(path: Path) -> None:
    """Raise a clear error if ``path`` is not a loadable local diffusers folder."""
    if not path.exists():
        raise FileNotFoundError(f"pipeline folder {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"pipeline path {str(path)!r} is not a folder")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} is not a diffusers pipeline folder: no model_index.json in it"
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"malformed model_index.json in {str(path)!r}: {err}") from err
    if not isinstance(index, dict):
        raise ValueError(f"malformed model_index.json in {str(path)!r}: not a JSON object")
    if "unet" not in index and "transformer" not in index:
        raise ValueError(f"model_index.json in {str(path)!r} lists no unet or transformer component")
    # Components are entries like "unet": ["diffusers", "UNet2DConditionModel"];
    # [null, null] marks an optional component that was saved as None.
    components = [
        name for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is not None
    ]
    missing = [name + "/" for name in components if not (path / name).is_dir()]
    if missing:
        raise FileNotFoundError(f"pipeline folder {str(path)!r} is missing component folder(s): {', '.join(missing)}")


def load_pipeline(path: str | Path, **kwargs: Any) -> DiffusionPipeline:
    """Load a pipeline from a local diffusers folder (never from the hub).

    Checks the folder first so that a wrong path fails with an error naming the path
    and what is missing (``FileNotFoundError``: no folder, no ``model_index.json``, a
    missing component folder such as ``unet/``; ``ValueError``: malformed index or a
    component diffusers cannot load).  ``kwargs`` go to ``DiffusionPipeline.from_pretrained``;
    the ``dtype`` defaults to float32, so that every component has the same dtype (left to
    themselves, diffusers casts its models to float32 while transformers keeps the text encoder's
    dtype on disk, and a folder saved in float16 then feeds float16 embeddings to a float32 U-Net).
    ``low_cpu_mem_usage`` defaults to whether ``accelerate`` is installed (diffusers' default needs it, and
    says so at every load). The progress bar is disabled, as for ``random_pipeline``.
    """
    path = Path(path)
    _check_pipeline_folder(path)
    # components saved as None ([null, null] in model_index.json: SD3 without its T5 encoder) load as None, which
    # diffusers asks to be said explicitly for components that are not optional
    index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
    for name, value in index.items():
        if not name.startswith("_") and value == [None, None]:
            kwargs.setdefault(name, None)
    if "dtype" not in kwargs and "torch_dtype" not in kwargs:
        kwargs["dtype"] = torch.float32
    if "low_cpu_mem_usage" not in kwargs:  # diffusers' default, less its notice that `accelerate` is missing
        from diffusers.utils import is_accelerate_available

        kwargs["low_cpu_mem_usage"] = is_accelerate_available()
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"could not load a diffusers pipeline from {str(path)!r}: {err}") from err
    pipe.set_progress_bar_config(disable=True)
    return pipe
