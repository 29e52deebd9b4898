"""The editing app (`fisedit app`): the functions behind the page (`app.controller.EditApp`), called directly, and the
page itself (Gradio), built and driven over HTTP on 127.0.0.1."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fisedit_compiler as fisedit
from fisedit_compiler.app import AppError, EditApp
from fisedit_compiler.app.controller import painted_mask
from fisedit_compiler.models import random_pipeline
from fisedit_compiler.service import SessionService

LATENT = 16
STEPS = 4
PROMPT = "a cabin in the woods"


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("sd2", latent_size=LATENT, seed=0)


@pytest.fixture
def app(tmp_path, pipe):
    service = SessionService(pipe, tmp_path / "sessions", fisedit.Policy(block_size=2), num_inference_steps=STEPS,
                             max_live=2)
    made = EditApp(service, tmp_path)
    yield made
    made.stop()


def painted(rows: slice, cols: slice, size: int = 8 * LATENT) -> dict:
    """What Gradio's ImageEditor gives for strokes over the latent box (rows, cols): an RGBA layer over the picture."""
    layer = np.zeros((size, size, 4), dtype=np.uint8)
    layer[8 * rows.start:8 * rows.stop, 8 * cols.start:8 * cols.stop] = (255, 0, 0, 255)
    return {"background": Image.new("RGB", (size, size)), "layers": [Image.fromarray(layer, "RGBA")],
            "composite": None}


def box(rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


@torch.no_grad()
def test_generate_edit_undo_download_and_reopen(app, tmp_path):
    """The page's flow: a painted mask recomputes only its region (the latents outside bit-identical), the view shows
    before | after | region and the savings against the source run's cost, edits chain in the history, undo goes
    back, and a downloaded session opens again as a new session with the same picture."""
    sid, view = app.generate(None, PROMPT, seed=0, steps=STEPS)
    source = app.service.current(sid)
    assert view.current.size == (8 * LATENT, 8 * LATENT) and [p for _, p in view.history] == [PROMPT]
    assert "Generated in" in view.summary

    sid, view = app.edit(sid, "a red cabin in the woods", painted(slice(3, 9), slice(4, 12)))
    edited = app.service.current(sid)
    mask = box(slice(3, 9), slice(4, 12))
    assert torch.equal(edited.latents[..., ~mask], source.latents[..., ~mask])
    assert not torch.equal(edited.latents[..., mask], source.latents[..., mask])
    assert view.before is not None and view.after.size == view.before.size and view.region is not None
    assert "saved" in view.summary and "of the MACs" in view.summary
    assert [p for _, p in view.history] == [PROMPT, "a red cabin in the woods"]

    sid, view = app.edit(sid, "a red cabin in the woods at night", None)  # the mask detected
    assert len(view.history) == 3 or "Nothing changed" in view.summary
    sid, view = app.undo(sid)
    assert [p for _, p in view.history][-1] == "a red cabin in the woods"
    assert torch.equal(app.service.current(sid).latents, edited.latents)

    archive = app.download(sid)
    assert archive.is_file() and archive.is_relative_to(tmp_path / "downloads")
    other, view = app.open_saved(str(archive))
    assert other != sid and torch.equal(app.service.current(other).latents, edited.latents)
    assert "Opened" in view.summary


@torch.no_grad()
def test_bad_input_gets_a_message_and_loses_nothing(app, tmp_path, pipe):
    with pytest.raises(AppError, match="no picture to edit yet"):
        app.edit(None, "a red cabin", None)
    with pytest.raises(AppError, match="nothing to undo"):
        app.undo(None)
    with pytest.raises(AppError, match="type a prompt"):
        app.generate(None, "  ", seed=0, steps=STEPS)
    for steps, reason in (("abc", "whole number"), (0, ">= 1"), (2.5, "whole number")):
        with pytest.raises(AppError, match=reason):
            app.generate(None, PROMPT, seed=0, steps=steps)
    with pytest.raises(AppError, match="choose a picture"):
        app.upload(None, None, "a photo")
    with pytest.raises(AppError, match="between 16x16 and 4096x4096"):
        app.upload(None, Image.new("RGB", (8, 8)), "a photo")

    sid, _ = app.generate(None, PROMPT, seed=0, steps=STEPS)
    source = app.service.current(sid)
    with pytest.raises(AppError, match="painted on a 64x64 picture, the current one is 128x128"):
        app.edit(sid, "a red cabin", painted(slice(0, 4), slice(0, 4), size=64))
    with pytest.raises(AppError, match="too long|tokens"):
        app.edit(sid, " ".join(["cabin"] * 200), None)
    not_a_zip = tmp_path / "notes.txt"
    not_a_zip.write_text("hello")
    with pytest.raises(AppError, match="not a session downloaded"):
        app.open_saved(str(not_a_zip))
    other_model = SessionService(random_pipeline("sd2", latent_size=LATENT, seed=1), tmp_path / "other",
                                 num_inference_steps=STEPS)
    foreign = EditApp(other_model, tmp_path / "other_app")
    foreign_sid, _ = foreign.generate(None, PROMPT, seed=0, steps=STEPS)
    with pytest.raises(AppError, match="other U-Net weights"):
        app.open_saved(str(foreign.download(foreign_sid)))
    foreign.stop()
    # nothing was lost: the session edits on from its picture
    _, view = app.edit(sid, "a red cabin in the woods", painted(slice(3, 9), slice(4, 12)))
    edited = app.service.current(sid)
    mask = box(slice(3, 9), slice(4, 12))
    assert torch.equal(edited.latents[..., ~mask], source.latents[..., ~mask])


def test_an_empty_painting_means_a_detected_mask():
    assert painted_mask(None, (32, 32)) is None
    assert painted_mask({"background": None, "layers": [np.zeros((32, 32, 4), np.uint8)]}, (32, 32)) is None
    mask = painted_mask({"layers": [Image.fromarray(np.full((32, 32, 4), 255, np.uint8), "RGBA")]}, (32, 32))
    assert mask.size == (32, 32) and np.asarray(mask).all()


@torch.no_grad()
def test_uploads_are_resized_and_idle_sessions_reopen_from_disk(app):
    """An upload of another size and aspect is cropped and resized to the model's size; a session idle past the
    timeout is dropped from memory and its next request reopens it from its saved state."""
    g = np.random.default_rng(0)
    photo = Image.fromarray(g.integers(0, 255, (150, 200, 3), dtype=np.uint8))
    sid, view = app.upload(None, photo, "a noisy photo", steps=STEPS)
    assert view.current.size == (8 * LATENT, 8 * LATENT) and "200x150" in view.summary
    before = app.service.current(sid).latents
    app.idle_seconds = 0.0
    assert app.evict_idle() == [sid] and sid not in app.service._live
    sid, view = app.edit(sid, "a noisy photo of a cabin", painted(slice(2, 6), slice(2, 6)))
    mask = box(slice(2, 6), slice(2, 6))
    assert torch.equal(app.service.current(sid).latents[..., ~mask], before[..., ~mask])


def test_the_page_builds_with_its_controls(app):
    gr = pytest.importorskip("gradio", reason="the page needs the [app] extra (gradio)")
    from fisedit_compiler.app.page import build_page

    page = build_page(app)
    assert isinstance(page, gr.Blocks)
    ids = {getattr(block, "elem_id", None) for block in page.blocks.values()}
    assert {"generate", "apply", "undo", "current", "after", "summary"} <= ids


@pytest.mark.slow  # a browser and a server: fifteen seconds
def test_the_page_in_a_headless_browser(tmp_path, pipe):
    """The real page in headless Chromium (`tools/app_screenshot.drive`): generate, paint a mask on the current
    picture, type an edit, apply, and read the savings from the page; a screenshot is written to the test's folder."""
    import sys
    from pathlib import Path

    pytest.importorskip("gradio", reason="the page needs the [app] extra (gradio)")
    pytest.importorskip("selenium.webdriver", reason="the browser test drives Chromium with Selenium")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import app_screenshot

    if app_screenshot.chromium() is None:
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver (.ci/run installs them)")
    from fisedit_compiler.app import launch

    port = app_screenshot.free_port()
    page = launch(pipe, tmp_path, port=port, steps=STEPS, block=False)
    try:
        summary = app_screenshot.drive(f"http://127.0.0.1:{port}", tmp_path / "app.png", timeout=120)
    finally:
        page.close()
    assert "The edit saved" in summary and "recomputed" in summary
    assert (tmp_path / "app.png").is_file()


def test_the_command_refuses_bad_settings_before_loading_anything(capsys):
    from fisedit_compiler.cli import main

    assert main(["app", "--steps", "0"]) == 2
    assert "--steps and --sessions-in-memory are at least 1" in capsys.readouterr().err


@torch.no_grad()
def test_requests_report_their_denoising_steps(app):
    """The page's progress bar: inside `reporting`, a generation reports each of its steps, up to all of them."""
    reports = []
    with app.reporting(lambda done, total: reports.append((done, total))):
        app.generate(None, PROMPT, seed=0, steps=STEPS)
    assert reports[0] == (0, STEPS) and reports[-1] == (STEPS, STEPS) and len(reports) >= STEPS + 1
    assert "progress_bar" not in vars(app.service.pipe)  # the pipeline's own again
