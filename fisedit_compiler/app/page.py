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

from types import SimpleNamespace

from .controller import AppError, EditApp

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
        c = _layout(app)
        shown = [c.sid, c.current, c.before, c.after, c.region, c.summary, c.history]
        c.generate.click(_event(app, app.generate), [c.sid, c.prompt, c.seed, c.steps], shown)
        c.upload.click(_event(app, app.upload), [c.sid, c.picture, c.description, c.steps], shown)
        c.open_saved.click(_event(app, app.open_saved), [c.saved], shown)
        c.apply.click(_event(app, app.edit), [c.sid, c.edited_prompt, c.current], shown)
        c.edited_prompt.submit(_event(app, app.edit), [c.sid, c.edited_prompt, c.current], shown)
        c.undo.click(_event(app, app.undo), [c.sid], shown)

        def fetch(session):
            try:
                return gr.File(value=str(app.download(session)), visible=True)
            except AppError as e:
                raise gr.Error(str(e)) from e

        c.download.click(fetch, [c.sid], [c.session_file])
    return page


def _layout(app: EditApp) -> SimpleNamespace:
    """The page's components, laid out (inside a `gr.Blocks`)."""
    c = SimpleNamespace(sid=gr.State(None))  # this browser session's id in the service
    gr.Markdown(f"# {TITLE}\n{INTRO}")
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Tab("Generate"):
                c.prompt = gr.Textbox(label="Prompt", value="a red circle and a blue square on a gray background",
                                      elem_id="source-prompt")
                with gr.Row():
                    c.seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, elem_id="seed")
                    c.steps = gr.Number(label="Steps", value=app.service.num_inference_steps, precision=0,
                                        minimum=1, maximum=200, elem_id="steps")
                c.generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Tab("Upload"):
                c.picture = gr.Image(label="Picture", type="pil", sources=["upload"])
                c.description = gr.Textbox(label="What the picture shows")
                c.upload = gr.Button("Load picture", variant="primary")
            with gr.Tab("Open a saved session"):
                c.saved = gr.File(label="A session downloaded from this app (.zip)", file_types=[".zip"])
                c.open_saved = gr.Button("Open")
        with gr.Column(scale=1):
            c.current = gr.ImageEditor(label="Current picture: paint the region to edit (optional)", type="pil",
                                       sources=[], brush=gr.Brush(colors=["#ff0000"], default_size=16),
                                       layers=False, elem_id="current")
            c.edited_prompt = gr.Textbox(label="Edited prompt", elem_id="edited-prompt")
            with gr.Row():
                c.apply = gr.Button("Apply edit", variant="primary", elem_id="apply")
                c.undo = gr.Button("Undo", elem_id="undo")
                c.download = gr.Button("Download session")
            c.session_file = gr.File(label="Session", visible=False)
    with gr.Row():
        c.before = gr.Image(label="Before", interactive=False)
        c.after = gr.Image(label="After", interactive=False, elem_id="after")
        c.region = gr.Image(label="Recomputed region", interactive=False)
    c.summary = gr.Markdown(elem_id="summary")
    c.history = gr.Gallery(label="History (oldest first)", columns=8, rows=1, height=170, object_fit="contain",
                           fit_columns=False, allow_preview=False)
    return c


def _event(app: EditApp, fn):
    """An event handler calling `fn` (an `EditApp` request) with a progress bar over its denoising steps and showing
    its `View`; a failure shows as a message."""
    def run(*args, progress=gr.Progress()):
        try:
            with app.reporting(lambda done, total: progress((done, total), desc="denoising", unit="steps")):
                session, view = fn(*args)
        except AppError as e:
            raise gr.Error(str(e)) from e
        except Exception as e:  # never a stack trace on the page: what went wrong, in one line
            raise gr.Error(f"{type(e).__name__}: {e}") from e
        return [session, view.current, view.before, view.after, view.region, view.summary, list(view.history)]
    return run
