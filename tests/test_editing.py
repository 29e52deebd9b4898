"""The edit session: Otsu thresholding, mask detection, token alignment, cross-attention control, and end-to-end
sessions with each deterministic scheduler."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import fisedit_compiler as fisedit
from fisedit_compiler.compiler import ControlMode, SparseMode
from fisedit_compiler.editing.mask_detection import detect_mask, difference_map, otsu_threshold
from fisedit_compiler.editing import session as session_module
from fisedit_compiler.editing.session import PhaseStats
from fisedit_compiler.editing.token_alignment import PromptTooLongError, align_tokens, swaps_words_only
from fisedit_compiler.models import random_pipeline, random_tokenizer
from fisedit_compiler.runtime.cache import RecordCache

from conftest import close, unet_inputs

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


@pytest.mark.parametrize("dilation", [1, 2])
def test_a_detected_mask_is_dilated_by_the_given_pixels_and_clipped_at_the_border(dilation):
    diff = torch.zeros(1, 8, 8)
    diff[0, 3, 4] = diff[0, 0, 7] = 1.0  # two changed pixels, one in a corner
    mask = detect_mask(diff, dilation)[0, 0]
    want = torch.zeros(8, 8, dtype=torch.bool)
    d = dilation
    want[3 - d: 4 + d, 4 - d: 5 + d] = True
    want[0: 1 + d, 7 - d:] = True
    assert torch.equal(mask, want)
    assert torch.equal(detect_mask(diff)[0, 0], diff[0] > 0)  # dilation 0: the thresholded map itself


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
    # a swapped word takes its counterpart's map (Prompt-to-Prompt's word swap)
    assert red != blue and swap[2] == 2 and swap[1] == 1 and swap[3] == 3
    longer = align_tokens(tok, "a red cabin in the woods", "a dark blue cabin in the woods")
    assert longer[2] == longer[3] == -1 and longer[4] == 3  # "dark blue" for "red": fresh maps, the rest aligned
    assert swaps_words_only(tok, "a red cabin in the woods", "a blue cabin in the woods")
    assert swaps_words_only(tok, "a red cabin in the woods", "a dark blue cabin in the woods")
    assert not swaps_words_only(tok, "a red cabin in the woods", "a red cabin in the woods")
    assert not swaps_words_only(tok, "a cabin in the woods", "a cabin in the woods with a river")
    assert not swaps_words_only(tok, "a cabin in the dark woods", "a cabin in the woods")
    deletion = align_tokens(tok, "a cabin in the dark woods", "a cabin in the woods")
    n = len(tok("a cabin in the").input_ids) - 1
    assert deletion[n] == n + 1  # "woods" now sits where "dark" was and maps to its source position


def test_over_long_prompt_is_an_error():
    with pytest.raises(PromptTooLongError, match="tokens long but the text encoder takes at most 77"):
        align_tokens(tokenizer(), "a cabin", "word " * 100)


@functools.lru_cache(maxsize=None)
def compiled_pipeline(scheduler: str, policy: fisedit.Policy):
    """A pipeline whose U-Net is compiled with `policy`, shared by the tests so that its graph variants are built
    once (a session's `generate` starts a fresh cache)."""
    pipe = random_pipeline("sd2", latent_size=LATENT, seed=0, scheduler=scheduler)
    pipe.unet = fisedit.compile(pipe.unet, policy)
    return pipe


def session(scheduler="ddim", **policy) -> fisedit.EditSession:
    return fisedit.EditSession(compiled_pipeline(scheduler, fisedit.Policy(block_size=2, **policy)),
                               num_inference_steps=STEPS)


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
    with s.unet.run(ControlMode(s._alignment(prompt, prompt), RecordCache())):  # replays what record() recorded
        s._call_pipeline(prompt, collect(controlled))
    assert len(controlled) == len(source) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(controlled, source))


def _layout_records(cache) -> list[torch.Tensor]:
    """The layout features ("layout" records: the mid block's output) of every step of `cache` that has them."""
    found = []
    for key in cache.steps:
        found += [value for ref, value in cache.store.get(key).items() if ref.kind == "layout"]
    return found


@torch.no_grad()
def test_held_control_calls_take_the_source_layout_and_only_while_held():
    s = session()
    prompt, swapped = "a red cabin in the woods", "a blue cabin in the woods"
    s.generate(prompt, generator=torch.Generator().manual_seed(0))
    with s.unet.record(attention_maps=STEPS):  # maps and layout features of every step
        s._call_pipeline(prompt, lambda *a: {})
    source = _layout_records(s.unet.cache)
    # the mid block: SD 2's deepest level
    assert len(source) == STEPS and source[0].shape[-2:] == (LATENT // 8, LATENT // 8)
    held, free = RecordCache(), RecordCache()
    with s.unet.run(ControlMode(s._alignment(prompt, swapped), held, hold_layout=2)):
        s._call_pipeline(swapped, lambda *a: {})
    with s.unet.run(ControlMode(s._alignment(prompt, swapped), free)):
        s._call_pipeline(swapped, lambda *a: {})
    held, free = _layout_records(held), _layout_records(free)
    assert all(torch.equal(a, b) for a, b in zip(held[:2], source[:2]))  # the held calls: the source's, exactly
    assert not torch.equal(free[0], source[0])  # without holding, the swapped word changes the layout features
    assert not torch.equal(held[2], source[2])  # after the held calls, computed


def test_a_word_swap_holds_the_layout_for_its_first_steps_and_an_insertion_does_not():
    s = session()
    s.generate("a red cabin in the woods", generator=torch.Generator().manual_seed(0))
    modes = []
    original = s.unet.forward

    def spy(*args, **kwargs):
        modes.append(s.unet.mode)
        return original(*args, **kwargs)

    s.unet.forward = spy
    try:
        s.edit("a blue cabin in the woods", keep=False)
        swap_holds = {m.hold_layout for m in modes if isinstance(m, ControlMode)}
        modes.clear()
        s.edit("a red cabin in the woods with a river", keep=False)
        insert_holds = {m.hold_layout for m in modes if isinstance(m, ControlMode)}
        modes.clear()
        corner = torch.zeros(LATENT, LATENT, dtype=torch.bool)
        corner[:4, :4] = True  # a region that leaves something to reuse, so the steps after the held ones are sparse
        s.edit("a blue cabin in the woods", mask=corner, keep=False)
        user_mask_kinds = [type(m).__name__ for m in modes]
    finally:
        del s.unet.forward
    assert swap_holds == {s.policy.hold_layout_schedule(STEPS)} and swap_holds != {0}
    assert insert_holds == {0}
    # a user-mask word swap runs its held steps dense, under control, then sparse
    held = s.policy.hold_layout_schedule(STEPS)
    assert user_mask_kinds == ["ControlMode"] * held + ["SparseMode"] * (STEPS - held)


def test_hold_layout_steps_is_a_fraction_of_the_steps_and_source_runs_record_the_maps_they_read():
    assert fisedit.Policy(hold_layout_steps=0).hold_layout_schedule(20) == 0
    assert fisedit.Policy().hold_layout_schedule(20) == 6
    # more held steps than dense ones: the source run records maps and layout features for the held steps too
    assert fisedit.Policy(dense_steps=0.1, hold_layout_steps=0.2).maps_schedule(20) == 4
    assert fisedit.Policy(dense_steps=0.3, hold_layout_steps=0.1).maps_schedule(20) == 6
    # and for the sparse steps under control
    assert fisedit.Policy(controlled_steps=0.5).maps_schedule(20) == 10
    with pytest.raises(ValueError, match="fraction of the denoising steps"):
        fisedit.Policy(hold_layout_steps=-0.1)


@torch.no_grad()
def test_an_edit_with_the_same_prompt_returns_the_source_without_sparse_steps():
    s = session()
    source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    result = s.edit("a cabin in the woods")
    # control with an identical prompt reproduces the source's first steps, so no latent drifts and the run
    # stops after the dense steps
    assert result.mask is not None and not result.mask.any()
    assert "sparse" not in result.stats
    assert result.stats["dense"].unet_calls == s.policy.edit_schedule(STEPS)[0]
    assert result.images == source.images
    # the source stays the session's current run: an edit now builds on it as on the first one
    again = s.edit("a cabin in the woods with a river")
    first = session()
    first.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.latents, first.edit("a cabin in the woods with a river").latents)


class UNetOutputs:
    """The compiled U-Net's output of every call, per run, while the `with` block lasts."""

    def __init__(self, unet):
        self.unet = unet
        self.runs: list[list[torch.Tensor]] = [[]]

    def __enter__(self) -> UNetOutputs:
        self._handle = self.unet.register_forward_hook(lambda module, args, output: self.runs[-1].append(
            (output[0] if isinstance(output, tuple) else output.sample).clone()))
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()

    def __call__(self, result):
        """Mark the calls made so far as the run of `result`; the next calls belong to a new run."""
        self.runs.append([])
        return result


def assert_outside_region_is_the_previous_run(result, previous_outputs, outputs, k):
    """Every sparse call returned the previous run's output of its step outside the recomputed region: the
    recorded one, which for an edit run is what its own calls returned (dense steps recorded, sparse steps written
    back)."""
    assert len(outputs) == len(previous_outputs)
    outside = ~result.region
    for i, (output, previous) in enumerate(zip(outputs, previous_outputs)):
        if i >= k:
            assert torch.equal(output[..., outside], previous[..., outside]), f"call {i}"
    assert not all(torch.equal(a, b) for a, b in zip(outputs[k:], previous_outputs[k:]))


@torch.no_grad()
@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "pndm", "euler"])
def test_session_end_to_end(scheduler):
    s = session(scheduler, mask_dilation=0, halo=0)
    user_mask = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    user_mask[3:7, 2:9] = True
    with UNetOutputs(s.unet) as outputs:
        source = outputs(s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0)))
        first = outputs(s.edit("a cabin in the woods with a river"))  # detected mask
        second = outputs(s.edit("a cabin in the woods with a river at night"))  # continuous: builds on `first`
        third = outputs(s.edit("a red cabin in the woods", mask=user_mask))  # given mask, sparse from step one
    calls = source.stats["dense"].unet_calls
    assert calls >= STEPS and source.mask is None

    k, _, _ = s.policy.edit_schedule(STEPS)
    runs = [(source, first, k), (first, second, k), (second, third, 0)]
    for n, (previous, result, dense_calls) in enumerate(runs):
        assert result.mask is not None and result.mask.shape == (LATENT, LATENT)
        assert result.region is not None and not result.mask[~result.region].any()
        assert_outside_region_is_the_previous_run(result, outputs.runs[n], outputs.runs[n + 1], dense_calls)
        outside = ~result.mask
        assert torch.equal(result.latents[..., outside], previous.latents[..., outside])
        phases = [result.stats[p] for p in ("dense", "sparse") if p in result.stats]
        assert sum(p.unet_calls for p in phases) == calls
        assert result.stats["cache_bytes"] > 0
        assert len(result.images) == 1
    assert first.stats["dense"].unet_calls == k and second.stats["dense"].unet_calls == k
    assert "dense" not in third.stats and torch.equal(third.mask, user_mask)  # honoured exactly
    for detected in (first, second):  # the detected mask is kept as detected; the halo and blocks grow the region
        assert detected.detected.any() and not detected.detected[~detected.region].any()
        assert torch.equal(detected.mask, detected.region) and detected.region.sum() > detected.detected.sum()
    assert third.detected is None
    assert third.region[user_mask].all() and (third.region & ~user_mask).any()  # rounded up to blocks
    assert third.stats["sparse"].macs < source.stats["dense"].macs


@torch.no_grad()
def test_a_session_dilates_its_detected_mask_by_the_policy_s_mask_dilation():
    """The steps before detection do not depend on `mask_dilation`: the default (1) detects the mask of
    `mask_dilation=0` grown by one latent pixel, strictly larger."""
    detected = {}
    for dilation in (0, 1):
        s = session(mask_dilation=dilation, halo=0)
        s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
        detected[dilation] = s.edit("a cabin in the woods with a river").detected
    grown = torch.nn.functional.max_pool2d(detected[0][None, None].float(), 3, 1, 1)[0, 0] > 0
    assert detected[0].any() and not detected[0].all()
    assert torch.equal(detected[1], grown) and detected[1].sum() > detected[0].sum()


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
    assert close(narrow_edit.latents, exact_edit.latents, rtol=5e-4)  # measured 3.0e-4


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


def box_mask(rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    mask[rows, cols] = True
    return mask



@torch.no_grad()
def test_a_user_mask_is_honoured_exactly():
    """The halo and blocks around a user's mask are recomputed (the U-Net's output changes there) but only the
    mask's own pixels take the edit's latents: outside it the latents are the source's, bit for bit, at every step
    (a generated source, and an edit's with a detected mask before it)."""
    s = session()  # halo 1, blocks of 2
    user_mask = box_mask(slice(5, 9), slice(4, 9))
    with UNetOutputs(s.unet) as outputs:
        outputs(s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0)))
        for prompt in ("a red cabin in the woods", "a red cabin in the woods at night"):
            previous = s.source_trajectory
            result = outputs(s.edit(prompt, mask=user_mask))
            assert torch.equal(result.mask, user_mask)
            ring = result.region & ~user_mask
            assert ring.sum() > user_mask.sum()  # halo and block rounding: most of the recomputed pixels
            for before, after in zip(previous, s.source_trajectory):
                assert torch.equal(after[..., ~user_mask], before[..., ~user_mask])
            assert not torch.equal(s.source_trajectory[-1][..., user_mask], previous[-1][..., user_mask])
            # the ring was computed afresh (its outputs are not the recorded ones), then blended away
            edit_calls, previous_calls = outputs.runs[-2], outputs.runs[-3]
            assert len(edit_calls) == len(previous_calls) == STEPS
            assert not torch.equal(edit_calls[-1][..., ring], previous_calls[-1][..., ring])


@torch.no_grad()
def test_periodic_refresh_runs_every_rth_step_dense_and_records_it():
    """`refresh_every=2`: after the switch, steps 1, 3, 5 of 6 run dense through the record variant (the whole
    U-Net; what they record is read by the next sparse steps), the others sparse; the latents outside the mask
    stay the source's."""
    s = session(refresh_every=2, hold_layout_steps=0.2)  # the maps steps: 1 (at 0.3, 2: step 1 would not refresh)
    user_mask = box_mask(slice(5, 9), slice(4, 9))
    source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    inputs = []
    handle = s.unet.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(
        (args[0].clone(), args[1], kwargs["encoder_hidden_states"].clone())), with_kwargs=True)
    with UNetOutputs(s.unet) as outputs:
        edit = s.edit("a red cabin in the woods", mask=user_mask)
    handle.remove()
    assert edit.stats["dense"].unet_calls == 3 and edit.stats["sparse"].unet_calls == 3
    assert torch.equal(edit.latents[..., ~user_mask], source.latents[..., ~user_mask])
    for step in (1, 3, 5):  # a refresh step is the whole U-Net, and its record is what it returned
        sample, t, text = inputs[step]
        torch.testing.assert_close(outputs.runs[0][step], s.unet.unet(sample, t, encoder_hidden_states=text).sample)
    with pytest.raises(ValueError, match="refresh_every must be None or an int >= 1"):
        fisedit.Policy(refresh_every=0)


@torch.no_grad()
def test_a_user_mask_may_be_a_numpy_array_or_a_pil_image():
    """Every accepted form of a mask edits the same region the same way as the bool tensor."""
    s = session(mask_dilation=0, halo=0)
    box = box_mask(slice(3, 7), slice(2, 9))
    f = s.pipe.vae_scale_factor
    forms = {
        "tensor": box,
        "numpy 0/1 uint8": box.numpy().astype(np.uint8),
        "numpy (1, 1, H, W) bool": box.numpy()[None, None],
        "PIL at image resolution": Image.fromarray(np.kron(box.numpy(), np.ones((f, f), dtype=np.uint8)) * 255),
    }
    results = {}
    for name, mask in forms.items():
        s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
        results[name] = s.edit("a red cabin in the woods", mask=mask)
    want = results["tensor"]
    assert want.mask[box].all() and not want.mask.all()
    for name, got in results.items():
        assert torch.equal(got.mask, want.mask) and torch.equal(got.latents, want.latents), name



@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_the_meter_reads_the_clock_after_cuda_has_finished(monkeypatch, device):
    """On CUDA the session's meter synchronises before reading the clock, so that it times kernels, not launches."""
    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append(f"synchronize {device}"))
    monkeypatch.setattr(session_module.time, "perf_counter", lambda: events.append("clock") or float(len(events)))

    class Model(torch.nn.Module):
        def forward(self, x):
            events.append("call")
            return x * 2

    model = Model()
    model.device = torch.device(device)
    meter = session_module._Meter(model)
    model(torch.ones(3))
    meter.close()
    sync = [f"synchronize {device}"] if device == "cuda" else []
    assert events == [*sync, "clock", "call", *sync, "clock"]


def test_edit_rejects_what_is_not_a_prompt_or_a_mask_before_running():
    s = session()
    with pytest.raises(TypeError, match=r"prompt must be one str \(the text of the image\), got NoneType \(None\)"):
        s.edit(None)
    with pytest.raises(TypeError, match=r"got NoneType"):
        s.generate(None)
    s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    for prompt, given in [(None, "NoneType"), (42, "int"), (["a cabin", "a red cabin"], "list")]:
        with pytest.raises(TypeError, match=f"prompt must be one str .*got {given}"):
            s.edit(prompt, mask=torch.ones(LATENT, LATENT, dtype=torch.bool))
    bad_masks = [
        (torch.full((LATENT, LATENT), float("nan")), r"hold only 0 and 1, got a tensor .* \(e.g. nan\)"),
        (torch.full((LATENT, LATENT), 0.7), r"hold only 0 and 1, got a tensor .* \(e.g. 0.7\)"),  # was thresholded
        (np.full((LATENT, LATENT), 0.7), r"hold only 0 and 1, got a NumPy array of dtype float64"),
        (torch.ones(LATENT, LATENT, dtype=torch.cfloat), r"got a complex tensor"),
        (np.ones((2, 1, LATENT, LATENT), dtype=bool), r"mask has shape \(2, 1, 16, 16\) but the latents are 16x16: "
                                                      r"pass a \(16, 16\) mask"),
        (Image.new("1", (20, 20)), r"mask image is 20x20 pixels, but the latents are 16x16: draw it at 16x16 "
                                   r"\(latent resolution\) or 128x128 \(image resolution\)"),
        ("mask.png", r"must be a torch.Tensor, a NumPy array or a PIL image .*got str"),
    ]
    for mask, message in bad_masks:
        with pytest.raises(fisedit.MaskError, match=message):
            s.edit("a red cabin", mask=mask)

@torch.no_grad()
def test_a_continuous_edit_builds_on_the_activations_the_previous_edit_wrote_back():
    """Edit A with mask M1, then edit B with the same prompt and a mask M2 inside M1: B replays A, since the cache
    holds A's activations (its sparse steps wrote their blocks back). Without write-back B would compute its region
    from the source's activations around it: measured max |B - A| 5.8 then, against 0 with it."""
    s = session()
    s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    a = s.edit("a red cabin in the woods", mask=box_mask(slice(2, 12), slice(2, 12)))
    b = s.edit("a red cabin in the woods", mask=box_mask(slice(5, 8), slice(5, 8)))
    assert b.mask.sum() < a.mask.sum() and "sparse" in b.stats
    assert close(b.latents, a.latents, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("user_mask_dense_steps, dense_steps", [(0.0, 0.2), (0.2, 0.5)])
def test_an_edit_after_a_full_region_edit_detects_its_mask_with_that_edit_s_maps(user_mask_dense_steps,
                                                                                   dense_steps):
    """A full-region edit runs dense and re-records every step; a later edit that detects its mask runs under
    control with the maps of the steps it controls, which the full-region edit must record too (with (0.2, 0.5):
    one step under control, then two recording maps)."""
    s = session(user_mask_dense_steps=user_mask_dense_steps, dense_steps=dense_steps)
    s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    everything = torch.ones(LATENT, LATENT, dtype=torch.bool)
    full = s.edit("a red cabin in the woods", mask=everything)
    assert full.mask.all() and "sparse" not in full.stats
    k = s.policy.maps_schedule(STEPS)
    maps = [{ref for ref in s.cache.step(key) if ref.kind == "attention_map"} for key in s.cache.steps]
    assert all(maps[:k]) and not any(maps[k:])
    # the maps are the red cabin's: an edit back to it under control reproduces the full-region edit's steps
    assert not s.edit("a red cabin in the woods").mask.any()
    detected = s.edit("a red cabin in the woods with a river")  # raised "no recorded cross-attention maps"
    assert detected.mask.any() and sum(phase.unet_calls for phase in detected.stats.values()
                                       if isinstance(phase, PhaseStats)) == STEPS


@torch.no_grad()
def test_a_sparse_edit_with_fewer_dense_steps_than_control_reads_keeps_the_source_maps():
    """A user-mask edit whose dense steps cover only some of the steps a later edit controls keeps the maps of
    the prompt they were recorded with, so that every controlled step injects maps of one prompt."""
    s = session(user_mask_dense_steps=0.2, dense_steps=0.5)
    s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    before = {key: {ref: t for ref, t in s.cache.step(key).items() if ref.kind == "attention_map"}
              for key in s.cache.steps}
    s.edit("a red cabin in the woods", mask=box_mask(slice(3, 7), slice(2, 9)))
    for key, maps in before.items():
        after = {ref: t for ref, t in s.cache.step(key).items() if ref.kind == "attention_map"}
        assert after.keys() == maps.keys() and all(torch.equal(after[ref], maps[ref]) for ref in maps)
    assert s._source.maps_prompt == "a cabin in the woods"


@torch.no_grad()
def test_control_injects_the_source_maps_of_shared_tokens():
    """Under control, every cross-attention map column of a token both prompts share is the source run's column
    of that token; new tokens keep their fresh columns."""
    s = session()
    s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    source_steps = {key: s.cache.step(key) for key in s.cache.steps}
    alignment = s._alignment("a cabin in the woods", "a red cabin in the woods")
    pending = RecordCache()
    k = s.policy.edit_schedule(STEPS)[0]

    def stop_after_the_controlled_steps(pipe, i, t, kwargs):
        pipe._interrupt = i == k - 1
        return {}

    with s.unet.run(ControlMode(alignment, pending), cache=s.cache):
        s._call_pipeline("a red cabin in the woods", stop_after_the_controlled_steps)
    controlled = pending.steps
    assert len(controlled) == k
    shared, new = alignment >= 0, alignment < 0
    assert new.any() and shared.any()
    for key in controlled:
        maps = {ref: t for ref, t in pending.step(key).items() if ref.kind == "attention_map"}
        assert maps
        for ref, probs in maps.items():
            source = source_steps[key][ref]
            for b in range(alignment.shape[0]):
                columns = alignment[b][shared[b]]
                assert torch.equal(probs[b][..., shared[b]], source[b][..., columns])
                if new[b].any():
                    assert not torch.equal(probs[b][..., new[b]], source[b][..., new[b]])


@torch.no_grad()
@pytest.mark.parametrize("arch, options", [("sd15", {}), ("sdxl", {}), ("sd2", {"guidance_scale": 1.0}),
                                           ("sd2", {"noise_seed": 3, "scheduler": "euler_ancestral"})])
def test_session_on_other_models_and_settings(arch, options):
    """Each setting keeps the contract in a session: sparse calls return the recorded output outside the region,
    and the latents there stay the source's."""
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = random_pipeline(arch, latent_size=LATENT, seed=0)
    if options.get("scheduler") == "euler_ancestral":
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    s = fisedit.EditSession(pipe, fisedit.Policy(block_size=2), num_inference_steps=STEPS,
                            guidance_scale=options.get("guidance_scale", 7.5), noise_seed=options.get("noise_seed"))
    with UNetOutputs(s.unet) as outputs:
        source = outputs(s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0)))
        edit = outputs(s.edit("a red cabin in the woods", mask=box_mask(slice(3, 7), slice(2, 9))))
    batch = 1 if options.get("guidance_scale", 7.5) <= 1 else 2
    assert all(key.batch == batch for key in s.cache.steps)
    assert_outside_region_is_the_previous_run(edit, outputs.runs[0], outputs.runs[1], 0)
    assert torch.equal(edit.latents[..., ~edit.mask], source.latents[..., ~edit.mask])
    assert not torch.equal(edit.latents[..., edit.mask], source.latents[..., edit.mask])
    detected = s.edit("a red cabin in the woods at night")  # control, detection and sparse steps on this model
    assert detected.mask is not None
    assert torch.equal(detected.latents[..., ~detected.mask], edit.latents[..., ~detected.mask])


@torch.no_grad()
def test_session_macs_are_every_call_s_macs():
    """The meter counts MACs on the first call of each kind and reuses them: the totals must equal counting every
    call (a record call's MACs do not depend on whether it saves attention maps)."""
    from fisedit_compiler.macs import flop_counter

    s = session()
    calls = []
    handle = s.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append((args, kwargs)),
                                              with_kwargs=True)
    try:
        source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    total = 0
    for args, kwargs in calls:
        with flop_counter.FlopCounterMode(display=False) as counter:
            s.unet.unet(*args, **kwargs)
        total += counter.get_total_flops() // 2
    assert len(calls) == STEPS and source.stats["dense"].unet_calls == STEPS
    assert source.stats["dense"].macs == total
    assert source.stats["dense"].seconds > 0


@torch.no_grad()
def test_the_meter_counts_each_kind_of_call_once_per_session(monkeypatch):
    """MAC counting slows the call it watches, so a session counts each kind of call (variant, mask, input shapes)
    once: a second edit with the same mask runs no counter and reports the same MACs; another mask is counted
    anew."""
    s = session()
    s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    counters = []
    real = session_module.MacCounter
    monkeypatch.setattr(session_module, "MacCounter", lambda: counters.append(real()) or counters[-1])
    mask = box_mask(slice(3, 7), slice(2, 9))
    first = s.edit("a red cabin in the woods", mask=mask, keep=False)
    counted = len(counters)
    second = s.edit("a red cabin in the woods", mask=mask, keep=False)
    assert counted >= 1 and len(counters) == counted  # counted by the first edit only
    assert second.stats["sparse"].macs == first.stats["sparse"].macs > 0
    s.edit("a red cabin in the woods", mask=box_mask(slice(0, 8), slice(0, 16)), keep=False)
    assert len(counters) == counted + 1  # the sparse calls of another mask


@torch.no_grad()
def test_runs_are_owned_not_shared_state():
    """A run belongs to the thread that entered it: runs do not nest, another thread's calls meanwhile are eager
    (no mode leaks across threads), two sessions on one compiled U-Net keep their own caches, and a cache in use
    by a run is refused to a second one."""
    import threading

    s = session()
    s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    other = fisedit.EditSession(s.pipe, num_inference_steps=STEPS)  # the same compiled U-Net, its own cache
    assert other.unet is s.unet and other.cache is not s.cache and len(other.cache) == 0
    unet = s.unet
    inputs = unet_inputs(unet.unet, size=LATENT)
    eager = unet.unet(**inputs).sample
    seen: dict = {}
    recorded_before = unet.cache.steps

    def in_another_thread():
        seen["mode"], seen["out"] = unet.mode, unet(**inputs).sample
        try:
            with unet.run(None, cache=unet.cache):
                pass
        except RuntimeError as e:
            seen["error"] = str(e)

    with unet.record():
        with pytest.raises(RuntimeError, match="do not nest"):
            with unet.run(None, cache=other.cache):
                pass
        thread = threading.Thread(target=in_another_thread)
        thread.start()
        thread.join()
    assert seen["mode"] is None and torch.equal(seen["out"], eager)
    assert unet.cache.steps == recorded_before  # the other thread's call recorded nothing
    assert "in use by another run" in seen["error"]
    assert len(s.cache) == STEPS


@torch.no_grad()
def test_memory_breakdown_by_kind():
    """The session reports its bytes by kind; self-attention K/V are recorded as their own kind (and still written
    back: the write-back test above covers their values), and the kinds add up to the cache's bytes."""
    s = session()
    s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    totals = s.memory_breakdown()
    per_step = s.cache.breakdown()
    assert set(totals) == {"output", "attention_kv", "group_norm_stats", "attention_map", "layout", "latents", "decode"}
    assert sum(v for k, v in totals.items() if k not in ("latents", "decode")) == s.cache.nbytes
    assert totals["decode"] == s.decoding.cache.nbytes > 0  # the source image's decode, recorded
    assert totals["latents"] == STEPS * s.current.latents.numel() * 4
    assert len(per_step) == STEPS + 1 and all(v["attention_kv"] > 0 for k, v in per_step.items() if k != "total")


@pytest.mark.slow  # two sessions, four edits: fifteen seconds
@torch.no_grad()
def test_a_cache_without_the_dense_steps_activations_edits_as_one_with_them():
    """`Policy(cache_dense_steps=False)`: the first `dense_steps` steps keep their cross-attention maps only (a
    detected edit runs them dense; a user-mask edit then does too), which the cache's bytes show; the edits are
    bit-identical to those of a full cache with the same schedule, and a sparse call at such a step says why it
    cannot run."""
    results = {}
    for keep in (True, False):
        s = session(dense_steps=0.5, user_mask_dense_steps=0.5 if keep else 0.0, cache_dense_steps=keep)
        source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
        k = s.policy.edit_schedule(STEPS)[0]
        stored = [s.cache.step(key).maps_only for key in s.cache.steps]
        assert stored == [not keep] * k + [False] * (STEPS - k)
        detected = s.edit("a cabin in the woods with a river")
        assert [s.cache.step(key).maps_only for key in s.cache.steps] == stored  # the edit's dense steps too
        user = s.edit("a red cabin in the woods", mask=box_mask(slice(3, 7), slice(2, 9)))
        assert user.stats["dense"].unet_calls == k
        results[keep] = (source, detected, user, s)
    for a, b in zip(results[True][:3], results[False][:3]):
        assert torch.equal(a.latents, b.latents)
    assert results[False][0].stats["cache_bytes"] < 0.75 * results[True][0].stats["cache_bytes"]
    s = results[False][3]
    with s.unet.run(SparseMode(box_mask(slice(3, 7), slice(2, 9))), cache=s.cache):
        with pytest.raises(KeyError, match="recorded without its activations.*cache_dense_steps"):
            s.pipe("a red cabin", latents=s._latents.clone(), num_inference_steps=STEPS, output_type="latent")


@torch.no_grad()
def test_an_edit_that_is_not_kept_leaves_the_session_as_it_was():
    """`edit(..., keep=False)` twice gives the same picture, the current image stays the source, and a kept edit
    afterwards equals the same edit in a session that never tried: nothing of the tries (write-back into the
    cache, the dense steps' records, the decode) is left behind."""
    first, second = torch.zeros(LATENT, LATENT, dtype=torch.bool), torch.zeros(LATENT, LATENT, dtype=torch.bool)
    first[2:10, 2:10] = True
    second[6:14, 5:13] = True  # overlaps the first try's region: a write-back there would change this edit
    s = session()
    source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    tries = [s.edit("a red cabin in the woods", mask=first, keep=False),
             s.edit("a red cabin in the woods", mask=first, keep=False),
             s.edit("a cabin in the snowy woods", keep=False)]  # detected: dense steps under control too
    assert torch.equal(tries[0].latents, tries[1].latents) and tries[0].images == tries[1].images
    assert s.current is source
    kept = s.edit("a blue cabin in the woods", mask=second)
    fresh = session()
    fresh.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    expected = fresh.edit("a blue cabin in the woods", mask=second)
    assert torch.equal(kept.latents, expected.latents) and kept.images == expected.images
    with pytest.raises(ValueError, match="cannot refresh"):
        session(refresh_every=2).edit("a red cabin", mask=first, keep=False)


@torch.no_grad()
def test_controlled_steps_keep_the_sparse_steps_under_control():
    """With `Policy.controlled_steps` the source run records the maps of that many steps and an edit's sparse
    steps below it take them at their active pixels: their U-Net outputs differ from an uncontrolled edit's from
    the first sparse step on, while the latents outside the mask stay the source's. The edit keeps the source's
    maps (its sparse steps record none), so the next edit runs under control over the same maps."""
    mask = box_mask(slice(3, 7), slice(2, 9))
    outputs = {}
    for controlled in (0.0, 1.0):
        s = session(controlled_steps=controlled)
        source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
        maps = [any(ref.kind == "attention_map" for ref in s.cache.step(key)) for key in s.cache.steps]
        assert sum(maps) == s.policy.maps_schedule(STEPS) == (STEPS if controlled else 2)
        with UNetOutputs(s.unet) as recorded:
            edit = s.edit("a red cabin in the woods", mask=mask)
        assert "dense" not in edit.stats and edit.stats["sparse"].unet_calls == STEPS  # sparse from the first step
        assert torch.equal(edit.latents[..., ~mask], source.latents[..., ~mask])
        outputs[controlled] = recorded.runs[0]
        if controlled:
            assert s._source.maps_prompt == "a cabin in the woods"
            again = s.edit("a red cabin in the woods with a river")  # controlled over the first source's maps
            assert again.mask is not None
    assert not any(torch.equal(a, b) for a, b in zip(outputs[0.0], outputs[1.0]))


@torch.no_grad()
def test_prepared_edits_bind_no_program_and_change_nothing(monkeypatch):
    """`prepare_edits` binds the control programs and the sparse programs of a centred disk's plan structure for
    the U-Net and the decoder: an edit over a mask of that structure then binds none, and its result is the one
    of a session that did not prepare, bit for bit."""
    from fisedit_compiler.runtime import executor

    from fisedit_compiler.editing.masks import centred_disk

    disk = centred_disk((LATENT, LATENT), 0.15)  # what prepare_edits prepares for
    results, binds = [], []
    for prepare in (False, True):
        pipe = random_pipeline("sd2", latent_size=LATENT, seed=0, scheduler="ddim")  # (its own programs)
        pipe.unet = fisedit.compile(pipe.unet, fisedit.Policy(block_size=2))
        s = fisedit.EditSession(pipe, num_inference_steps=STEPS)
        s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
        if prepare:
            s.prepare_edits()
        with monkeypatch.context() as patch:
            original = executor.bind
            patch.setattr(executor, "bind", lambda *args, **kw: binds.append(prepare) or original(*args, **kw))
            results.append(s.edit("a red cabin in the woods", mask=disk))
    assert binds.count(False) >= 2 and binds.count(True) == 0  # (unprepared: the U-Net's and the decoder's)
    assert torch.equal(results[0].latents, results[1].latents) and results[0].images == results[1].images
    with pytest.raises(RuntimeError, match="no image yet"):
        session().prepare_edits()
