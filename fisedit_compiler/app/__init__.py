"""The editing app: a web page over the session service (`fisedit app`, `make app`).

`controller.EditApp` is what the page's buttons do (tested without a browser); `page.build_page` lays the page out
with Gradio, an optional extra (``pip install fisedit-compiler[app]``); `launch` starts it.
"""

from __future__ import annotations

from pathlib import Path

from ..environment import default_for_libraries
from .controller import AppError, EditApp, View

__all__ = ["AppError", "EditApp", "View", "launch"]


def launch(pipe, data: str | Path, host: str = "127.0.0.1", port: int = 7860, steps: int = 20,
           max_live: int = 4, idle_seconds: float = 900.0, block: bool = True, compute=None):
    """Serve the editing page over `pipe` on `host:port` (127.0.0.1 unless asked otherwise); every file it writes
    (sessions, downloads, Gradio's uploads) is under `data`. `compute`: the `service.ComputeThread` that loaded
    `pipe`, which every request's work then runs on (None: Gradio's request threads). Returns the Gradio app
    (running; with `block` this returns only when the server stops)."""
    from ..service import SessionService

    data = Path(data).resolve()
    # Gradio's upload and cache folder (read when Gradio is imported), and nothing leaves the machine
    default_for_libraries(GRADIO_TEMP_DIR=str(data / "gradio"), GRADIO_ANALYTICS_ENABLED="False")
    from .page import build_page

    app = EditApp(SessionService(pipe, data / "sessions", num_inference_steps=steps, max_live=max_live,
                                 compute=compute), data, idle_seconds=idle_seconds)
    app.warm_up()
    app.start_idle_eviction()
    page = build_page(app)
    page.queue(default_concurrency_limit=1)  # one pipeline: one request at a time, the others wait in the queue
    page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
                allowed_paths=[str(data / "downloads")])
    return page
