"""The `fisedit` command line through `main`: what each command writes, and its errors on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fisedit_compiler.cli import main

LATENT = 16
SMALL = ["--random", "--latent-size", str(LATENT), "--steps", "4", "--quiet"]


def overlay_marks(folder, name: str, under: str = "source.png") -> np.ndarray:
    """(H, W) bool at image resolution: where a mask picture differs from the image it is drawn over (it blends red
    in there): the source for the first edit, the previous edit's image for the next."""
    def pixels(file):
        return np.asarray(Image.open(folder / file).convert("RGB")).astype(int)

    return (pixels(name) != pixels(under)).any(axis=-1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_edit_with_a_mask_image_recomputes_that_region(tmp_path):
    mask = np.zeros((8 * LATENT, 8 * LATENT), dtype=np.uint8)
    mask[8 * 3:8 * 7, 8 * 2:8 * 9] = 255  # latent pixels rows 3..6, columns 2..8, drawn at image resolution
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    args = ["edit", *SMALL, "--prompt", "a cabin in the woods", "--edit", "a red cabin in the woods",
            "--mask", str(tmp_path / "mask.png"), "--block-size", "1", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    # block size 1 and the default halo of one latent pixel: the recomputed region is the box grown by one pixel
    # each side; the pixels that may change (mask_1.png) are the box itself
    assert report["edits"][0]["mask_fraction"] == pytest.approx(4 * 7 / LATENT ** 2)
    assert report["edits"][0]["region_fraction"] == pytest.approx(6 * 9 / LATENT ** 2)
    marks = overlay_marks(out, "mask_1.png")
    expected = np.zeros((LATENT, LATENT), dtype=bool)
    expected[3:7, 2:9] = True
    assert np.array_equal(marks, np.kron(expected, np.ones((8, 8), dtype=bool)))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_edit_a_picture_with_a_mask_drawn_on_it(tmp_path):
    """--image: a 600x400 photograph, cropped to the square session and inverted; the mask PNG is drawn on the
    photograph and cropped the same way."""
    from skimage import data

    Image.fromarray(data.coffee()).save(tmp_path / "photo.png")  # 600x400
    drawn = np.zeros((400, 600), dtype=np.uint8)
    drawn[:200, 100:300] = 255  # the top-left quarter of the centred 400x400 crop
    Image.fromarray(drawn).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    args = ["edit", *SMALL, "--image", str(tmp_path / "photo.png"), "--prompt", "a cup of coffee",
            "--edit", "a cup of tea", "--mask", str(tmp_path / "mask.png"), "--paste-back", "2", "--out", str(out)]
    assert main(args) == 0
    assert Image.open(out / "source.png").size == (8 * LATENT, 8 * LATENT)
    report = json.loads((out / "report.json").read_text())
    phases = {row["phase"]: row for row in report["phases"]}
    assert phases["source (inversion)"]["unet_calls"] == phases["source (record)"]["unet_calls"] == 4
    assert report["edits"][0]["mask_fraction"] == pytest.approx(0.25)
    expected = np.zeros((LATENT, LATENT), dtype=bool)
    expected[:LATENT // 2, :LATENT // 2] = True
    expected = np.kron(expected, np.ones((8, 8), dtype=bool))
    marks = overlay_marks(out, "mask_1.png")  # a few red pixels of the photo do not change when red is blended in
    assert not (marks & ~expected).any() and (marks == expected).mean() > 0.995
    # --paste-back: outside the mask the edited picture is the photograph's centre crop, resized
    from fisedit_compiler.editing.inversion import image_tensor

    picture = ((image_tensor(Image.open(tmp_path / "photo.png").convert("RGB"), 128, 128)[0].permute(1, 2, 0) + 1)
               * 127.5).round().to(torch.uint8).numpy()
    edited = np.asarray(Image.open(out / "edited_1.png").convert("RGB"))
    assert np.array_equal(edited[~expected], picture[~expected])


@pytest.mark.parametrize("args, message", [
    (["--image", "missing.png"], "--image missing.png: no such file"),
    (["--image", "pyproject.toml"], "--image pyproject.toml: not an image PIL can read"),
    (["--mask", "missing.png"], "mask image missing.png does not exist"),
    (["--model", "no/such/folder"], "pipeline folder 'no/such/folder' does not exist"),
    (["--model", ".", "--random"], "--random and --model exclude each other"),
    (["--edit", "word " * 100], "tokens long"),
])
def test_edit_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    base = ["edit", *SMALL, "--prompt", "a cabin", "--out", str(tmp_path)]
    if "--model" in args:  # the random model is for runs without a model folder
        base.remove("--random")
    if "--edit" not in args:
        base += ["--edit", "a red cabin"]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fisedit edit: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "report.json").exists()


def test_a_mask_image_of_the_wrong_size_is_an_error(tmp_path, capsys):
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(tmp_path / "mask.png")
    args = ["edit", *SMALL, "--prompt", "a cabin", "--edit", "a red cabin", "--mask", str(tmp_path / "mask.png")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "is 20x20 pixels, but the latents are 16x16: draw it at 16x16 (latent resolution) or 128x128" in err


def test_inspect_writes_its_table_and_mask_levels(tmp_path, capsys):
    args = ["inspect", "--latent-size", str(LATENT), "--mask-fraction", "0.1", "--no-svg", "--out", str(tmp_path)]
    assert main(args) == 0
    assert (tmp_path / "mask_levels.png").is_file()
    assert list(tmp_path.rglob("*.dot"))
    assert str(tmp_path) in capsys.readouterr().out


def test_unknown_arguments_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["edit", "--prompt", "a cabin"])  # --edit is required
    assert exit_.value.code == 2
    assert "--edit" in capsys.readouterr().err


def test_the_mask_image_is_read_at_latent_resolution_too(tmp_path):
    from fisedit_compiler.editing.mask_image import load_mask_image

    pixels = np.zeros((LATENT, LATENT), dtype=np.uint8)
    pixels[4, 5] = 255
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    mask = load_mask_image(tmp_path / "mask.png", (LATENT, LATENT))
    assert mask.dtype == torch.bool and mask.sum() == 1 and mask[4, 5]


def test_the_mask_image_at_image_resolution_follows_the_vae_scale_factor(tmp_path):
    """A model whose VAE downsamples 4x (like the embedded shapes model) takes masks drawn at 4x the latents."""
    from fisedit_compiler.editing.mask_image import load_mask_image

    pixels = np.zeros((4 * LATENT, 4 * LATENT), dtype=np.uint8)
    pixels[4 * 2:4 * 3, 4 * 7:4 * 9] = 255
    Image.fromarray(pixels).save(tmp_path / "mask.png")
    mask = load_mask_image(tmp_path / "mask.png", (LATENT, LATENT), scale_factor=4)
    assert mask.sum() == 2 and mask[2, 7] and mask[2, 8]
    with pytest.raises(ValueError, match="or 128x128 \\(image resolution\\)"):
        load_mask_image(tmp_path / "mask.png", (LATENT, LATENT))  # SD's factor 8: 64x64 is neither size


@pytest.mark.slow  # two CLI processes, each loading a pipeline: fifteen seconds
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_edit_continues_a_saved_session(tmp_path):
    session = tmp_path / "session"
    first = ["edit", *SMALL, "--prompt", "a cabin in the woods", "--edit", "a cabin in the woods with a river",
             "--session", str(session), "--out", str(tmp_path / "a")]
    assert main(first) == 0 and (session / "session.json").is_file()
    after_first = Image.open(tmp_path / "a" / "edited_1.png")
    second = ["edit", *SMALL, "--edit", "a red cabin in the woods with a river", "--session", str(session),
              "--out", str(tmp_path / "b")]
    assert main(second) == 0
    # the second command's source is the first one's edited image, read back from the session
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b" / "source.png")), np.asarray(after_first))
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["phases"][0]["unet_calls"] == 0  # nothing regenerated


def test_edit_without_prompt_or_saved_session_is_an_error(tmp_path, capsys):
    assert main(["edit", *SMALL, "--edit", "a red cabin", "--out", str(tmp_path)]) == 2
    assert "a source prompt is needed (--prompt)" in capsys.readouterr().err


def test_a_command_prints_no_notice_about_image_processors(tmp_path):
    """transformers announces, when diffusers' pipelines are imported without torchvision, that its image processors
    fall back to PIL: two lines of noise before every command's output (the project uses no image processor); and
    its tokenizer warned of a too long prompt before our own error said so. A fresh process, as the notices are
    printed once per process."""
    import subprocess
    import sys

    code = ("import sys; from fisedit_compiler.cli import main; sys.exit(main(sys.argv[1:]))")
    args = ["edit", *SMALL, "--prompt", "a cabin", "--edit", "word " * 100, "--out", str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "tokens long" in done.stderr  # it got as far as the pipeline's tokenizer
    assert "torchvision" not in done.stderr, done.stderr
    assert "Token indices sequence length" not in done.stderr  # the tokenizer's warning before our error


def test_a_local_ray_instance_keeps_its_files_under_the_data_folder_where_its_sockets_allow(tmp_path, monkeypatch):
    from fisedit_compiler.cli import RAY_TEMP_MAX, ray_temp_dir

    monkeypatch.chdir(tmp_path)  # a relative --data: the absolute path Ray needs
    expected = str(tmp_path / "d" / "ray")
    assert ray_temp_dir("d") == (expected if len(expected) <= RAY_TEMP_MAX else None)
    assert ray_temp_dir("/srv/fisedit") == "/srv/fisedit/ray"
    assert ray_temp_dir("/" + "x" * 40) is None  # Ray's socket paths would pass 107 characters


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_first_colour_swap_a_newcomer_types_keeps_a_recoloured_object_in_place(tmp_path):
    """`fisedit edit --prompt "a red circle on a gray background" --edit "a blue circle ..."` with every default
    (the embedded shapes model, seed 0): at the guidance of 5 the CLI used to default to for this model, the edit
    erased the circle (the picture was the background); at the session's 7.5 the circle turns blue where it was."""
    from fisedit_compiler.training.evaluator import find_objects

    out = tmp_path / "out"
    assert main(["edit", "--quiet", "--prompt", "a red circle on a gray background",
                 "--edit", "a blue circle on a gray background", "--out", str(out)]) == 0
    red = [o for o in find_objects(Image.open(out / "source.png").convert("RGB"), "gray") if o.colour == "red"]
    blue = [o for o in find_objects(Image.open(out / "edited_1.png").convert("RGB"), "gray") if o.colour == "blue"]
    assert red and blue, (red, blue)
    centre = lambda o: np.argwhere(o.mask).mean(0)  # noqa: E731
    assert min(np.linalg.norm(centre(b) - centre(red[0])) for b in blue) <= 10
