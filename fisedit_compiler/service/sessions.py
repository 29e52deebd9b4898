"""The session service: edit sessions by id over one pipeline, for front ends (a web app, an HTTP server).

    service = SessionService(pipe, root="data/sessions")      # one pipeline, one memory budget for every session
    sid = service.create()
    service.generate(sid, "a red circle and a blue square on a gray background", seed=5)
    service.edit(sid, "a red circle and a green square on a gray background")   # mask detected
    service.edit(sid, "... a green triangle ...", mask=painted)                 # a user's mask
    service.undo(sid)                          # back to the state before the last edit
    service.evict(sid)                         # out of memory; the next call reopens it from disk
    folder = service.download(sid)             # the current state, a saved session (`EditSession.save`)
    other = service.open_saved(folder)         # a new session from a saved one (checked against the model)

Every state of a session (after each generate, upload and edit) is saved under ``root/<id>/states/<n>/`` with
`EditSession.save`: undo is loading the state before, reopening an evicted session is loading the last one, and a
download is the last one's folder. At most `max_live` sessions hold an `EditSession` in memory (the least recently
used is evicted first), and their record caches share one `MemoryBudget`, so a session beyond what memory holds
spills its records to disk instead of exhausting it.

The pipeline and its compiled U-Net and decoder are shared by every session: calls are serialized by one lock
(a front end queues its work; two edits never run at once on one pipeline). A request that fails loses nothing:
its session is reopened from its last saved state by the next request.
"""

from __future__ import annotations

import collections
import contextlib
import json
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..editing.persistence import MANIFEST
from ..editing.session import EditResult, EditSession
from ..policy import Policy
from ..runtime.tiered_store import MemoryBudget, make_budget

_ID = re.compile(r"[0-9a-f]{16}")


class ServiceError(ValueError):
    """A request the service cannot serve; the message says why. `kind`: "unknown" (no such session), "invalid"
    (a malformed request) or "conflict" (not possible in the session's state: an edit before any image, nothing
    to undo), which front ends map to their own codes (HTTP 404, 400, 409)."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


class SessionService:
    """Edit sessions by id over `pipe`; see the module docstring. `policy`, `num_inference_steps` and
    `guidance_scale` are every new session's; `memory_budget` (default: one made from the policy) bounds the
    records of all live sessions together."""

    def __init__(self, pipe, root: str | Path, policy: Policy | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = 7.5, memory_budget: MemoryBudget | None = None, max_live: int = 4):
        if max_live < 1:
            raise ValueError(f"max_live is the number of sessions kept in memory, at least 1; got {max_live}")
        self.pipe = pipe
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.policy = policy or Policy()
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.memory_budget = memory_budget if memory_budget is not None else make_budget(self.policy)
        self.max_live = max_live
        self._live: collections.OrderedDict[str, EditSession] = collections.OrderedDict()  # least recent first
        self._used: dict[str, float] = {}  # session id -> time of its last request
        self._lock = threading.RLock()
        self._closed = threading.Event()  # set by close: ends the idle-eviction thread

    # --- sessions ----------------------------------------------------------------------------------------------

    def create(self) -> str:
        """A new, empty session's id."""
        with self._lock:
            sid = secrets.token_hex(8)
            (self._folder(sid, exists=False) / "states").mkdir(parents=True)
            return sid

    def sessions(self) -> list[str]:
        """Every session's id, live or on disk."""
        with self._lock:  # not while a session is made or deleted
            return sorted(p.name for p in self.root.iterdir() if _ID.fullmatch(p.name))

    def history(self, sid: str) -> list[str]:
        """The prompts of the session's states, oldest first (the last is the current image's)."""
        return [prompt for prompt, _ in self.states(sid)]

    def states(self, sid: str) -> list[tuple[str, Path]]:
        """(prompt, picture file) of each of the session's states, oldest first (the last is the current image)."""
        with self._lock:  # not while a state is being saved or dropped
            return [(json.loads((state / MANIFEST).read_text())["prompt"], state / "image.png")
                    for state in self._states(sid)]

    def current(self, sid: str) -> EditResult:
        """The session's current image."""
        with self._lock:
            return self._session(sid).current

    # --- work ----------------------------------------------------------------------------------------------------

    def generate(self, sid: str, prompt: str, seed: int = 0, steps: int | None = None) -> EditResult:
        """Generate the session's source image (a new history: earlier states are dropped) in `steps` denoising
        steps (default: the service's), which its edits keep."""
        return self._start(sid, lambda session: session.generate(
            prompt, generator=torch.Generator().manual_seed(seed)), steps)

    def upload(self, sid: str, image: Any, prompt: str, steps: int | None = None) -> EditResult:
        """Start the session's history from a picture described by `prompt` (`EditSession.load_image`)."""
        return self._start(sid, lambda session: session.load_image(image, prompt), steps)

    def edit(self, sid: str, prompt: str, mask: Any = None, keep: bool = True) -> EditResult:
        """Edit the current image (`EditSession.edit`: the mask detected, or a user's); the edit becomes a state
        unless `keep` is False (a try: the next edit starts from the same image)."""
        with self._lock:
            if not self._states(sid):
                raise ServiceError("the session has no image yet: generate or upload one first", "conflict")
            with self._request(sid) as session:
                result = session.edit(prompt, mask=mask, keep=keep)
                if keep and result.region is not None:  # an empty mask changes nothing: no new state
                    self._save_state(sid, session)
                return result

    def undo(self, sid: str) -> EditResult:
        """Return to the state before the last edit; its image is the current one again."""
        with self._lock:
            states = self._states(sid)
            if len(states) < 2:
                raise ServiceError("nothing to undo: the session has no edit after its source image", "conflict")
            self._close(sid)
            shutil.rmtree(states[-1])
            return self._session(sid).current

    # --- memory and files ----------------------------------------------------------------------------------------

    def evict(self, sid: str) -> None:
        """Let go of the session's memory; its states stay on disk and its next request reopens it."""
        with self._lock:
            self._folder(sid)
            self._close(sid)

    def evict_idle(self, seconds: float) -> list[str]:
        """Evict the live sessions without a request for `seconds`; returns their ids."""
        with self._lock:
            now = time.monotonic()
            idle = [sid for sid in self._live if now - self._used.get(sid, now) > seconds]
            for sid in idle:
                self._close(sid)
            return idle

    def start_idle_eviction(self, seconds: float, every: float = 60.0) -> None:
        """Evict the sessions idle for `seconds`, every `every` seconds, on a daemon thread, until `close`."""
        def loop():
            while not self._closed.wait(every):
                self.evict_idle(seconds)

        threading.Thread(target=loop, name="fisedit-idle-eviction", daemon=True).start()

    def download(self, sid: str) -> Path:
        """The folder of the session's current state: a saved session (`EditSession.load` opens it)."""
        with self._lock:
            states = self._states(sid)
            if not states:
                raise ServiceError("the session has no image yet: generate or upload one first", "conflict")
            return states[-1]

    def open_saved(self, folder: str | Path) -> str:
        """A new session continuing the saved session in `folder` (refused, naming why, if it was made with another
        model or is damaged: `editing.persistence.SessionFileError`)."""
        with self._lock:
            session = EditSession.load(folder, self.pipe, memory_budget=self.memory_budget)
            sid = self.create()
            self._keep_live(sid, session)
            self._save_state(sid, session)
            return sid

    def delete(self, sid: str) -> None:
        """Remove the session, in memory and on disk."""
        with self._lock:
            folder = self._folder(sid)
            self._close(sid)
            shutil.rmtree(folder)

    def close(self) -> None:
        """Let go of every live session (their states stay on disk), and stop evicting idle ones."""
        self._closed.set()
        with self._lock:
            for sid in list(self._live):
                self._close(sid)

    # --- internals -----------------------------------------------------------------------------------------------

    def _folder(self, sid: str, exists: bool = True) -> Path:
        if not isinstance(sid, str) or not _ID.fullmatch(sid):
            raise ServiceError(f"{sid!r} is not a session id (16 hexadecimal digits, as create() returns)")
        folder = self.root / sid
        if exists and not folder.is_dir():
            raise ServiceError(f"no session {sid}: it was never created here, or was deleted", "unknown")
        return folder

    def _states(self, sid: str) -> list[Path]:
        folder = self._folder(sid) / "states"
        return sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))

    def _session(self, sid: str, fresh: bool = False, steps: int | None = None) -> EditSession:
        """The session's `EditSession`: live, or reopened from its last state (a new one for `fresh` or none, with
        `steps` denoising steps: default the service's)."""
        self._folder(sid)
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ServiceError(f"steps is the number of denoising steps, an int >= 1; got {steps!r}")
        self._used[sid] = time.monotonic()
        if fresh and steps is not None:
            self._close(sid)  # a new history with its own step count
        if sid in self._live:
            self._live.move_to_end(sid)
            return self._live[sid]
        states = self._states(sid)
        if states and not fresh:
            session = EditSession.load(states[-1], self.pipe, memory_budget=self.memory_budget)
        else:
            session = EditSession(self.pipe, self.policy, num_inference_steps=steps or self.num_inference_steps,
                                  guidance_scale=self.guidance_scale, memory_budget=self.memory_budget)
        self._keep_live(sid, session)
        return session

    @contextlib.contextmanager
    def _request(self, sid: str, fresh: bool = False, steps: int | None = None) -> Iterator[EditSession]:
        """The session's `EditSession` for one request, under the pipeline's lock. If the request fails, the live
        session is let go (a run that failed may have changed its records): the next request reopens its last
        saved state."""
        with self._lock:
            try:
                yield self._session(sid, fresh, steps)
            except BaseException:
                self._close(sid)
                raise

    def _start(self, sid: str, begin: Callable[[EditSession], EditResult], steps: int | None = None) -> EditResult:
        """A new history: `begin` makes the session's first image, which replaces every earlier state."""
        with self._request(sid, fresh=True, steps=steps) as session:
            result = begin(session)
            self._drop_states(sid)
            self._save_state(sid, session)
            return result

    def _keep_live(self, sid: str, session: EditSession) -> None:
        self._live[sid] = session
        self._used[sid] = time.monotonic()
        while len(self._live) > self.max_live:
            self._close(next(iter(self._live)))

    def _close(self, sid: str) -> None:
        session = self._live.pop(sid, None)
        if session is not None:
            session.close()

    def _save_state(self, sid: str, session: EditSession) -> None:
        states = self._states(sid)
        number = int(states[-1].name) + 1 if states else 0
        session.save(self._folder(sid) / "states" / str(number))

    def _drop_states(self, sid: str) -> None:
        for state in self._states(sid):
            shutil.rmtree(state)
