"""Does an edit do what was typed, per edit type, on the embedded shapes model: a few cases of each type from the
editing suite (`training/edit_suite.py`), drawn with another seed than the benchmark's (benchmarks/edit_quality.py
measures 20 per type; its rates are in benchmarks/results/edit-quality.md), mask detected, judged by the suite's
evaluator. What is asserted per type is what the benchmark says the edit does on most cases, so that a broken
edit (an erased object, a moved one, a region that spills over the others) fails here."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from fisedit_compiler.editing.session import EditSession
from fisedit_compiler.training import edit_suite, quality

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CASES_PER_TYPE = 3
STEPS = 10  # the benchmark's 20 halved: the suite's time
SEED = 1  # the benchmark draws with seed 0


@functools.lru_cache(maxsize=None)
def pipeline():
    pipe = quality.load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def judged(kind: str) -> list[dict]:
    """The verdicts of the first `CASES_PER_TYPE` cases of `kind` whose source shows its objects, each with
    whether the latents outside the edit's region stayed the source's bit for bit."""
    verdicts = []
    for case in edit_suite.edit_cases(per_type=4 * CASES_PER_TYPE, seed=SEED, types=(kind,)):
        session = EditSession(pipeline(), num_inference_steps=STEPS)
        latents = torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(case.seed))
        source = session.generate(case.source_prompt, latents=latents)
        objects = edit_suite.source_objects(case, np.asarray(source.images[0]))
        if objects is None:  # the model did not draw the source: nothing to say about editing
            continue
        edited = session.edit(case.edited_prompt, keep=False)
        verdict = edit_suite.judge(case, objects, np.asarray(edited.images[0]))
        outside = ~edited.mask
        verdict["outside_exact"] = bool(torch.equal(edited.latents[..., outside], source.latents[..., outside]))
        verdicts.append(verdict)
        if len(verdicts) == CASES_PER_TYPE:
            return verdicts
    raise AssertionError(f"fewer than {CASES_PER_TYPE} {kind} cases whose source shows its objects")


def count(verdicts: list[dict], key: str) -> int:
    return sum(bool(v[key]) for v in verdicts)


@pytest.mark.parametrize("kind", ["colour", "shape"])
def test_an_attribute_swap_changes_the_object_where_it_was(kind):
    verdicts = judged(kind)
    assert all(v["outside_exact"] for v in verdicts)
    assert count(verdicts, "success") >= 2, verdicts
    assert np.mean([v["iou"] for v in verdicts]) >= 0.4, verdicts  # the new object covers the old one's place


def test_a_size_change_keeps_the_object_and_the_rest():
    # the size word itself often does not take on this model (benchmark: ~40%, P2P dense ~35%): the object must
    # stay, with its colour and shape, where it was, and the others with it
    verdicts = judged("size")
    assert all(v["outside_exact"] and v["others_kept"] for v in verdicts)
    assert all(v["iou"] > 0 for v in verdicts), verdicts


def test_removing_an_object_keeps_the_others():
    verdicts = judged("remove")
    assert all(v["outside_exact"] for v in verdicts)
    assert count(verdicts, "success") >= 2, verdicts


def test_adding_an_object_draws_it():
    # the source object is often erased or moved (benchmark: P2P dense and ours succeed in ~5-10%, the new object
    # drawn in most): what is asserted is that the new object appears
    verdicts = judged("add")
    assert all(v["outside_exact"] for v in verdicts)
    assert count(verdicts, "attribute") >= 2, verdicts


def test_a_background_edit_keeps_the_objects():
    # the model rarely draws another background even when regenerating (benchmark: ~10%): the objects must stay
    verdicts = judged("background")
    assert all(v["outside_exact"] and v["others_kept"] for v in verdicts), verdicts


def _cross(image: np.ndarray, top: int, left: int, arm: int, width: int, colour) -> None:
    middle = (arm - width) // 2
    image[top + middle: top + middle + width, left: left + arm] = colour
    image[top: top + arm, left + middle: left + middle + width] = colour


def test_a_source_shows_an_object_only_where_more_than_a_fragment_of_it_is_drawn():
    # the model sometimes draws "an orange cross" mostly yellow with an orange rim: the rim, smaller than any object
    # the scene generator draws, is not the source's orange cross (judging an edit against it measured an IoU of 0.08)
    case = edit_suite.EditCase("colour", (edit_suite.SceneObjectSpec("orange", "cross"),),
                               edit_suite.SceneObjectSpec("yellow", "cross"), "gray", "gray", seed=0)
    picture = np.full((128, 128, 3), 128, np.uint8)
    _cross(picture, 10, 10, 13, 5, (250, 130, 20))  # 105 pixels
    [fragment] = edit_suite.find_objects(picture, "gray")
    assert (fragment.colour, fragment.shape) == ("orange", "cross")
    assert edit_suite.source_objects(case, picture) is None
    _cross(picture, 50, 50, 40, 14, (250, 130, 20))
    found = edit_suite.source_objects(case, picture)
    assert found is not None and found[0].pixels > edit_suite.MIN_OBJECT_PIXELS
