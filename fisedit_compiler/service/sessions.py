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

Every state of a session has a folder ``root/<id>/states/<n>/`` with its picture. A generate, upload or reopened
download is a *snapshot* (`EditSession.save`: the whole session, its record cache included); an edit is *journaled*
(``edit.json``: its prompt, and its mask as ``mask.png`` when the user gave one), which is a few kilobytes instead of
the cache's megabytes to gigabytes. Reopening a session loads its last snapshot and replays the journaled edits after
it (sessions are deterministic: a replayed edit is the edit, bit for bit). A session leaving memory (evicted: least
recently used beyond `max_live`, idle, or the service closing) first saves its last state as a snapshot, so it
reopens without replaying; a process that dies loses only the request in flight, the journal replays the rest.
Undo is reopening the state before; a download is the last state, saved as a snapshot first if it was journaled. The
live sessions' record caches share one `MemoryBudget`, so a session beyond what memory holds spills its records to
disk instead of exhausting it.

The pipeline and its compiled U-Net and decoder are shared by every session: calls are serialized by one lock
(a front end queues its work; two edits never run at once on one pipeline). A request that fails loses nothing:
its session is reopened from its last saved state by the next request.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..editing import GUIDANCE_SCALE
from ..editing.persistence import MANIFEST
from ..editing.session import EditResult, EditSession
from ..policy import Policy
from ..runtime.collector import freeze_long_lived_objects
from ..runtime.tiered_store import MemoryBudget, make_budget
from .compute import ComputeThread

_ID = re.compile(r"[0-9a-f]{16}")
JOURNAL = "edit.json"  # a journaled state's edit: {"prompt": ..., "mask": "mask.png" or None (detected)}
MASK = "mask.png"  # a journaled edit's user mask, at latent resolution (white = edit)


class ServiceError(ValueError):
    """A request the service cannot serve; the message says why. `kind`: "unknown" (no such session), "invalid"
    (a malformed request) or "conflict" (not possible in the session's state: an edit before any image, nothing
    to undo), which front ends map to their own codes (HTTP 404, 400, 409)."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind


def _computes(method: Callable) -> Callable:
    """A `SessionService` method that computes: run on the service's compute thread when it has one."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.compute is None:
            return method(self, *args, **kwargs)
        return self.compute.call(method, self, *args, **kwargs)

    return call


class SessionService:
    """Edit sessions by id over `pipe`; see the module docstring. `policy`, `num_inference_steps` and
    `guidance_scale` are every new session's; `memory_budget` (default: one made from the policy) bounds the
    records of all live sessions together. `compute`: the thread every call that computes runs on, whichever thread
    makes it (a server's: `service.compute`); None: the caller's."""

    def __init__(self, pipe, root: str | Path, policy: Policy | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = GUIDANCE_SCALE, memory_budget: MemoryBudget | None = None, max_live: int = 4,
                 compute: ComputeThread | None = None):
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
        self.compute = compute  # the thread the computing calls run on (None: the caller's)
        self._live: collections.OrderedDict[str, EditSession] = collections.OrderedDict()  # least recent first
        self._used: dict[str, float] = {}  # session id -> time of its last request
        self._lock = threading.RLock()
        self._closed = threading.Event()  # set by close: ends the idle-eviction thread
        # "reopened": sessions loaded from their saved states; "replayed": journaled edits replayed to reopen them;
        # "evicted": live sessions let go for memory or idling
        self.counts: collections.Counter[str] = collections.Counter()

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
            return [(_state_record(state)["prompt"], state / "image.png") for state in self._states(sid)]

    def stats(self) -> dict[str, int]:
        """What this service holds and has done: sessions (on disk), live ones (in memory), how many sessions it has
        evicted from memory and reopened from their saved states, and how many journaled edits it replayed to reopen
        them; `pid` names the process (a replica)."""
        with self._lock:
            return {"pid": os.getpid(), "sessions": len(self.sessions()), "live": len(self._live),
                    "evicted": self.counts["evicted"], "reopened": self.counts["reopened"],
                    "replayed": self.counts["replayed"]}

    @_computes
    def current(self, sid: str) -> EditResult:
        """The session's current image."""
        with self._lock:
            return self._session(sid).current

    # --- work ----------------------------------------------------------------------------------------------------

    @_computes
    def generate(self, sid: str, prompt: str, seed: int = 0, steps: int | None = None) -> EditResult:
        """Generate the session's source image (a new history: earlier states are dropped) in `steps` denoising
        steps (default: the service's), which its edits keep."""
        return self._start(sid, lambda session: session.generate(
            prompt, generator=torch.Generator().manual_seed(seed)), steps)

    @_computes
    def upload(self, sid: str, image: Any, prompt: str, steps: int | None = None) -> EditResult:
        """Start the session's history from a picture described by `prompt` (`EditSession.load_image`)."""
        return self._start(sid, lambda session: session.load_image(image, prompt), steps)

    @_computes
    def edit(self, sid: str, prompt: str, mask: Any = None, keep: bool = True) -> EditResult:
        """Edit the current image (`EditSession.edit`: the mask detected, or a user's); the edit becomes a state
        unless `keep` is False (a try: the next edit starts from the same image)."""
        with self._lock:
            if not self._states(sid):
                raise ServiceError("the session has no image yet: generate or upload one first", "conflict")
            with self._request(sid) as session:
                result = session.edit(prompt, mask=mask, keep=keep)
                if keep and result.region is not None:  # an empty mask changes nothing: no new state
                    self._journal(sid, result, user_mask=mask is not None)
                return result

    @_computes
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

    @_computes
    def evict(self, sid: str) -> None:
        """Let go of the session's memory; its states stay on disk and its next request reopens it."""
        with self._lock:
            self._folder(sid)
            self._evict(sid)

    @_computes
    def evict_idle(self, seconds: float) -> list[str]:
        """Evict the live sessions without a request for `seconds`; returns their ids."""
        with self._lock:
            now = time.monotonic()
            idle = [sid for sid in self._live if now - self._used.get(sid, now) > seconds]
            for sid in idle:
                self._evict(sid)
            return idle

    def start_idle_eviction(self, seconds: float, every: float = 60.0) -> None:
        """Evict the sessions idle for `seconds`, every `every` seconds, on a daemon thread, until `close`."""
        def loop():
            while not self._closed.wait(every):
                self.evict_idle(seconds)

        threading.Thread(target=loop, name="fisedit-idle-eviction", daemon=True).start()

    @_computes
    def download(self, sid: str) -> Path:
        """The folder of the session's current state: a saved session (`EditSession.load` opens it)."""
        with self._lock:
            states = self._states(sid)
            if not states:
                raise ServiceError("the session has no image yet: generate or upload one first", "conflict")
            if not _is_snapshot(states[-1]):  # (a session saved whole is not opened just to be saved again)
                self._snapshot(sid, self._session(sid))
            return states[-1]

    @_computes
    def open_saved(self, folder: str | Path) -> str:
        """A new session continuing the saved session in `folder` (refused, naming why, if it was made with another
        model or is damaged: `editing.persistence.SessionFileError`)."""
        with self._lock:
            session = EditSession.load(folder, self.pipe, memory_budget=self.memory_budget)
            sid = self.create()
            self._keep_live(sid, session)
            self._save_state(sid, session)
            return sid

    @_computes
    def delete(self, sid: str) -> None:
        """Remove the session, in memory and on disk."""
        with self._lock:
            folder = self._folder(sid)
            self._close(sid)
            shutil.rmtree(folder)

    @_computes
    def warm_up(self, prompt: str = "a picture", steps: int = 2) -> None:
        """Capture and compile the model with a throwaway session, bind the programs of an edit's first calls
        (`EditSession.prepare_edits`), then keep the garbage collector off what the service holds for its life
        (`runtime.collector`): a user's first picture takes the time of a generation, their first edit that of an
        edit. For a server's start."""
        sid = self.create()
        try:
            with self._request(sid, fresh=True, steps=steps) as session:
                session.generate(prompt, generator=torch.Generator().manual_seed(0))
                session.prepare_edits()
        finally:
            self.delete(sid)
        freeze_long_lived_objects()

    @_computes
    def close(self) -> None:
        """Let go of every live session (their states stay on disk), and stop evicting idle ones."""
        self._closed.set()
        with self._lock:
            for sid in list(self._live):
                self._evict(sid)

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
        states = (p for p in folder.iterdir()
                  if p.name.isdigit() and (_is_snapshot(p) or (p / JOURNAL).is_file()))
        return sorted(states, key=lambda p: int(p.name))

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
            session = self._reopen(states)
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
            self._evict(next(iter(self._live)))

    def _evict(self, sid: str) -> None:
        """Let go of a live session for memory, its last state saved as a snapshot first (it reopens without
        replaying)."""
        session = self._live.get(sid)
        if session is not None:
            self.counts["evicted"] += 1
            self._snapshot(sid, session)
        self._close(sid)

    def _reopen(self, states: list[Path]) -> EditSession:
        """The session of `states`: its last snapshot loaded, the journaled edits after it replayed."""
        base = max(i for i, state in enumerate(states) if _is_snapshot(state))
        session = EditSession.load(states[base], self.pipe, memory_budget=self.memory_budget)
        try:
            for state in states[base + 1:]:
                edit = _state_record(state)
                mask = None
                if edit["mask"] is not None:
                    with Image.open(state / edit["mask"]) as drawn:
                        mask = torch.from_numpy(np.asarray(drawn.convert("L")) > 127)
                session.edit(edit["prompt"], mask=mask)
                self.counts["replayed"] += 1
        except BaseException:
            session.close()
            raise
        self.counts["reopened"] += 1
        return session

    def _journal(self, sid: str, result: EditResult, user_mask: bool) -> None:
        """The edit `result` as the session's next state: its picture and what replays it (`JOURNAL`)."""
        folder = self._next_state(sid)
        folder.mkdir()
        edit = {"prompt": result.prompt, "mask": MASK if user_mask else None}
        if user_mask:
            Image.fromarray(result.mask.cpu().numpy().astype(np.uint8) * 255).save(folder / MASK)
        result.images[0].save(folder / "image.png")
        (folder / JOURNAL).write_text(json.dumps(edit))  # last: a state without it is not one (`_state_record`)

    def _snapshot(self, sid: str, session: EditSession) -> None:
        """Save the session into its last state's folder if that state is journaled (the session is that state)."""
        states = self._states(sid)
        if states and not _is_snapshot(states[-1]):
            session.save(states[-1])  # (its manifest is written after the records: a half-written one is no snapshot)

    def _close(self, sid: str) -> None:
        session = self._live.pop(sid, None)
        if session is not None:
            session.close()

    def _save_state(self, sid: str, session: EditSession) -> None:
        session.save(self._next_state(sid))

    def _next_state(self, sid: str) -> Path:
        states = self._states(sid)
        return self._folder(sid) / "states" / str(int(states[-1].name) + 1 if states else 0)

    def _drop_states(self, sid: str) -> None:
        for state in self._states(sid):
            shutil.rmtree(state)


def _is_snapshot(state: Path) -> bool:
    """Whether a state folder holds a whole saved session (else a journaled edit); its manifest is written last."""
    return (state / MANIFEST).is_file()


def _state_record(state: Path) -> dict[str, Any]:
    """A state's prompt (and, journaled, its mask): a snapshot's manifest, else its journal entry."""
    if _is_snapshot(state):
        return {"prompt": json.loads((state / MANIFEST).read_text())["prompt"], "mask": None}
    return json.loads((state / JOURNAL).read_text())
