"""Tests of fisedit_compiler.training: the shape scenes, the grammar tokenizer, the evaluator, and a tiny training run.

The training test runs the real code path (the CLI, every phase, checkpoints, export) on the tiny config; the
full model is only built on the meta device, to check it fits the size budget.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fisedit_compiler import cli
from fisedit_compiler.models import load_pipeline, write_tokenizer_files
from fisedit_compiler.training import quality
from fisedit_compiler.training.evaluator import count_matches, find_objects, match_objects
from fisedit_compiler.training.model_config import (
    FULL,
    TEXT_MAX_LENGTH,
    UNET_LAYOUTS,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    count_parameters,
    model_size,
)
from fisedit_compiler.training.shapes import (
    COLOURS,
    GRAMMAR_WORDS,
    SHAPES,
    ObjectSpec,
    Scene,
    caption_for,
    sample_scene,
    sample_spec,
    scene_from_description,
)
from fisedit_compiler.training.trainer import CHECKPOINT, LOSS_LOG, RECIPES, TrainConfig, train

# --------------------------------------------------------------------------- scenes


def test_same_seed_same_scene_and_other_seeds_differ() -> None:
    first, again, other = sample_scene(11), sample_scene(11), sample_scene(12)
    assert np.array_equal(first.image, again.image) and first.caption == again.caption
    assert [(o.shape, o.colour, o.bbox) for o in first.objects] == [(o.shape, o.colour, o.bbox) for o in again.objects]
    assert not np.array_equal(first.image, other.image)
    assert first.image.shape == (128, 128, 3) and first.image.dtype == np.uint8


def test_captions_name_every_object_and_only_grammar_words() -> None:
    for seed in range(100):
        scene = sample_scene(seed)
        words = scene.caption.replace(",", " ").split()
        assert set(words) <= set(GRAMMAR_WORDS), scene.caption
        phrases = [(words[i - 1], words[i]) for i, word in enumerate(words) if word in SHAPES]
        assert sorted(phrases) == sorted((o.colour, o.shape) for o in scene.objects), scene.caption
        if "background" in words:
            assert scene.spec.background in words
            assert ("striped" in words) == (scene.spec.texture == "striped")
            assert ("checkered" in words) == (scene.spec.texture == "checkered")


def test_scene_statistics() -> None:
    scenes = [sample_scene(seed) for seed in range(300)]
    counts = np.bincount([len(s.objects) for s in scenes], minlength=4)
    assert counts[0] == 0 and min(counts[1:]) > 30
    assert {o.shape for s in scenes for o in s.objects} == set(SHAPES)
    assert {o.colour for s in scenes for o in s.objects} == set(COLOURS)
    for scene in scenes:
        assert all(o.colour != scene.spec.background for o in scene.objects)


def test_masks_are_the_drawn_pixels() -> None:
    for seed in range(60):
        scene = sample_scene(seed)
        union = np.zeros(scene.image.shape[:2], dtype=int)
        for obj in scene.objects:
            colour = np.array(COLOURS[obj.colour])
            exact = (scene.image == colour).all(axis=-1)
            same_colour = np.any([o.mask for o in scene.objects if o.colour == obj.colour], axis=0)
            assert obj.mask.any() and not (exact & ~same_colour).any()  # a pixel of exactly its colour is an object's
            distance_to_colour = np.abs(scene.image[obj.mask].astype(int) - colour).sum(axis=-1)
            assert np.median(distance_to_colour) == 0
            assert (distance_to_colour <= 3 * 128).all()  # edge pixels: at least half covered
            rows, cols = np.nonzero(obj.mask)
            assert obj.bbox == (rows.min(), cols.min(), rows.max() + 1, cols.max() + 1)
            union += obj.mask
        assert union.max() <= 1  # objects do not overlap
    # a square on the pixel grid covers exactly its pixels
    square = scene_from_description([ObjectSpec("square", "red", "big", (64.0, 64.0), 40)])
    assert square.objects[0].mask.sum() == 1600 and square.objects[0].bbox == (44, 44, 84, 84)
    assert square.caption == "a big red square on a gray background"


def test_scene_from_description_refuses_an_invisible_object() -> None:
    with pytest.raises(ValueError, match="white object on a white background"):
        scene_from_description([ObjectSpec("circle", "white", "big", (64.0, 64.0), 40)], background="white")


# --------------------------------------------------------------------------- tokenizer

# sha256 of the files the original write_tokenizer_files(directory) wrote (before it took `words`): every random
# pipeline's tokenizer, hence its prompt embeddings, must stay bit-identical.
DEFAULT_TOKENIZER_SHA256 = {
    "vocab.json": "08e8cc9e91d7962a3f7cae2e8685237d8abdfca41ff823a457b24d2829549771",
    "merges.txt": "433a801232c531e3f1f737d859cc03d7c3cc78a4b3c4571e9c46deb0038f713e",
    "tokenizer_config.json": "effc6a1327c74a877c8320105d6067ee0cd6f48fbbb4f0e2e14da13e24f5026e",
}


def test_default_tokenizer_files_are_unchanged(tmp_path) -> None:
    write_tokenizer_files(tmp_path)
    assert {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
            for name in DEFAULT_TOKENIZER_SHA256} == DEFAULT_TOKENIZER_SHA256


def test_every_grammar_word_is_one_token() -> None:
    tokenizer = build_tokenizer()
    assert tokenizer.model_max_length == TEXT_MAX_LENGTH
    for word in GRAMMAR_WORDS:
        ids = tokenizer(word).input_ids
        assert len(ids) == 3 and ids[0] == tokenizer.bos_token_id and ids[2] == tokenizer.eos_token_id, word
    ids = {tokenizer(word).input_ids[1] for word in GRAMMAR_WORDS}
    assert len(ids) == len(set(GRAMMAR_WORDS))


def test_grammar_captions_fit_the_context() -> None:
    tokenizer = build_tokenizer()
    longest = ("a big purple triangle, a small yellow square and a big orange cross "
               "on a white checkered background")
    assert len(tokenizer(longest).input_ids) == 21
    rng = np.random.default_rng(0)
    lengths = [len(tokenizer(caption_for(sample_spec(rng), rng)).input_ids) for _ in range(300)]
    assert max(lengths) <= 21 < TEXT_MAX_LENGTH


# --------------------------------------------------------------------------- evaluator


def _scenes(object_counts: set[int], how_many: int) -> list[Scene]:
    scenes, seed = [], 0
    while len(scenes) < how_many:
        scene = sample_scene(seed)
        if len(scene.objects) in object_counts:
            scenes.append(scene)
        seed += 1
    return scenes


def _object_accuracy(scenes: list[Scene], noise: float = 0.0) -> float:
    """Fraction of drawn objects the evaluator finds (mask IoU >= 0.5) with the right colour and shape."""
    rng = np.random.default_rng(0)
    right = total = 0
    for scene in scenes:
        image = scene.image
        if noise:
            image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
        for target, found in match_objects(find_objects(image), scene.objects):
            right += found is not None and (found.colour, found.shape) == (target.colour, target.shape)
            total += 1
    return right / total


def test_evaluator_recovers_one_object_scenes() -> None:
    # measured: 200 / 200
    assert _object_accuracy(_scenes({1}, 200)) >= 0.95


def test_evaluator_recovers_multi_object_scenes() -> None:
    # measured: 1.0 (490 objects in 200 scenes); margin for a changed renderer
    assert _object_accuracy(_scenes({2, 3}, 200)) >= 0.98


def test_evaluator_tolerates_noise() -> None:
    # measured: 1.0 at sigma 20 (generated images are not flat); 0.995 at sigma 30
    assert _object_accuracy(_scenes({1, 2, 3}, 100), noise=20.0) >= 0.95


def test_evaluator_on_a_known_scene() -> None:
    objects = [ObjectSpec("circle", "red", "big", (40.0, 40.0), 44),
               ObjectSpec("triangle", "blue", "small", (96.0, 30.0), 24),
               ObjectSpec("cross", "yellow", "big", (80.0, 90.0), 40)]
    scene = scene_from_description(objects, background="black", texture="checkered")
    found = find_objects(scene.image)
    assert [(f.colour, f.shape) for f in found] == [("red", "circle"), ("yellow", "cross"), ("blue", "triangle")]
    assert [f.bbox for f in found] == [o.bbox for o in (scene.objects[0], scene.objects[2], scene.objects[1])]
    assert count_matches(found, [("red", "circle"), ("red", "circle"), ("green", "square")]) == 1
    assert find_objects(scene_from_description([], background="white").image) == []


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("layout", sorted(UNET_LAYOUTS))
def test_full_model_fits_the_size_budget(layout) -> None:
    size = model_size(False, layout)
    with torch.device("meta"):
        parameters = (count_parameters(build_vae(size, 0)) + count_parameters(build_unet(size, 0))
                      + count_parameters(build_text_encoder(size, build_tokenizer(), 0)))
    assert 2 * parameters <= 30 * 2**20  # float16


def test_unet_layouts_put_cross_attention_where_they_say() -> None:
    with torch.device("meta"):
        sd, sdxl = (build_unet(model_size(False, layout), 0) for layout in ("sd", "sdxl"))
    assert sd.config.down_block_types == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    assert sd.config.up_block_types == ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    assert sdxl.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert sdxl.config.up_block_types == ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    assert FULL.unet_cross_attention == UNET_LAYOUTS["sd"]  # the shipped model's layout
    assert model_size(False, "sdxl").describe_unet_layout() == (
        "cross-attention blocks at 16x16 and 8x8, plain blocks at 32x32, a cross-attention mid block")
    with pytest.raises(ValueError, match="unknown U-Net layout 'sd3'"):
        model_size(False, "sd3")


def _checkpoint(work_dir) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(work_dir / CHECKPOINT), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, json.loads(handle.metadata()["state"])


def _log(work_dir) -> list[dict]:
    lines = (work_dir / LOSS_LOG).read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_tiny_training_run_resumes_exactly_and_exports_a_pipeline(tmp_path) -> None:
    config = TrainConfig.preset(tiny=True, recipe="sd-layout")  # 3 VAE steps, 4 U-Net steps, 2 decoder steps
    # uninterrupted, through the CLI
    assert cli.main(["train-shapes", "--tiny", "--recipe", "sd-layout", "--quiet",
                     "--work-dir", str(tmp_path / "whole"), "--out", str(tmp_path / "pipe")]) == 0

    # interrupted twice: inside the VAE phase, then inside the U-Net phase
    work = tmp_path / "parts"
    assert train(config, work, tmp_path / "pipe_parts", stop_after_steps=2, progress=False) is None
    tensors, state = _checkpoint(work)
    assert (state["phase"], state["step"]) == ("vae", 2) and [e["step"] for e in _log(work)] == [0, 1]
    assert any(name.startswith("vae_optimizer.") for name in tensors)
    assert train(config, work, tmp_path / "pipe_parts", stop_after_steps=3, progress=False) is None
    tensors, state = _checkpoint(work)
    assert (state["phase"], state["step"]) == ("unet", 2)
    assert [(e["phase"], e["step"]) for e in _log(work)] == [("vae", 0), ("vae", 1), ("vae", 2), ("unet", 0), ("unet", 1)]
    assert train(config, work, tmp_path / "pipe_parts", stop_after_steps=2, progress=False) is None
    before_decoder, state = _checkpoint(work)
    assert (state["phase"], state["step"]) == ("decoder", 0)
    assert train(config, work, tmp_path / "pipe_parts", progress=False) == tmp_path / "pipe_parts"
    assert [e["step"] for e in _log(work) if e["phase"] == "decoder"] == [0, 1]

    whole, whole_state = _checkpoint(tmp_path / "whole")
    parts, parts_state = _checkpoint(work)
    assert whole_state["phase"] == parts_state["phase"] == "done"
    assert whole.keys() == parts.keys() and any(name.startswith("ema.unet.") for name in whole)
    assert all(torch.equal(whole[name], parts[name]) for name in whole)  # bit-identical
    assert _log(tmp_path / "whole") == _log(work)
    # the decoder phase trains the decoder alone: the encoder, hence the latents the U-Net learnt, are unchanged
    encoder = [name for name in parts if name.startswith(("vae.encoder.", "vae.quant_conv."))]
    assert encoder and all(torch.equal(parts[name], before_decoder[name]) for name in encoder)
    assert not torch.equal(parts["vae.decoder.conv_out.weight"], before_decoder["vae.decoder.conv_out.weight"])

    with pytest.raises(ValueError, match="unet_steps: 4 there, 5 now"):
        train(TrainConfig.preset(tiny=True, recipe="sd-layout", unet_steps=5), work, tmp_path / "pipe_parts",
              progress=False)

    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "fisedit train-shapes --tiny" in card and "final losses" in card and "decoder phase | 2 steps" in card
    assert sum(f.stat().st_size for f in (tmp_path / "pipe").rglob("*")) < 2 * 2**20
    with safe_open(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        assert {handle.get_slice(name).get_dtype() for name in handle.keys()} == {"F16"}

    pipe = load_pipeline(tmp_path / "pipe")  # float32 by default, every component
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32 and pipe.vae.config.scaling_factor == pytest.approx(
        whole_state["scaling_factor"])
    image = pipe("a red circle on a gray background", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 128, 128, 3) and np.isfinite(image).all()


def test_tiny_shipped_recipe_trains_and_exports_its_layout(tmp_path) -> None:
    config = TrainConfig.preset(tiny=True)
    assert train(config, tmp_path / "work", tmp_path / "pipe", progress=False) == tmp_path / "pipe"
    pipe = load_pipeline(tmp_path / "pipe")
    assert pipe.unet.config.down_block_types[0] == "DownBlock2D"
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert "'sdxl' layout (cross-attention blocks at 16x16 and 8x8" in card and "bfloat16 autocast" in card


def test_a_finished_run_continues_as_if_configured_from_the_start(tmp_path) -> None:
    """--unet-continue-steps on a finished work dir trains on from its last U-Net step; the result equals a run
    that had the continued steps from the start (fresh optimizer moments at the switch), and it may only grow."""
    continued = TrainConfig.preset(tiny=True, unet_continue_steps=3)
    assert train(TrainConfig.preset(tiny=True), tmp_path / "a", tmp_path / "pa", progress=False) is not None
    assert train(continued, tmp_path / "a", tmp_path / "pa", progress=False) is not None
    assert train(continued, tmp_path / "b", tmp_path / "pb", progress=False) is not None
    a, a_state = _checkpoint(tmp_path / "a")
    b, b_state = _checkpoint(tmp_path / "b")
    assert a_state["unet_trained"] == b_state["unet_trained"] == 7
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    assert [e["step"] for e in _log(tmp_path / "a") if e["phase"] == "unet"] == list(range(7))
    assert "and 3 continued steps" in (tmp_path / "pa" / "README.md").read_text()
    with pytest.raises(ValueError, match="may only grow"):
        train(TrainConfig.preset(tiny=True, unet_continue_steps=1), tmp_path / "a", tmp_path / "pa", progress=False)


def test_the_default_recipe_is_the_one_the_shipped_model_card_records():
    """`fisedit train-shapes` without --recipe trains with the settings recorded in the shipped model's card (the
    shipped model must stay reproducible from the committed code)."""
    shipped, sd_layout = TrainConfig.preset(), TrainConfig.preset(recipe="sd-layout")
    card = (quality.SHAPES_MODEL / "README.md").read_text()
    assert f"| seed | {shipped.seed} |" in card
    assert f"| VAE phase | {shipped.vae_steps} steps, batch {shipped.vae_batch_size} {shipped.vae_crop}x" in card
    assert f"{shipped.vae_empty_fraction:.0%} from scenes without objects), AdamW lr {shipped.vae_lr} " in card
    assert f"| dataset | {shipped.dataset_size} scenes" in card
    assert (f"| U-Net phase | {shipped.unet_steps} steps, batch {shipped.batch_size}, U-Net and text encoder together, "
            f"AdamW lr {shipped.lr} (warm-up {shipped.warmup_steps} steps") in card
    assert f"EMA {shipped.ema_decay} of the weights" in card and f"min-SNR-{shipped.snr_gamma:g}" in card
    assert f"in the {shipped.unet_layout!r} layout" in card and "| decoder phase | none" in card
    assert ("bfloat16 autocast" in card) == shipped.mixed_precision
    assert sd_layout == TrainConfig() and (sd_layout.unet_layout, sd_layout.decoder_steps) == ("sd", 1500)
    assert (shipped.unet_layout, shipped.batch_size) == ("sdxl", 64)
    # the CLI lists the recipes without importing the trainer (torch, diffusers) at start-up: the same names
    train_shapes = cli.build_parser()._subparsers._group_actions[0].choices["train-shapes"]
    recipe = next(action for action in train_shapes._actions if action.dest == "recipe")
    assert sorted(recipe.choices) == sorted(RECIPES) and recipe.default == "shipped"
    with pytest.raises(ValueError, match="unknown training recipe 'slow'"):
        TrainConfig.preset(recipe="slow")
