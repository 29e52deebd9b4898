"""The runnable examples in examples/: each runs as a newcomer would run it, on small settings, and writes what it
says it writes. `make demo` is examples/demo.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LATENT = 16
SMALL = ["--random", "--latent-size", str(LATENT), "--steps", "4", "--quiet"]


def example(name: str):
    """The example script `examples/<name>.py` as a module (its `main(argv)` runs it)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def overlay_marks(folder, name: str, under: str = "source.png") -> np.ndarray:
    """(H, W) bool at image resolution: where a mask picture differs from the image it is drawn over (it blends red
    in there)."""
    def pixels(file):
        return np.asarray(Image.open(folder / file).convert("RGB")).astype(int)

    return (pixels(name) != pixels(under)).any(axis=-1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_demo_writes_pictures_and_a_report(tmp_path, capsys):
    assert example("demo").main([*SMALL, "--out", str(tmp_path)]) == 0
    for name in ["source.png", "edited_1.png", "edited_2.png", "mask_1.png", "mask_2.png", "report.md", "report.json"]:
        assert (tmp_path / name).is_file(), name
    assert Image.open(tmp_path / "source.png").size == (8 * LATENT, 8 * LATENT)
    side_by_side = np.asarray(Image.open(tmp_path / "edit_2.png").convert("RGB"))
    source = np.asarray(Image.open(tmp_path / "edited_1.png").convert("RGB"))  # edit 2 edits edit 1's image
    scale = 256 // (8 * LATENT)  # panels are drawn at 256 pixels a side, under a caption line
    assert np.array_equal(side_by_side[-8 * LATENT * scale:, :8 * LATENT * scale][::scale, ::scale], source)
    report = json.loads((tmp_path / "report.json").read_text())
    assert [e["edit"] for e in report["edits"]] == [1, 2]
    phases = {row["phase"]: row for row in report["phases"]}
    assert phases["source (record)"]["unet_calls"] == 4
    assert phases["edit 2: sparse"]["unet_calls"] == 4  # the given mask: sparse from the first step
    assert 0 < report["edits"][1]["mask_fraction"] < 0.5
    # a few noise pixels are red already, so blending red over them changes nothing
    assert overlay_marks(tmp_path, "mask_2.png", "edited_1.png").mean() == pytest.approx(report["edits"][1]["mask_fraction"],
                                                                         abs=2e-3)
    assert "| phase |" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_default_demo_runs_on_the_embedded_shapes_model(tmp_path, capsys):
    assert example("demo").main(["--steps", "6", "--quiet", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["edits"]) == 3 and "shapes model" in report["note"]
    assert Image.open(tmp_path / "edit_3.png").size[0] > 4 * 128  # four panels of the 128x128 pictures
    phases = {row["phase"]: row for row in report["phases"]}
    # the drawn box: a word swap ("circle" -> "cross"), so its first steps hold the layout (dense, under control:
    # 30% of 6), then sparse
    assert phases["edit 3: dense"]["unet_calls"] == 2 and phases["edit 3: sparse"]["unet_calls"] == 4
    assert 0 < report["edits"][2]["mask_fraction"] < 1
    # the time to each picture, everything included, beside the regeneration's: in the report and its text
    assert all(e["seconds_to_picture"] > 0 and e["regeneration_seconds_to_picture"] > 0 for e in report["edits"])
    assert (tmp_path / "report.md").read_text().count("the regeneration's after") == 3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("name", ["pipeline_edit", pytest.param("backend", marks=pytest.mark.slow)])  # dynamo: 17 s
def test_the_pipeline_examples_edit_only_the_right_half(tmp_path, capsys, name):
    """fisedit.compile and the torch.compile backend inside an unchanged pipeline: outside the recomputed region the
    edited latents are the source's, and the picture changed."""
    assert example(name).main(["--steps", "4", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "latents outside the recomputed region: identical to the source" in printed
    assert "recorded 4 steps" in printed
    source = np.asarray(Image.open(tmp_path / "source.png").convert("RGB")).astype(int)
    edited = np.asarray(Image.open(tmp_path / "edited.png").convert("RGB")).astype(int)
    assert not np.array_equal(source, edited)


def test_the_dumps_example_writes_an_index_per_signature(tmp_path, capsys):
    assert example("dumps").main(["--out", str(tmp_path)]) == 0
    signatures = [p.parent for p in tmp_path.glob("*/index.html")]
    assert len(signatures) == 1 and (tmp_path / "index.html").is_file()
    assert (signatures[0] / "00_captured.dot").is_file() and list((signatures[0] / "sparse").glob("*.dot"))


@pytest.mark.parametrize("family", ["sd3", "flux", "kontext"])
def test_the_transformer_example_edits_inside_its_mask(tmp_path, capsys, family):
    assert example("transformer_edit").main(["--family", family, "--size", "128", "--steps", "4",
                                              "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "latents outside the mask: identical to the source" in printed and "sparse transformer calls" in printed
    assert (tmp_path / "source.png").is_file() and (tmp_path / "edited.png").is_file()
