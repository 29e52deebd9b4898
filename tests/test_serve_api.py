"""The HTTP API (`fisedit_compiler.serve.api`) in-process with FastAPI's test client: every route, the latents it
leaves outside a mask, and a 4xx that says why for every request it cannot serve."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fisedit_compiler as fisedit
from fisedit_compiler.models import random_pipeline
from fisedit_compiler.service import SessionService

pytest.importorskip("fastapi", reason="the HTTP API is an optional extra: pip install 'fisedit-compiler[serve]'")
from fastapi.testclient import TestClient  # noqa: E402

from fisedit_compiler.serve.api import create_app  # noqa: E402

LATENT = 16
STEPS = 4
PROMPT = "a cabin in the woods"


def png_file(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def picture(encoded: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("sd2", latent_size=LATENT, seed=0)  # one for the module: its U-Net compiled once


@pytest.fixture
def api(tmp_path, pipe):
    service = SessionService(pipe, tmp_path / "sessions", fisedit.Policy(block_size=2), num_inference_steps=STEPS)
    yield TestClient(create_app(service)), service
    service.close()


@torch.no_grad()
def test_generate_edit_undo_delete(api):
    client, service = api
    made = client.post("/v1/sessions", data={"prompt": PROMPT, "seed": "0"})
    assert made.status_code == 200, made.text
    sid = made.json()["id"]
    assert picture(made.json()["image"]).size == (8 * LATENT, 8 * LATENT)
    mask = np.zeros((LATENT, LATENT), dtype=np.uint8)
    mask[3:9, 4:12] = 255  # drawn at latent resolution
    edited = client.post(f"/v1/sessions/{sid}/edits", data={"prompt": "a red cabin in the woods"},
                         files={"mask": ("mask.png", png_file(mask), "image/png")})
    assert edited.status_code == 200, edited.text
    body = edited.json()
    assert body["history"] == [PROMPT, "a red cabin in the woods"]
    assert np.array_equal(np.asarray(picture(body["mask"])) > 0, mask > 0)
    assert body["phases"]["sparse"]["unet_calls"] > 0 and body["phases"]["sparse"]["macs"] > 0
    # the latents are those of a local session making the same edit
    with fisedit.EditSession(service.pipe, fisedit.Policy(block_size=2), num_inference_steps=STEPS) as local:
        local.generate(PROMPT, generator=torch.Generator().manual_seed(0))
        expected = local.edit("a red cabin in the woods", mask=torch.from_numpy(mask > 0))
    assert torch.equal(service.current(sid).latents, expected.latents)
    tried = client.post(f"/v1/sessions/{sid}/edits", data={"prompt": "a blue cabin in the woods", "keep": "false"})
    assert tried.status_code == 200 and tried.json()["history"] == body["history"]  # a try is no new state
    assert client.get(f"/v1/sessions/{sid}").json()["history"] == body["history"]
    assert client.get(f"/v1/sessions/{sid}/image").headers["content-type"] == "image/png"
    undone = client.post(f"/v1/sessions/{sid}/undo")
    assert undone.status_code == 200 and undone.json()["history"] == [PROMPT]
    assert undone.json()["image"] == made.json()["image"]
    assert client.get("/v1/service").json() == {"pid": os.getpid(), "sessions": 1, "live": 1, "evicted": 0,
                                                 "reopened": 1, "replayed": 0}  # undo reopens the state before
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert client.get(f"/v1/sessions/{sid}").status_code == 404


@torch.no_grad()
def test_an_uploaded_picture_starts_a_session(api):
    client, _ = api
    photo = np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    made = client.post("/v1/sessions", data={"prompt": "a photo of noise"},
                       files={"image": ("photo.png", png_file(photo), "image/png")})
    assert made.status_code == 200, made.text
    assert picture(made.json()["image"]).size == (8 * LATENT, 8 * LATENT)  # cropped and resized


@torch.no_grad()
def test_requests_it_cannot_serve_get_a_4xx_that_says_why(api):
    client, service = api
    assert client.get("/v1/sessions/0123456789abcdef").status_code == 404
    malformed = client.get("/v1/sessions/not-an-id")
    assert malformed.status_code == 400 and "not a session id" in malformed.json()["detail"]
    sid = client.post("/v1/sessions", data={"prompt": PROMPT}).json()["id"]
    wrong = client.post(f"/v1/sessions/{sid}/edits", data={"prompt": "a red cabin"},
                        files={"mask": ("mask.png", png_file(np.zeros((5, 7), dtype=np.uint8)), "image/png")})
    assert wrong.status_code == 400 and "5" in wrong.json()["detail"]
    garbage = client.post(f"/v1/sessions/{sid}/edits", data={"prompt": "a red cabin"},
                          files={"mask": ("mask.png", b"not a png", "image/png")})
    assert garbage.status_code == 400 and "not an image" in garbage.json()["detail"]
    long = client.post(f"/v1/sessions/{sid}/edits", data={"prompt": "word " * 100})
    assert long.status_code == 400 and "tokens" in long.json()["detail"]
    nothing = client.post(f"/v1/sessions/{sid}/undo")
    assert nothing.status_code == 409 and "nothing to undo" in nothing.json()["detail"]
    assert client.post("/v1/sessions", data={}).status_code == 422  # no prompt
    assert service.history(sid) == [PROMPT]  # nothing of the session was lost


def test_the_server_answers_other_requests_while_one_generates(api, monkeypatch):
    """A generation or an edit runs in the server's thread pool: the event loop keeps serving (here the OpenAPI
    schema) while one is under way. Run on the event loop, the generation would block every other request."""
    import asyncio
    import threading

    import httpx

    _, service = api
    entered, release = threading.Event(), threading.Event()
    generate = service.generate

    def held(*args, **kwargs):
        entered.set()
        release.wait(30)  # until the other request was answered (a bound, should the loop be blocked)
        return generate(*args, **kwargs)

    monkeypatch.setattr(service, "generate", held)

    async def scenario() -> tuple[bool, int, int]:
        transport = httpx.ASGITransport(app=create_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            made = asyncio.create_task(client.post("/v1/sessions", data={"prompt": PROMPT, "seed": "0"}))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            schema = await client.get("/openapi.json")
            served_meanwhile = not made.done()
            release.set()
            return served_meanwhile, schema.status_code, (await made).status_code

    served_meanwhile, schema, made = asyncio.run(scenario())
    assert served_meanwhile and schema == 200 and made == 200


@torch.no_grad()
def test_the_stateless_edit_loads_edits_and_forgets(api):
    """`POST /v1/images/edits` as OpenAI-compatible image servers take it: a picture and a mask (transparent = edit,
    theirs; or white = edit) and the edited prompt; the answer is the edited picture, the same outside the mask as
    editing the loaded picture in a session, and no session remains."""
    client, service = api
    photo = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    transparent = np.full((128, 128, 4), 255, dtype=np.uint8)
    transparent[32:80, 40:96, 3] = 0  # the region to edit
    white = np.zeros((128, 128), dtype=np.uint8)
    white[32:80, 40:96] = 255
    answers = []
    for mask in (transparent, white):
        reply = client.post("/v1/images/edits", data={"prompt": "a cabin in the woods", "source_prompt": "noise"},
                            files={"image": ("photo.png", png_file(photo), "image/png"),
                                   "mask": ("mask.png", png_file(mask), "image/png")})
        assert reply.status_code == 200, reply.text
        answers.append(reply.json())
    assert answers[0]["data"][0]["b64_json"] == answers[1]["data"][0]["b64_json"]  # the two conventions agree
    assert answers[0]["fisedit"]["phases"] and answers[0]["fisedit"]["region"] is not None
    assert service.sessions() == []  # stateless: nothing kept

    made = client.post("/v1/sessions", data={"prompt": "noise", "steps": STEPS},
                       files={"image": ("photo.png", png_file(photo), "image/png")}).json()
    edited = client.post(f"/v1/sessions/{made['id']}/edits", data={"prompt": "a cabin in the woods"},
                         files={"mask": ("mask.png", png_file(white), "image/png")}).json()
    assert edited["image"] == answers[0]["data"][0]["b64_json"]  # what a session makes of the same request

    refused = client.post("/v1/images/edits", data={"prompt": "a cabin", "n": 2},
                          files={"image": ("photo.png", png_file(photo), "image/png")})
    assert refused.status_code == 400 and "n=1" in refused.json()["detail"]
    small = client.post("/v1/images/edits", data={"prompt": "a cabin"},
                        files={"image": ("photo.png", png_file(photo), "image/png"),
                               "mask": ("mask.png", png_file(np.zeros((5, 7), dtype=np.uint8)), "image/png")})
    assert small.status_code == 400 and service.sessions() == [made["id"]]
