"""One thread for a server's tensor work: every computing call of the service runs on it, whichever thread asks.

PyTorch on CPU spreads an op over cores with OpenMP, and GNU OpenMP keeps a team of threads for each thread that runs
a parallel region. Once a process has two teams and more OpenMP threads than cores (the main thread loaded the model,
a server's request thread then edits), libgomp stops its idle threads from spinning between parallel regions, and
every op pays for waking its team: on the project's 2-core machine a 20-step generation of the shapes model took
0.83-0.87 s on a second thread against 0.42-0.46 s on the thread that loaded the model, and a U-Net call 39-48 ms
against 18-26 ms. Web servers answer requests on pools of threads (Gradio, uvicorn, Ray Serve's replicas), so a
front end makes a `ComputeThread`, loads its model through it, and hands it to `SessionService`: the process then
has one OpenMP team, the compute thread's.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    """A daemon thread that runs the calls given to `call`, one at a time, in order; a call made on it runs at once
    (a computing method calling another). `close` ends it after the calls already given."""

    def __init__(self, name: str = "fisedit-compute"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`function(*args, **kwargs)` run on the compute thread; its result, or its exception raised here."""
        if threading.current_thread() is self._thread:
            return function(*args, **kwargs)
        if not self._thread.is_alive():
            raise RuntimeError("the compute thread was closed: make a new ComputeThread")
        future: Future = Future()
        self._queue.put((future, function, args, kwargs))
        return future.result()

    def close(self) -> None:
        """End the thread once it has run the calls given before (their callers get their results)."""
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, function, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args, **kwargs))
            except BaseException as error:  # the caller's to handle, in its thread
                future.set_exception(error)
