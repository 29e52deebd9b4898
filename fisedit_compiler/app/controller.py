"""The functions behind the editing page: what each button does, over one `SessionService`, without Gradio.

    app = EditApp(SessionService(pipe, root=data / "sessions"), data)
    sid, view = app.generate(None, "a red circle on a gray background", seed=0, steps=20)
    sid, view = app.edit(sid, "a blue circle on a gray background", painted=None)   # mask detected
    sid, view = app.undo(sid)
    zip_path = app.download(sid)
    sid, view = app.open_saved(zip_path)

Each browser session holds a session id (None until its first image); every call returns the id and a `View`: what
the page shows (the current picture, the last edit's before | after | recomputed region, its savings against a
dense regeneration, the history). A request the app cannot serve raises `AppError` with a message for the page;
nothing of a session is lost by one (the service reopens its last saved state).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..editing.persistence import SessionFileError
from ..editing.session import EditResult, PhaseStats
from ..editing.token_alignment import PromptTooLongError
from ..inputs import MaskError
from ..report import mask_overlay
from ..service import ServiceError, SessionService

MAX_UPLOAD_PIXELS = 4096 * 4096  # larger uploads are refused before decoding (a picture is resized to the model's)


class AppError(ValueError):
    """A request the page cannot serve; its message is shown on the page."""


@dataclasses.dataclass
class View:
    """What the page shows after a request."""

    current: Image.Image | None = None  # the session's current picture (the next edit's, where masks are painted)
    before: Image.Image | None = None  # the last edit's picture before, after, and its recomputed region
    after: Image.Image | None = None
    region: Image.Image | None = None
    summary: str = ""  # the last request's work against a dense regeneration, in Markdown
    history: list[tuple[Image.Image, str]] = dataclasses.field(default_factory=list)  # (picture, prompt), oldest first


@dataclasses.dataclass
class _Cost:
    calls: int
    macs: float
    seconds: float

    @staticmethod
    def of(stats: dict[str, Any]) -> _Cost:
        phases = [v for v in stats.values() if isinstance(v, PhaseStats)]
        return _Cost(sum(p.unet_calls for p in phases), sum(p.macs for p in phases), sum(p.seconds for p in phases))


class EditApp:
    """The page's functions over `service`; downloads and uploaded sessions live under `data`. Idle sessions are
    saved and dropped from memory after `idle_seconds` (`start_idle_eviction`)."""

    def __init__(self, service: SessionService, data: str | Path, idle_seconds: float = 900.0):
        self.service = service
        self.data = Path(data)
        self.idle_seconds = idle_seconds
        self._regeneration: dict[str, _Cost] = {}  # per session: its source run's denoiser work (a regeneration's)

    # --- requests ------------------------------------------------------------------------------------------------

    def generate(self, sid: str | None, prompt: str, seed: Any = 0, steps: Any = None) -> tuple[str, View]:
        seed, steps = _integer(seed, "the seed", 0), _integer(steps, "the steps", 1, none=True)
        with _explained():
            sid = sid or self.service.create()
            result = self.service.generate(sid, _prompt(prompt), seed=seed, steps=steps)
        self._regeneration[sid] = _Cost.of(result.stats)
        cost = self._regeneration[sid]
        return sid, self._view(sid, summary=f"Generated in {cost.seconds:.1f} s ({cost.calls} denoiser calls, "
                               f"{cost.macs / 1e9:.1f} GMACs); recorded for the edits.")

    def upload(self, sid: str | None, image: Any, prompt: str, steps: Any = None) -> tuple[str, View]:
        picture = _picture(image)
        steps = _integer(steps, "the steps", 1, none=True)
        with _explained():
            sid = sid or self.service.create()
            result = self.service.upload(sid, picture, _prompt(prompt), steps=steps)
        self._regeneration[sid] = _Cost.of({k: v for k, v in result.stats.items() if k != "inversion"})
        return sid, self._view(sid, summary=f"Loaded a {picture.width}x{picture.height} picture (resized to "
                               f"{result.images[0].width}x{result.images[0].height}) and inverted it.")

    def edit(self, sid: str | None, prompt: str, painted: Any = None) -> tuple[str, View]:
        if sid is None:
            raise AppError("there is no picture to edit yet: generate one or upload one first")
        with _explained():
            before = self.service.current(sid).images[0]
            mask = painted_mask(painted, before.size)
            result = self.service.edit(sid, _prompt(prompt), mask=mask)
        if result.region is None:
            return sid, self._view(sid, summary="Nothing changed: the detected region is empty (the edit does not "
                                   "change what the picture shows), so the picture stays as it was.")
        region = mask_overlay(before, result.mask)
        return sid, self._view(sid, before, result.images[0], region, self._savings(sid, result))

    def undo(self, sid: str | None) -> tuple[str, View]:
        if sid is None:
            raise AppError("nothing to undo: there is no picture yet")
        with _explained():
            self.service.undo(sid)
        return sid, self._view(sid, summary="Back to the picture before the last edit.")

    def download(self, sid: str | None) -> Path:
        """A zip of the session's current state (a saved session), which `open_saved` opens again."""
        if sid is None:
            raise AppError("there is no session to download yet: generate or upload a picture first")
        with _explained():
            folder = self.service.download(sid)
        target = self.data / "downloads" / f"fisedit-session-{sid}"
        return Path(shutil.make_archive(str(target), "zip", folder))

    def open_saved(self, file: Any) -> tuple[str, View]:
        """A new session from a downloaded session zip (refused, naming why, if it was made with another model)."""
        path = Path(getattr(file, "name", file) or "")
        if not path.is_file() or not zipfile.is_zipfile(path):
            raise AppError(f"{path.name or 'the file'} is not a session downloaded from this app (a .zip)")
        folder = self.data / "uploads" / path.stem
        shutil.rmtree(folder, ignore_errors=True)
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():  # inside the folder only
                if Path(member).is_absolute() or ".." in Path(member).parts:
                    raise AppError(f"{path.name} holds a path outside its folder ({member}): not a session download")
            archive.extractall(folder)
        with _explained():
            sid = self.service.open_saved(folder)
        return sid, self._view(sid, summary="Opened the saved session: edit on.")

    def warm_up(self, prompt: str = "a picture", steps: int = 2) -> None:
        """Capture and compile the model once (`SessionService.warm_up`), so that a user's first picture takes the
        time of a generation, and the dense regeneration estimated from it is not a compile's."""
        self.service.warm_up(prompt, steps)

    @contextlib.contextmanager
    def reporting(self, report: Callable[[int, int], None]) -> Iterator[None]:
        """Inside, every denoising loop of the shared pipeline reports `report(steps done, steps)` as it goes (its
        `progress_bar`, which diffusers pipelines step, is wrapped): the page's progress bar."""
        pipe = self.service.pipe
        original = pipe.progress_bar

        def progress_bar(iterable=None, total=None):
            return _Reported(original(iterable=iterable, total=total), report,
                             total if total is not None else len(iterable))

        pipe.progress_bar = progress_bar  # an instance attribute, over the method, until the request ends
        try:
            yield
        finally:
            del pipe.progress_bar

    # --- idle sessions -------------------------------------------------------------------------------------------

    def evict_idle(self) -> list[str]:
        """Drop the sessions idle longer than `idle_seconds` from memory (their states stay on disk)."""
        return self.service.evict_idle(self.idle_seconds)

    def start_idle_eviction(self, every: float = 60.0) -> None:
        """Evict idle sessions every `every` seconds, on a daemon thread, until `stop`."""
        self.service.start_idle_eviction(self.idle_seconds, every)

    def stop(self) -> None:
        self.service.close()

    # --- views ---------------------------------------------------------------------------------------------------

    def _view(self, sid: str, before=None, after=None, region=None, summary: str = "") -> View:
        states = self.service.states(sid)
        history = [(Image.open(path).convert("RGB"), prompt) for prompt, path in states]
        return View(history[-1][0] if history else None, before, after, region, summary, history)

    def _savings(self, sid: str, result: EditResult) -> str:
        edit = _Cost.of(result.stats)
        region = float(result.mask.float().mean()) if result.mask is not None else 1.0
        lines = [f"**Edit**: {edit.calls} denoiser calls, {edit.macs / 1e9:.1f} GMACs, {edit.seconds:.1f} s; "
                 f"recomputed {region:.0%} of the picture."]
        dense = self._regeneration.get(sid)
        if dense is None or not dense.macs:
            lines.append("A dense regeneration's cost is estimated from the session's source run, which this session "
                         "(opened from a file) did not make here.")
        else:
            time = (f"**{1 - edit.seconds / dense.seconds:.0%} of the time**" if edit.seconds <= dense.seconds else
                    f"took **{edit.seconds / dense.seconds - 1:.0%} more time** (on a model this small a sparse "
                    "call's fixed costs outweigh the MACs it saves)")
            lines.append(f"**Dense regeneration** (estimated from this session's source run): {dense.calls} calls, "
                         f"{dense.macs / 1e9:.1f} GMACs, {dense.seconds:.1f} s. The edit saved "
                         f"**{1 - edit.macs / dense.macs:.0%} of the MACs** and {time}.")
        return "\n\n".join(lines)


class _Reported:
    """A pipeline's progress bar that also reports each step: used as a context manager with `update()`, or
    iterated."""

    def __init__(self, bar, report: Callable[[int, int], None], total: int):
        self.bar, self.report, self.total, self.done = bar, report, total, 0

    def __enter__(self):
        self.bar.__enter__()
        self.report(0, self.total)
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        self.done += n
        self.report(self.done, self.total)

    def __iter__(self):
        for item in self.bar:
            yield item
            self.done += 1
            self.report(self.done, self.total)

    def __getattr__(self, name: str):
        return getattr(self.bar, name)


def painted_mask(painted: Any, size: tuple[int, int]) -> Image.Image | None:
    """The mask a user painted over the current picture (white = edit), or None where nothing is painted (the mask is
    then detected). `painted`: a Gradio `ImageEditor` value (a dict with "layers": what was painted, RGBA, over a
    "background"), a PIL image or a NumPy array, at the picture's `size` (w, h)."""
    if painted is None:
        return None
    layers = painted.get("layers") if isinstance(painted, dict) else [painted]
    alpha = None
    for layer in layers or []:
        if layer is None:
            continue
        array = np.asarray(layer)
        if array.ndim == 3 and array.shape[2] == 4:
            strokes = array[..., 3] > 0
        else:  # a mask image: white (or any non-black) = edit
            strokes = (array.reshape(*array.shape[:2], -1) > 127).any(-1)
        if strokes.shape != (size[1], size[0]):
            raise AppError(f"the mask was painted on a {strokes.shape[1]}x{strokes.shape[0]} picture, the current one "
                           f"is {size[0]}x{size[1]}: paint on the current picture")
        alpha = strokes if alpha is None else alpha | strokes
    if alpha is None or not alpha.any():
        return None
    return Image.fromarray(alpha.astype(np.uint8) * 255, "L")


def _picture(image: Any) -> Image.Image:
    """An uploaded picture as RGB (a path, a PIL image or an array), refused with the reason if it is none."""
    if image is None:
        raise AppError("choose a picture to upload first")
    try:
        if isinstance(image, (str, Path)):
            Image.MAX_IMAGE_PIXELS = MAX_UPLOAD_PIXELS
            image = Image.open(image)
            image.load()
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, TypeError, ValueError) as e:
        raise AppError(f"the upload is not a picture this app can read: {e}") from e
    if not isinstance(image, Image.Image):
        raise AppError(f"the upload is a {type(image).__name__}, not a picture")
    if image.width * image.height > MAX_UPLOAD_PIXELS or min(image.size) < 16:
        raise AppError(f"the picture is {image.width}x{image.height}: give one between 16x16 and 4096x4096 pixels "
                       "(it is cropped to the model's aspect ratio and resized to its size)")
    return image.convert("RGB")


def _prompt(prompt: Any) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise AppError("type a prompt first")
    return prompt.strip()


def _integer(value: Any, what: str, low: int, none: bool = False) -> int | None:
    if value is None or value == "":
        if none:
            return None
        raise AppError(f"{what} is missing")
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        raise AppError(f"{what} must be a whole number, got {value!r}") from None
    if number != float(value) or number < low:
        raise AppError(f"{what} must be a whole number >= {low}, got {value!r}")
    return number


class _explained:
    """Turns what the service refuses (unknown session, bad mask or prompt, a file from another model) into
    `AppError`s with the service's message."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None and isinstance(error, (ServiceError, MaskError, SessionFileError, PromptTooLongError,
                                                    ValueError, TypeError)) and not isinstance(error, AppError):
            raise AppError(str(error)) from error
        return False
