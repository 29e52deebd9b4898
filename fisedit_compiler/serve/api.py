"""The HTTP API over the session service: FastAPI routes, one app per `SessionService`.

    app = create_app(SessionService(pipe, root="data/sessions"))   # e.g. uvicorn, or under Ray Serve's ingress

    POST   /v1/sessions                 form: prompt, seed, [steps], [image] → a new session: generated, or the picture
    GET    /v1/sessions/{id}            → its history (the prompts of its states)
    GET    /v1/sessions/{id}/image      → the current image, PNG
    POST   /v1/sessions/{id}/edits      form: prompt, [mask PNG], [keep] → the edited image, mask, region, phases
    POST   /v1/sessions/{id}/undo       → the state before the last edit
    DELETE /v1/sessions/{id}
    GET    /v1/service                  → sessions on disk and in memory, evictions and reopenings (one replica's)
    POST   /v1/images/edits             form: image, prompt, [mask], [source_prompt] → the edited image (stateless)

Routes that read an upload are `async`; every service call (which may wait for the service's lock while another
request generates or edits) runs in the server's thread pool, never on its event loop, so the server keeps
accepting requests meanwhile. Images travel
as PNG: base64 in JSON responses, files in multipart requests. A mask is a PNG, white = edit, at
latent or image resolution (`inputs.as_mask`). Requests the service cannot serve get a 4xx whose `detail` says why:
404 an unknown session, 400 a malformed id, mask or prompt, 409 an edit before any image. Optional: install with
``pip install fisedit-compiler[serve]``.

`/v1/images/edits` is the stateless form OpenAI-compatible image servers take: a multipart picture, an optional mask
(as theirs: a picture with an alpha channel is edited where it is fully transparent; one without, where it is white;
no mask: the region is detected) and the edited prompt, answered as ``{"created", "data": [{"b64_json"}]}`` plus
what fisedit did (``"fisedit"``: region, phases). The picture is inverted conditioned on `source_prompt` (what it
shows; default empty, the unconditional inversion) in a session that is deleted when the request ends.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import time
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..editing.session import EditResult, PhaseStats
from ..editing.token_alignment import PromptTooLongError
from ..inputs import MaskError
from ..service import ServiceError, SessionService

try:
    from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.responses import JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
except ImportError as e:  # an optional extra
    raise ImportError("the HTTP API needs FastAPI: pip install 'fisedit-compiler[serve]'") from e


STATUS = {"unknown": 404, "invalid": 400, "conflict": 409}  # by `ServiceError.kind`


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mask_png(mask: torch.Tensor) -> bytes:
    """A (H, W) bool map as a black and white PNG (white = True)."""
    return png(Image.fromarray(mask.cpu().to(torch.uint8).mul(255).numpy()))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def result_json(sid: str, result: EditResult, history: list[str]) -> dict[str, Any]:
    """What a generate, upload, edit or undo answers: the image, the maps, the phases' U-Net work, the history."""
    phases = {name: dataclasses.asdict(stats) for name, stats in result.stats.items() if isinstance(stats, PhaseStats)}
    return {
        "id": sid, "prompt": result.prompt, "history": history, "image": _b64(png(result.images[0])),
        "mask": _b64(mask_png(result.mask)) if result.mask is not None else None,
        "region": _b64(mask_png(result.region)) if result.region is not None else None,
        "phases": phases, "cache_bytes": result.stats.get("cache_bytes"),
    }


async def _image(upload: UploadFile | None, what: str) -> Image.Image | None:
    if upload is None:
        return None
    data = await upload.read()
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise HTTPException(400, f"the {what} is not an image PIL can read ({e})") from e
    return image


def create_app(service: SessionService) -> FastAPI:
    """The API's FastAPI app over `service` (see the module docstring)."""
    app = FastAPI(title="fisedit", description="Region edits of generated or uploaded images, by session.")
    _add_error_handlers(app)

    @app.post("/v1/sessions")
    async def create(prompt: str = Form(...), seed: int = Form(0), steps: int | None = Form(None),
                     image: UploadFile | None = File(None)):
        picture = await _image(image, "image")

        def start() -> dict[str, Any]:
            sid = service.create()
            try:
                if picture is None:
                    result = service.generate(sid, prompt, seed, steps=steps)
                else:
                    result = service.upload(sid, picture.convert("RGB"), prompt, steps=steps)
            except BaseException:
                service.delete(sid)  # a session that never had an image is not kept
                raise
            return result_json(sid, result, service.history(sid))

        return await run_in_threadpool(start)

    @app.get("/v1/sessions/{sid}")
    def history(sid: str):
        return {"id": sid, "history": service.history(sid)}

    @app.get("/v1/sessions/{sid}/image")
    def image(sid: str):
        return Response(png(service.current(sid).images[0]), media_type="image/png")

    @app.post("/v1/sessions/{sid}/edits")
    async def edit(sid: str, prompt: str = Form(...), mask: UploadFile | None = File(None), keep: bool = Form(True)):
        drawn = await _image(mask, "mask")

        def work() -> dict[str, Any]:
            return result_json(sid, service.edit(sid, prompt, mask=drawn, keep=keep), service.history(sid))

        return await run_in_threadpool(work)

    @app.post("/v1/sessions/{sid}/undo")
    def undo(sid: str):
        return result_json(sid, service.undo(sid), service.history(sid))

    @app.delete("/v1/sessions/{sid}", status_code=204)
    def delete(sid: str):
        service.delete(sid)
        return Response(status_code=204)

    @app.get("/v1/service")
    def stats():
        return service.stats()

    _add_stateless_edit(app, service)
    return app


def _add_stateless_edit(app: FastAPI, service: SessionService) -> None:
    """`POST /v1/images/edits`, the OpenAI-compatible form (`stateless_edit`)."""

    @app.post("/v1/images/edits")
    async def edit_image(image: UploadFile = File(...), prompt: str = Form(...), mask: UploadFile | None = File(None),
                         source_prompt: str = Form(""), n: int = Form(1), response_format: str = Form("b64_json")):
        if n != 1 or response_format != "b64_json":
            raise HTTPException(400, "this server returns one edited image as b64_json (n=1, "
                                     "response_format=b64_json)")
        picture, drawn = await _image(image, "image"), openai_mask(await _image(mask, "mask"))
        return await run_in_threadpool(lambda: stateless_edit(service, picture, prompt, drawn, source_prompt))


def openai_mask(mask: Image.Image | None) -> Image.Image | None:
    """An OpenAI-style mask as fisedit's (white = edit): with an alpha channel, the fully transparent pixels; without
    one, the mask as it is."""
    if mask is None or "A" not in mask.getbands():
        return mask
    return Image.fromarray((np.asarray(mask.getchannel("A")) == 0).astype(np.uint8) * 255, "L")


def stateless_edit(service: SessionService, picture: Image.Image, prompt: str, mask: Image.Image | None,
                   source_prompt: str) -> dict[str, Any]:
    """Load `picture`, edit it to `prompt` in a session of its own, delete the session; the OpenAI-style answer."""
    sid = service.create()
    try:
        service.upload(sid, picture.convert("RGB"), source_prompt)
        result = service.edit(sid, prompt, mask=mask)
        answer = result_json(sid, result, service.history(sid))
    finally:
        service.delete(sid)
    image = answer.pop("image")
    del answer["id"], answer["history"]
    return {"created": int(time.time()), "data": [{"b64_json": image}], "fisedit": answer}


def _add_error_handlers(app: FastAPI) -> None:
    """Requests the service cannot serve: a 4xx with the service's own message, never a 500."""

    def reply(status: int):
        async def handler(request: Request, error: Exception):
            return JSONResponse({"detail": str(error)}, status_code=status)
        return handler

    app.add_exception_handler(ServiceError, _service_error)
    for error in (MaskError, PromptTooLongError, TypeError, ValueError):
        app.add_exception_handler(error, reply(400))


async def _service_error(request: Request, error: ServiceError):
    return JSONResponse({"detail": str(error)}, status_code=STATUS[error.kind])
