"""The editing page: a Gradio app over `EditApp` (`fisedit app`; optional: ``pip install fisedit-compiler[app]``).

    demo = build_page(EditApp(service, data))
    demo.queue(default_concurrency_limit=1).launch(server_name="127.0.0.1", server_port=7860)

Generate a source from a prompt (seed, steps) or upload a picture with its description; type an edited prompt and
apply it (mask detected), or paint a mask on the current picture first; see before | after | the recomputed region
and what the edit saved against a dense regeneration; edits chain, the history strip shows every state, undo goes
back one, and a session downloads as a zip that opens again later. Each browser tab has its own session; work is
queued one request at a time (one pipeline), with a progress bar over the denoising steps.
"""

from __future__ import annotations

from typing import Any

from .controller import AppError, EditApp, View

try:
    import gradio as gr
except ImportError as e:  # an optional extra
    raise ImportError("the editing app needs Gradio: pip install 'fisedit-compiler[app]'") from e

TITLE = "fisedit: edit a picture by editing its prompt"
INTRO = ("Generate a picture (or upload one), then type an edited prompt. The region the edit changes is found "
         "automatically, or paint it on the current picture; only that region is recomputed, the rest of the "
         "picture stays as it was, bit for bit.")


def build_page(app: EditApp) -> gr.Blocks:
    """The page's layout and its events, each a call of `app` whose `AppError` shows as a message on the page."""
    with gr.Blocks(title="fisedit", analytics_enabled=False) as page:
        sid = gr.State(None)  # this browser session's id in the service
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        with gr.Row():
            with gr.Column(scale=1):
                with gr.Tab("Generate"):
                    prompt = gr.Textbox(label="Prompt", value="a red circle and a blue square on a gray background",
                                        elem_id="source-prompt")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                        steps = gr.Number(label="Steps", value=app.service.num_inference_steps, precision=0,
                                          minimum=1, maximum=200, elem_id="steps")
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Tab("Upload"):
                    picture = gr.Image(label="Picture", type="pil", sources=["upload"])
                    description = gr.Textbox(label="What the picture shows")
                    upload = gr.Button("Load picture", variant="primary")
                with gr.Tab("Open a saved session"):
                    saved = gr.File(label="A session downloaded from this app (.zip)", file_types=[".zip"])
                    open_saved = gr.Button("Open")
            with gr.Column(scale=1):
                current = gr.ImageEditor(label="Current picture: paint the region to edit (optional)", type="pil",
                                         sources=[], brush=gr.Brush(colors=["#ff0000"], default_size=16),
                                         layers=False, elem_id="current")
                edited_prompt = gr.Textbox(label="Edited prompt", elem_id="edited-prompt")
                with gr.Row():
                    apply = gr.Button("Apply edit", variant="primary", elem_id="apply")
                    undo = gr.Button("Undo", elem_id="undo")
                    download = gr.Button("Download session")
                session_file = gr.File(label="Session", visible=False)
        with gr.Row():
            before = gr.Image(label="Before", interactive=False)
            after = gr.Image(label="After", interactive=False, elem_id="after")
            region = gr.Image(label="Recomputed region", interactive=False)
        summary = gr.Markdown(elem_id="summary")
        history = gr.Gallery(label="History (oldest first)", columns=8, height=180, allow_preview=False)

        shown = [sid, current, before, after, region, summary, history]

        def show(result: tuple[str, View]) -> list[Any]:
            session, view = result
            return [session, view.current, view.before, view.after, view.region, view.summary,
                    [(image, caption) for image, caption in view.history]]

        def event(fn):
            def run(*args, progress=gr.Progress(track_tqdm=True)):
                try:
                    return show(fn(*args))
                except AppError as e:
                    raise gr.Error(str(e)) from e
                except Exception as e:  # never a stack trace on the page: what went wrong, in one line
                    raise gr.Error(f"{type(e).__name__}: {e}") from e
            return run

        generate.click(event(app.generate), [sid, prompt, seed, steps], shown)
        upload.click(event(app.upload), [sid, picture, description, steps], shown)
        open_saved.click(event(app.open_saved), [saved], shown)
        apply.click(event(app.edit), [sid, edited_prompt, current], shown)
        edited_prompt.submit(event(app.edit), [sid, edited_prompt, current], shown)
        undo.click(event(app.undo), [sid], shown)

        def fetch(session):
            try:
                return gr.File(value=str(app.download(session)), visible=True)
            except AppError as e:
                raise gr.Error(str(e)) from e

        download.click(fetch, [sid], [session_file])
    return page
