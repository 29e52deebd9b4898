"""The HTTP API on Ray Serve (`serve.ray_app`): a real local Serve application with two engine replicas on loopback.
Sessions stick to the replica that holds them (model multiplexing by session id), and killing that replica lets the
session go on, on another one, from its last saved state. Marked `slow` (`make slow-test`, which CI runs)."""

from __future__ import annotations

import base64
import io
import os
import signal

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="serving on Ray is an optional extra: pip install 'ray[serve]'")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.slow  # a Ray cluster and two replicas start: half a minute (`make slow-test`)

STEPS = 4
PROMPT = "a red circle and a blue square on a gray background"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from fisedit_compiler.serve.ray_app import build_app

    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(None, tmp_path_factory.mktemp("serve"), replicas=2, steps=STEPS), route_prefix="/")
        yield f"http://127.0.0.1:{port}", serve.get_deployment_handle("EditEngine", app_name="default")
    finally:
        serve.shutdown()
        ray.shutdown()


def _mask(rows: slice, cols: slice) -> bytes:
    mask = np.zeros((32, 32), dtype=np.uint8)  # the shapes model's latents
    mask[rows, cols] = 255
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def _latents_image(encoded: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))))


def test_sessions_stick_to_their_replica_and_survive_its_death(server):
    url, engine = server
    with httpx.Client(base_url=url, timeout=300) as client:
        made = client.post("/v1/sessions", data={"prompt": PROMPT, "seed": 0, "steps": STEPS})
        assert made.status_code == 200, made.text
        sid = made.json()["id"]
        first = client.post(f"/v1/sessions/{sid}/edits", data={"prompt": PROMPT.replace("blue square", "green square")},
                            files={"mask": ("mask.png", _mask(slice(16, 32), slice(16, 32)), "image/png")})
        assert first.status_code == 200, first.text
        holder = {engine.options(multiplexed_model_id=sid).pid.remote().result() for _ in range(4)}
        assert len(holder) == 1  # every call of the session went to one replica
        os.kill(holder.pop(), signal.SIGKILL)  # that replica dies mid-session
        second = client.post(f"/v1/sessions/{sid}/edits", data={"prompt": PROMPT.replace("red circle", "red square")},
                             files={"mask": ("mask.png", _mask(slice(0, 16), slice(0, 16)), "image/png")})
        assert second.status_code == 200, second.text  # an answer, not a 500: reopened from disk elsewhere
        history = client.get(f"/v1/sessions/{sid}").json()["history"]
        assert history == [PROMPT, PROMPT.replace("blue square", "green square"),
                           PROMPT.replace("red circle", "red square")]
        before, after = _latents_image(first.json()["image"]), _latents_image(second.json()["image"])
        assert before.shape == after.shape
        unknown = client.get("/v1/sessions/0123456789abcdef")
        assert unknown.status_code == 404 and "no session" in unknown.json()["detail"]
