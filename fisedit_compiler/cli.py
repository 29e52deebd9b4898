"""The `fisedit` command line: `edit` (a scripted edit session), `app` (the editing page), `inspect` (graph dumps) and
`train-shapes`.

The demo (`make demo`) is `examples/demo.py`, built from this module's model arguments and `run_edits`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


from . import inspect_cmd
from .editing import GUIDANCE_SCALE
from .editing.mask_image import load_mask_image
from .editing.pipelines import DENOISERS
from .editing.token_alignment import PromptTooLongError
from .policy import Policy


def _component_config(args, component: str) -> dict | None:
    """The `config.json` of a component folder of `--model`, or None (no model folder, or no such file)."""
    import json

    config = Path(_model_folder(args)) / component / "config.json" if not args.random else None
    return json.loads(config.read_text()) if config is not None and config.is_file() else None


def latent_shape(args, latent: int | None) -> tuple[int, int]:
    """(h, w) of the latents: `latent` if given, else the model folder's U-Net (or SD3 transformer) `sample_size`."""
    if latent is not None:
        return latent, latent
    size = next((config["sample_size"] for config in map(lambda c: _component_config(args, c), DENOISERS)
                 if config and config.get("sample_size")), None)
    if size is None:
        folder = _model_folder(args)
        raise FileNotFoundError(f"no {Path(folder) / 'unet' / 'config.json'} (or transformer/config.json) with a "
                                f"sample_size: {folder} is not a diffusers pipeline folder, or its model does not say "
                                "its latent size (FLUX: use the Python API, EditSession(pipe, height=, width=))")
    return (size, size) if isinstance(size, int) else tuple(size)


def _vae_scale_factor(args) -> int:
    """Image pixels per latent pixel, as diffusers pipelines compute it from the VAE's config (8 for SD)."""
    vae = _component_config(args, "vae")
    return 8 if vae is None else 2 ** (len(vae["block_out_channels"]) - 1)


def _model_folder(args) -> str:
    """The pipeline folder to load: `--model`, else the embedded shapes model."""
    from .training.quality import SHAPES_MODEL

    return args.model or str(SHAPES_MODEL)


def pipeline_from_args(args):
    """The pipeline the arguments name: `--random`'s random-weight model, `--model`'s folder, or the shapes model."""
    from .models import load_pipeline, random_pipeline

    if args.random:
        if args.model:
            raise ValueError("--random and --model exclude each other: --random builds a random-weight model")
        return random_pipeline(args.arch, latent_size=args.latent_size, seed=args.seed or 0, size=args.size,
                               scheduler=args.scheduler)
    return load_pipeline(_model_folder(args))


def _open_image(path: str, option: str):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{option} {path}: not an image PIL can read ({e})") from e
    return image


def _policy(args) -> Policy:
    return Policy(block_size=args.block_size)


def run_edits(args, prompt: str | None, edits: list, image=None, note: str | None = None, seed: int | None = None,
              steps: int | None = None, guidance_scale: float | None = None, pipe=None) -> int:
    """Run a scripted session (`report.run_session`) with the model the arguments name, print its report, and
    write its pictures to `args.out`. `prompt` None: continue `args.session`."""
    from .report import RANDOM_WEIGHTS_NOTE, format_report, run_session

    pipe = pipe or pipeline_from_args(args)
    pipe.set_progress_bar_config(disable=args.quiet)
    note = RANDOM_WEIGHTS_NOTE if args.random else note
    if note:
        print(f"note: {note}\n")
    seed = seed if seed is not None else (0 if args.seed is None else args.seed)
    steps = steps or args.steps or 20
    guidance = guidance_scale or args.guidance_scale or GUIDANCE_SCALE
    session = getattr(args, "session", None)
    data = run_session(pipe, prompt, edits, Path(args.out), steps, seed, _policy(args),
                       log=(lambda *a: None) if args.quiet else print, note=note, guidance_scale=guidance,
                       session_dir=Path(session) if session else None, image=image)
    print("\n" + format_report(data))
    print(f"\nwrote {args.out}/: edit_<n>.png (source | edited | recomputed region | dense regeneration), "
          "source.png, edited_<n>.png, mask_<n>.png, report.md, report.json")
    return 0


def add_model_arguments(parser: argparse.ArgumentParser, latent_size: int) -> None:
    """The arguments that choose the model and the session's settings (`edit`'s, the demo's)."""
    parser.add_argument("--model", help="a local diffusers pipeline folder (default: the embedded shapes model)")
    parser.add_argument("--random", action="store_true",
                        help="a built-in random-weight model instead (--arch, --size, --latent-size, --scheduler)")
    parser.add_argument("--arch", default="sd2", choices=["sd15", "sd2", "sdxl"], help="random model architecture")
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"], help="random model size")
    parser.add_argument("--latent-size", type=int, default=latent_size, help="random model latent size")
    parser.add_argument("--scheduler", default="ddim", choices=["ddim", "dpm", "pndm", "euler"],
                        help="random model scheduler")
    parser.add_argument("--steps", type=int, help="denoising steps (default: 20)")
    parser.add_argument("--guidance-scale", type=float,
                        help=f"classifier-free guidance (default: {GUIDANCE_SCALE}, as EditSession's; on the shapes "
                        "model a colour swap erased its object twice as often at 5)")
    parser.add_argument("--seed", type=int, help="the source run's noise (and a random model's weights); default 0, "
                        "the demo's shapes session: its own")
    parser.add_argument("--block-size", type=int, default=Policy.block_size)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _train_shapes(args, argv: list[str]) -> int:
    """Train (or resume) the embedded shapes model; see fisedit_compiler/training/trainer.py."""
    import shlex

    from . import environment
    from .training.trainer import DEFAULT_OUT, TrainConfig, train

    if (environment.current().omp_wait_policy or "").upper() != "PASSIVE":
        print("note: OMP_WAIT_POLICY=PASSIVE is not set: torch's idle threads spin, and training runs several times "
              "slower whenever another process uses a core", file=sys.stderr)
    logging.getLogger("fisedit_compiler.training").setLevel(logging.INFO)
    config = TrainConfig.preset(
        tiny=args.tiny, recipe=args.recipe, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
        batch_size=args.batch_size, vae_batch_size=args.vae_batch_size, dataset_size=args.dataset_size,
        unet_continue_steps=args.unet_continue_steps, decoder_steps=args.decoder_steps,
        threads=args.threads, checkpoint_minutes=args.checkpoint_minutes,
        mixed_precision=False if args.float32 else None,
    )
    out = train(config, args.work_dir, args.out or DEFAULT_OUT, command=shlex.join(["fisedit", *argv]),
                progress=not args.quiet)
    print(f"wrote {out}/ (model card: {out}/README.md)")
    return 0


def _train_shapes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", default="out/train-shapes",
                        help="checkpoints, latents and the loss log; the same command resumes an interrupted run")
    parser.add_argument("--out", help="the pipeline folder to write (default: fisedit_compiler/assets/shapes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="the tiny smoke-test model and step counts")
    parser.add_argument("--recipe", default="shipped", choices=("shipped", "sd-layout"),
                        help="shipped: the settings of the shipped model (88 min on 2 CPU cores); sd-layout: SD 1/2's "
                             "U-Net layout in float32, the previously shipped model with --unet-continue-steps 5600 "
                             "(4.8 h; see fisedit_compiler/training/trainer.py, RECIPES)")
    parser.add_argument("--vae-steps", type=int, help="VAE training steps (default: the preset's)")
    parser.add_argument("--vae-batch-size", type=int)
    parser.add_argument("--dataset-size", type=int, help="scenes encoded for the U-Net phase")
    parser.add_argument("--unet-steps", type=int, help="U-Net + text encoder training steps")
    parser.add_argument("--unet-continue-steps", type=int,
                        help="more U-Net steps after --unet-steps (a finished work dir goes on from its last step)")
    parser.add_argument("--decoder-steps", type=int,
                        help="decoder fine-tuning steps after the U-Net phase (default: the preset's; a finished work "
                             "dir goes on from its last step)")
    parser.add_argument("--batch-size", type=int, help="U-Net batch size")
    parser.add_argument("--float32", action="store_true",
                        help="no bfloat16 autocast (slower on CPUs with AMX or AVX512-BF16, and a different model)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 2; 1 with --tiny)")
    parser.add_argument("--checkpoint-minutes", type=float, help="minutes between checkpoints (default: 5)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _app(args) -> int:
    from .models import load_pipeline

    try:
        from .app import launch
        from .app.page import build_page  # noqa: F401 - Gradio present: say so before loading the model
    except ImportError as e:
        raise RuntimeError(f"{e}") from e
    if args.steps < 1 or args.sessions_in_memory < 1 or args.idle_minutes <= 0:
        raise ValueError("--steps and --sessions-in-memory are at least 1, --idle-minutes above 0")
    from .service import ComputeThread

    compute = ComputeThread()  # the model loaded and run on one thread (`service.compute`)
    pipe = compute.call(load_pipeline, _model_folder(args))
    print(f"fisedit app: http://{args.host}:{args.port} (data in {args.data}/; Ctrl+C stops)", flush=True)
    launch(pipe, args.data, host=args.host, port=args.port, steps=args.steps, max_live=args.sessions_in_memory,
           idle_seconds=60 * args.idle_minutes, compute=compute)
    return 0


def _serve(args) -> int:
    if args.replicas < 1 or args.steps < 1 or args.idle_minutes <= 0:
        raise ValueError("--replicas and --steps are at least 1, --idle-minutes above 0")
    try:
        import ray
        from ray import serve

        from .serve.ray_app import build_app
    except ImportError as e:
        raise RuntimeError(f"{e}") from e
    import time

    options = {}
    if args.address is None:  # a local Ray instance: its session files under --data where its socket paths allow
        temp = ray_temp_dir(args.data)
        if temp is None:
            print(f"note: Ray keeps its session files in its default folder (/tmp/ray): {args.data}/ray is too long a "
                  "path for its sockets", flush=True)
        else:
            options["_temp_dir"] = temp
    ray.init(address=args.address, include_dashboard=False, **options)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(args.model, args.data, args.replicas, args.steps, 60 * args.idle_minutes,
                        args.gpus_per_replica), route_prefix="/")
    print(f"fisedit serve: http://{args.host}:{args.port}/docs ({args.replicas} replicas, data in {args.data}/; "
          "Ctrl+C stops)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


RAY_TEMP_MAX = 38  # characters: Ray's sockets live at <temp>/session_<date>_<pid>/sockets/..., at most 107 in all


def ray_temp_dir(data: str | Path) -> str | None:
    """Where a local Ray instance started by `fisedit serve` keeps its session files: ``<data>/ray`` (absolute), or
    None where that path is too long for the Unix sockets Ray makes inside it."""
    temp = str(Path(data).resolve() / "ray")
    return temp if len(temp) <= RAY_TEMP_MAX else None


def _server_arguments(parser: argparse.ArgumentParser, port: int, data: str, data_help: str) -> None:
    """The arguments `app` and `serve` share: the model, where to listen, the data folder, steps, idle timeout."""
    parser.add_argument("--model", help="a local diffusers pipeline folder (default: the embedded shapes model)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (default: this machine only)")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--data", default=data, help=f"the folder for {data_help}")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps of a new picture by default")
    parser.add_argument("--idle-minutes", type=float, default=15.0,
                        help="a session idle this long leaves memory (its saved state reopens on its next request)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fisedit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    edit = commands.add_parser("edit", help="generate an image, then edit its prompt (continuously)")
    add_model_arguments(edit, latent_size=64)
    edit.add_argument("--prompt", help="the source prompt (not needed when --session holds a saved session)")
    edit.add_argument("--session", help="a session folder: continued if it holds one, and saved there after the "
                      "edits")
    edit.add_argument("--edit", action="append", required=True, help="an edited prompt; repeat for a chain")
    edit.add_argument("--image", help="a picture to edit (any format PIL reads), described by --prompt, instead of "
                      "a generated one: it is cropped to the model's aspect ratio, resized and inverted")
    edit.add_argument("--mask", help="a mask image (white = edit), at latent or image resolution, or with --image "
                      "the size of that picture")
    edit.add_argument("--paste-back", type=int, metavar="N",
                      help="after decoding, keep the current picture's pixels outside the mask (with --image: the "
                      "picture itself), fading into the edit over N pixels")
    edit.add_argument("--out", default="out/edit")
    app = commands.add_parser("app", help="the editing page in the browser (needs pip install "
                              "'fisedit-compiler[app]')")
    _server_arguments(app, port=7860, data="fisedit-app-data", data_help="sessions, downloads and uploads")
    app.add_argument("--sessions-in-memory", type=int, default=4,
                     help="sessions kept in memory; the least recently used beyond are saved and dropped")
    serve = commands.add_parser("serve", help="the HTTP API on Ray Serve (needs pip install "
                                "'fisedit-compiler[serve]' 'ray[serve]')")
    _server_arguments(serve, port=8000, data="fisedit-serve-data", data_help="sessions, shared by the replicas")
    serve.add_argument("--replicas", type=int, default=1, help="edit engine replicas (each holds the pipeline)")
    serve.add_argument("--gpus-per-replica", type=float, default=0,
                       help="GPUs each replica asks Ray for (its pipeline then runs on one; default: CPU)")
    serve.add_argument("--address", help="a running Ray cluster to join (default: start a local Ray instance)")
    inspect_cmd.add_arguments(commands.add_parser("inspect", help="graph dumps, per-layer MACs and mask levels"))
    _train_shapes_arguments(
        commands.add_parser("train-shapes", help="train the embedded shapes model (88 min on 2 CPU cores)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        if args.command == "inspect":
            print(inspect_cmd.describe(inspect_cmd.run(args), Path(args.out)))
            return 0
        if args.command == "train-shapes":
            return _train_shapes(args, sys.argv[1:] if argv is None else argv)
        if args.command == "app":
            return _app(args)
        if args.command == "serve":
            return _serve(args)
        from .report import ScriptedEdit

        mask = image = None
        if args.image:
            if args.session:
                raise ValueError("--image and --session exclude each other: a saved session has its own picture")
            if not args.prompt:
                raise ValueError("--image needs --prompt, a description of the picture (what its inversion is "
                                 "conditioned on)")
            image = _open_image(args.image, "--image").convert("RGB")
            mask = _open_image(args.mask, "--mask") if args.mask else None  # the session crops it like the image
        elif args.mask:
            latent = args.latent_size if args.random else None
            mask = load_mask_image(args.mask, latent_shape(args, latent), _vae_scale_factor(args))
        if args.paste_back is not None and args.paste_back < 0:
            raise ValueError(f"--paste-back is a feather width in pixels, >= 0; got {args.paste_back}")
        return run_edits(args, args.prompt, [ScriptedEdit(prompt, mask, args.paste_back) for prompt in args.edit],
                         image)
    except (FileNotFoundError, ValueError, PromptTooLongError, RuntimeError) as e:
        print(f"fisedit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
