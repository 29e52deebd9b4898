"""The session service (`fisedit_compiler.service`): sessions by id over one pipeline, every state saved, undo,
eviction and reopening, one memory budget, and clear errors for requests it cannot serve."""

from __future__ import annotations

import json
import os

import pytest
import torch

import fisedit_compiler as fisedit
from fisedit_compiler.editing.persistence import MANIFEST, SessionFileError
from fisedit_compiler.models import random_pipeline
from fisedit_compiler.service import ServiceError, SessionService

LATENT = 16
STEPS = 4
PROMPT = "a cabin in the woods"


def box(rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


@pytest.fixture(scope="module")
def pipe():
    """One pipeline for the module (its U-Net compiled once): the service's, and the local sessions' it is compared
    with."""
    return random_pipeline("sd2", latent_size=LATENT, seed=0)


@pytest.fixture
def service(tmp_path, pipe):
    made = SessionService(pipe, tmp_path / "sessions", fisedit.Policy(block_size=2), num_inference_steps=STEPS,
                          max_live=1)
    yield made
    made.close()


@torch.no_grad()
def test_edits_chain_and_undo_returns_to_the_state_before(service):
    sid = service.create()
    source = service.generate(sid, PROMPT, seed=0)
    mask = box(slice(3, 9), slice(4, 12))
    first = service.edit(sid, "a red cabin in the woods", mask=mask)
    assert torch.equal(first.latents[..., ~mask], source.latents[..., ~mask])  # outside the mask: the source's
    second = service.edit(sid, "a red cabin in the woods at night", mask=box(slice(0, 4), slice(0, 16)))
    assert service.history(sid) == [PROMPT, "a red cabin in the woods", "a red cabin in the woods at night"]
    assert not torch.equal(second.latents, first.latents)
    back = service.undo(sid)
    assert torch.equal(back.latents, first.latents) and back.prompt == "a red cabin in the woods"
    # the next edit builds on the state undone to, exactly as an edit of it made before would
    again = service.edit(sid, "a red cabin in the woods at night", mask=box(slice(0, 4), slice(0, 16)))
    assert torch.equal(again.latents, second.latents)
    service.undo(sid)
    assert torch.equal(service.undo(sid).latents, source.latents)
    with pytest.raises(ServiceError, match="nothing to undo"):
        service.undo(sid)


@torch.no_grad()
def test_an_evicted_session_reopens_from_disk_and_edits_as_if_it_had_stayed(service, tmp_path):
    a, b = service.create(), service.create()
    service.generate(a, PROMPT, seed=0)
    mask = box(slice(2, 8), slice(2, 8))
    service.generate(b, "a house by a lake", seed=1)  # max_live=1: a is evicted to make room for b
    assert list(service._live) == [b]
    reopened = service.edit(a, "a red cabin in the woods", mask=mask)
    # the same edit in a session that never left memory
    with fisedit.EditSession(service.pipe, fisedit.Policy(block_size=2), num_inference_steps=STEPS) as alone:
        alone.generate(PROMPT, generator=torch.Generator().manual_seed(0))
        expected = alone.edit("a red cabin in the woods", mask=mask)
    assert torch.equal(reopened.latents, expected.latents)
    assert service.evict_idle(0.0) == [a] and not service._live
    assert service.stats() == {"pid": os.getpid(), "sessions": 2, "live": 0, "evicted": 3, "reopened": 1,
                               "replayed": 0}


@torch.no_grad()
def test_edits_are_journaled_and_another_process_replays_them(service):
    """An edit's state is its prompt and user mask (kilobytes), not a copy of the session's records; a service in
    another process (a replica taking over from one that died) reopens the session by replaying them onto the
    last snapshot, bit for bit; leaving memory saves the last state whole, so it reopens without replaying."""
    sid = service.create()
    service.generate(sid, PROMPT, seed=0)
    service.edit(sid, "a red cabin in the woods", mask=box(slice(2, 8), slice(2, 8)))
    detected = service.edit(sid, "a red cabin in the woods at night")
    states = service._states(sid)
    assert [(state / MANIFEST).is_file() for state in states] == [True, False, False]
    assert (states[1] / "mask.png").is_file() and json.loads((states[2] / "edit.json").read_text())["mask"] is None
    size = lambda folder: sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())  # noqa: E731
    assert size(states[1]) * 20 < size(states[0])
    other = SessionService(service.pipe, service.root, fisedit.Policy(block_size=2), num_inference_steps=STEPS)
    try:
        assert torch.equal(other.current(sid).latents, detected.latents)
        assert other.stats()["replayed"] == 2 and other.history(sid) == service.history(sid)
        other.evict(sid)
        assert (other._states(sid)[-1] / MANIFEST).is_file()
        assert torch.equal(other.current(sid).latents, detected.latents) and other.stats()["replayed"] == 2
        assert other.undo(sid).prompt == "a red cabin in the woods"  # the state before, replayed again
    finally:
        other.close()


@torch.no_grad()
def test_sessions_share_one_memory_budget_and_a_download_opens_as_a_new_session(service):
    sid = service.create()
    service.generate(sid, PROMPT, seed=0)
    live = service._live[sid]
    assert live.memory_budget is service.memory_budget and live.cache.store.budget is service.memory_budget
    copy = service.open_saved(service.download(sid))
    assert copy != sid and service.history(copy) == [PROMPT]
    assert torch.equal(service.current(copy).latents, service.current(sid).latents)
    service.delete(copy)
    assert copy not in service.sessions()


@torch.no_grad()
def test_a_failed_edit_loses_nothing(service, monkeypatch):
    """Bad input is refused before any work; an edit that fails mid-run (its sparse steps had written their blocks
    back) leaves the session as its last state: the next edit is the one a session that never failed makes."""
    sid = service.create()
    source = service.generate(sid, PROMPT, seed=0)
    with pytest.raises(fisedit.MaskError):
        service.edit(sid, "a red cabin", mask=torch.ones(3, 3, dtype=torch.bool))  # wrong shape
    with pytest.raises(TypeError):
        service.edit(sid, 42)
    scheduler = type(service.pipe.scheduler)
    step, calls = scheduler.step, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(scheduler, "step", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        service.edit(sid, "a red cabin in the woods", mask=box(slice(2, 14), slice(2, 14)))
    monkeypatch.undo()
    assert torch.equal(service.current(sid).latents, source.latents) and service.history(sid) == [PROMPT]
    small = box(slice(6, 10), slice(6, 10))  # its context lies inside the failed edit's region
    after = service.edit(sid, "a blue cabin in the woods", mask=small)
    with fisedit.EditSession(service.pipe, fisedit.Policy(block_size=2), num_inference_steps=STEPS) as alone:
        alone.generate(PROMPT, generator=torch.Generator().manual_seed(0))
        assert torch.equal(after.latents, alone.edit("a blue cabin in the woods", mask=small).latents)


def test_requests_it_cannot_serve_say_why(service, tmp_path):
    with pytest.raises(ServiceError, match="not a session id"):
        service.edit("../../etc", "a cabin")
    with pytest.raises(ServiceError, match="no session"):
        service.edit("0123456789abcdef", "a cabin")
    sid = service.create()
    with pytest.raises(ServiceError, match="no image yet") as refused:
        service.edit(sid, "a red cabin")
    assert refused.value.kind == "conflict"
    with pytest.raises(ServiceError, match="no image yet"):
        service.download(sid)
    with pytest.raises(SessionFileError, match="not a saved session"):
        service.open_saved(tmp_path)
    with pytest.raises(ValueError, match="max_live"):
        SessionService(service.pipe, tmp_path / "other", max_live=0)


@torch.no_grad()
def test_idle_sessions_leave_memory_on_their_own_and_reopen(service):
    """`start_idle_eviction`: a thread drops sessions idle past the timeout (the app's and each Ray replica's); the
    next request reopens the session from its saved state."""
    import time

    sid = service.create()
    source = service.generate(sid, PROMPT, seed=0)
    service.start_idle_eviction(0.2, every=0.05)
    deadline = time.monotonic() + 10
    while sid in service._live and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sid not in service._live
    assert torch.equal(service.current(sid).latents, source.latents)


def test_a_compute_thread_runs_every_call_on_itself_in_order():
    """`ComputeThread.call` runs the function on its one thread, whichever thread calls, returns its result and
    raises its exception in the caller; a call made on the thread runs at once (no deadlock); closed, it refuses."""
    import threading

    from fisedit_compiler.service import ComputeThread

    compute = ComputeThread()
    seen, order = set(), []

    def work(n):
        seen.add(threading.get_ident())
        order.append(n)
        return compute.call(lambda: n * 2)  # nested: runs inline on the compute thread

    callers = [threading.Thread(target=compute.call, args=(work, n)) for n in range(8)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert compute.call(work, 21) == 42
    assert len(seen) == 1 and threading.get_ident() not in seen and sorted(order) == [*range(8), 21]
    with pytest.raises(ZeroDivisionError):
        compute.call(lambda: 1 / 0)
    compute.close()
    with pytest.raises(RuntimeError, match="was closed"):
        compute.call(work, 1)


@torch.no_grad()
def test_a_service_with_a_compute_thread_computes_only_there(pipe, tmp_path, monkeypatch):
    """Every session call of a service given a `ComputeThread` runs on it (a server's request threads only wait),
    with the results of a service without one."""
    import threading

    from fisedit_compiler.service import ComputeThread

    compute = ComputeThread()
    threads = set()
    real = fisedit.EditSession._call_pipeline
    monkeypatch.setattr(fisedit.EditSession, "_call_pipeline",
                        lambda self, *a, **k: threads.add(threading.current_thread().name) or real(self, *a, **k))
    served = SessionService(pipe, tmp_path / "a", fisedit.Policy(block_size=2), num_inference_steps=STEPS,
                            compute=compute)
    plain = SessionService(pipe, tmp_path / "b", fisedit.Policy(block_size=2), num_inference_steps=STEPS)
    try:
        results = []
        for service in (served, plain):
            sid = service.create()
            service.generate(sid, PROMPT, seed=0)
            results.append(service.edit(sid, "a red cabin in the woods", mask=box(slice(2, 8), slice(2, 8))))
        assert torch.equal(results[0].latents, results[1].latents)
        assert threads == {"fisedit-compute", threading.current_thread().name}
    finally:
        served.close()
        plain.close()
        compute.close()


@torch.no_grad()
def test_a_warm_service_binds_nothing_for_its_first_edit_and_keeps_no_session(tmp_path, monkeypatch):
    """`warm_up` compiles the model and binds an edit's first programs with a throwaway session, then freezes
    what the process holds (`runtime.collector`): a user's first edit over a mask of the prepared structure binds
    no program, and nothing of the throwaway session is left."""
    import gc

    from fisedit_compiler.editing.masks import centred_disk
    from fisedit_compiler.runtime import executor

    service = SessionService(random_pipeline("sd2", latent_size=LATENT, seed=0), tmp_path / "sessions",
                             fisedit.Policy(block_size=2), num_inference_steps=STEPS)
    try:
        service.warm_up(steps=STEPS)
        assert service.sessions() == [] and list((tmp_path / "sessions").iterdir()) == []
        assert gc.get_freeze_count() > 0
        sid = service.create()
        service.generate(sid, PROMPT, seed=0)
        binds = []
        original = executor.bind
        monkeypatch.setattr(executor, "bind", lambda *args, **kw: binds.append(1) or original(*args, **kw))
        service.edit(sid, "a red cabin in the woods", mask=centred_disk((LATENT, LATENT), 0.15))
        assert binds == []
    finally:
        service.close()
        gc.unfreeze()
