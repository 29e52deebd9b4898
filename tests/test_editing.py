"""The edit session: Otsu thresholding, mask detection, token alignment, cross-attention control, and end-to-end
sessions with each deterministic scheduler."""

from __future__ import annotations

import functools

import pytest
import torch

import fisedit_compiler as fisedit
from fisedit_compiler.compiler import ControlMode
from fisedit_compiler.editing.mask_detection import detect_mask, difference_map, otsu_threshold
from fisedit_compiler.editing.token_alignment import PromptTooLongError, align_tokens
from fisedit_compiler.models import random_pipeline, random_tokenizer
from fisedit_compiler.runtime.cache import RecordCache

from conftest import close

LATENT = 16
STEPS = 6


def brute_force_otsu(values: torch.Tensor) -> float:
    best, best_eps = -1.0, None
    v = values.double().flatten()
    for eps in torch.unique(v)[1:]:
        a, b = v[v < eps], v[v >= eps]
        score = a.numel() * b.numel() / v.numel() ** 2 * (a.mean() - b.mean()) ** 2
        if score > best:
            best, best_eps = float(score), float(eps)
    return best_eps


@pytest.mark.parametrize("seed", range(5))
def test_otsu_threshold_is_the_brute_force_argmax(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randn(300, generator=g) * 0.1 + 0.2, torch.randn(100, generator=g) * 0.1 + 0.8])
    values = (values * 50).round() / 50  # ties, as in real maps
    assert otsu_threshold(values) == pytest.approx(brute_force_otsu(values))


def test_constant_map_gives_an_empty_mask():
    assert otsu_threshold(torch.full((8, 8), 0.3)) is None
    assert not detect_mask(torch.zeros(1, 8, 8)).any()


@pytest.mark.parametrize("seed", range(3))
def test_mask_detection_finds_a_known_changed_region(seed):
    g = torch.Generator().manual_seed(seed)
    h = w = 32
    region = torch.zeros(h, w, dtype=torch.bool)
    region[8:20, 12:26] = True
    source = [torch.randn(1, 4, h, w, generator=g) for _ in range(10)]
    edited = []
    for i, x in enumerate(source):
        drift = torch.randn(1, 4, h, w, generator=g) * 0.05 + region * (0.3 + 0.1 * i)  # grows inside the region
        edited.append(x + drift)
    mask = detect_mask(difference_map(source, edited, 5, 10))[0, 0]
    iou = (mask & region).sum() / (mask | region).sum()
    assert iou >= 0.9


@functools.lru_cache(maxsize=None)
def tokenizer():
    return random_tokenizer()


def test_token_alignment_identical_prompts():
    alignment = align_tokens(tokenizer(), "a cabin in the woods", "a cabin in the woods")
    assert torch.equal(alignment, torch.arange(tokenizer().model_max_length))


def test_token_alignment_insertion():
    tok = tokenizer()
    src = tok("a cabin in the woods").input_ids
    new = tok("a cabin in the woods with a river").input_ids
    alignment = align_tokens(tok, "a cabin in the woods", "a cabin in the woods with a river")
    words = len(src) - 2
    assert alignment[: 1 + words].tolist() == list(range(1 + words))  # shared words keep their source positions
    assert (alignment[1 + words: len(new) - 1] == -1).all()  # inserted words are new
    assert alignment[len(new) - 1] == len(src) - 1  # end of text aligns with end of text


def test_token_alignment_swap_and_deletion():
    tok = tokenizer()
    swap = align_tokens(tok, "a red cabin in the woods", "a blue cabin in the woods")
    red, blue = tok("a red cabin").input_ids[2], tok("a blue cabin").input_ids[2]
    assert red != blue and swap[2] == -1 and swap[1] == 1 and swap[3] == 3
    deletion = align_tokens(tok, "a cabin in the dark woods", "a cabin in the woods")
    n = len(tok("a cabin in the").input_ids) - 1
    assert deletion[n] == n + 1  # "woods" now sits where "dark" was and maps to its source position


def test_over_long_prompt_is_an_error():
    with pytest.raises(PromptTooLongError, match="tokens long but the text encoder takes at most 77"):
        align_tokens(tokenizer(), "a cabin", "word " * 100)


def session(scheduler="ddim", **policy) -> fisedit.EditSession:
    pipe = random_pipeline("sd2", latent_size=LATENT, seed=0, scheduler=scheduler)
    return fisedit.EditSession(pipe, fisedit.Policy(block_size=2, **policy), num_inference_steps=STEPS)


@torch.no_grad()
def test_control_with_an_identical_prompt_reproduces_the_source_run_exactly():
    s = session()
    prompt = "a cabin in the woods"
    s.generate(prompt, generator=torch.Generator().manual_seed(0))

    def collect(trajectory):
        return lambda pipe, i, t, kwargs: trajectory.append(kwargs["latents"].clone()) or {}

    source, controlled = [], []
    with s.unet.record(attention_maps=STEPS):  # maps of every step, so that every step can run under control
        s._call_pipeline(prompt, collect(source))
    s.unet.begin_run()
    s.unet.mode = ControlMode(s._alignment(prompt, prompt), RecordCache())
    try:
        s._call_pipeline(prompt, collect(controlled))
    finally:
        s.unet.mode = None
    assert len(controlled) == len(source) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(controlled, source))


@torch.no_grad()
def test_an_edit_with_the_same_prompt_returns_the_source_without_sparse_steps():
    s = session()
    source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    result = s.edit("a cabin in the woods")
    assert not result.mask.any()
    assert torch.equal(result.latents, source.latents)
    assert "sparse" not in result.stats


@torch.no_grad()
@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "pndm", "euler"])
def test_session_end_to_end(scheduler):
    s = session(scheduler, mask_dilation=0, halo=0)
    source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    calls = source.stats["dense"].unet_calls
    assert calls >= STEPS and source.mask is None

    first = s.edit("a cabin in the woods with a river")  # detected mask
    second = s.edit("a cabin in the woods with a river at night")  # continuous: builds on `first`
    user_mask = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    user_mask[3:7, 2:9] = True
    third = s.edit("a red cabin in the woods", mask=user_mask)  # given mask, sparse from the first step

    k, _, _ = s.policy.edit_schedule(STEPS)
    for previous, result in [(source, first), (first, second), (second, third)]:
        assert result.mask is not None and result.mask.shape == (LATENT, LATENT)
        outside = ~result.mask
        assert torch.equal(result.latents[..., outside], previous.latents[..., outside])
        phases = [result.stats[p] for p in ("dense", "sparse") if p in result.stats]
        assert sum(p.unet_calls for p in phases) == calls
        assert result.stats["cache_bytes"] > 0
        assert len(result.images) == 1
    assert first.stats["dense"].unet_calls == k and second.stats["dense"].unet_calls == k
    assert "dense" not in third.stats and third.mask[user_mask].all() and not third.mask.all()
    assert third.stats["sparse"].macs < source.stats["dense"].macs


@torch.no_grad()
def test_session_with_a_half_precision_cache():
    exact, narrow = session(mask_dilation=0, halo=0), session(mask_dilation=0, halo=0, cache_dtype="float16")
    mask = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    mask[3:7, 2:9] = True
    results = []
    for s in (exact, narrow):
        source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
        first = s.edit("a cabin in the woods with a river")  # its dense steps go into the fp16 cache too
        edit = s.edit("a red cabin in the woods", mask=mask)
        assert torch.equal(edit.latents[..., ~edit.mask], first.latents[..., ~edit.mask])
        results.append((source, edit))
    (exact_source, exact_edit), (narrow_source, narrow_edit) = results
    assert torch.equal(narrow_source.latents, exact_source.latents)  # recording is exact; only storage narrows
    assert narrow_edit.stats["cache_bytes"] < 0.6 * exact_edit.stats["cache_bytes"]
    assert close(narrow_edit.latents, exact_edit.latents, rtol=5e-2)


def test_stochastic_scheduler_needs_reproducible_noise():
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = random_pipeline("sd2", latent_size=LATENT, seed=0)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="adds random noise.*noise_seed"):
        fisedit.EditSession(pipe)
    fisedit.EditSession(pipe, noise_seed=0)


def test_edit_before_generate_and_bad_user_mask():
    s = session()
    with pytest.raises(RuntimeError, match="call generate"):
        s.edit("a cabin")
    s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"mask has shape \(8, 8\) but the latents are 16x16"):
        s.edit("a red cabin", mask=torch.ones(8, 8, dtype=torch.bool))


@torch.no_grad()
def test_an_edit_whose_region_is_everything_runs_dense_and_records():
    s = session()
    source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    everything = torch.ones(LATENT, LATENT, dtype=torch.bool)
    edit = s.edit("a red cabin in the woods", mask=everything)
    assert edit.mask.all() and "sparse" not in edit.stats
    assert edit.stats["dense"].unet_calls == source.stats["dense"].unet_calls
    # the steps recorded what they computed: a sparse replay of the same prompt reads this edit's activations
    # (not the source's) and so reproduces its latents
    part = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    part[3:7, 2:9] = True
    again = s.edit("a red cabin in the woods", mask=part)
    assert "sparse" in again.stats and not again.mask.all()
    assert close(again.latents, edit.latents, rtol=1e-4)
    assert not close(source.latents, edit.latents, rtol=1e-2)
