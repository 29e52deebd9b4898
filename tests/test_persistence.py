"""Sessions saved and loaded: the loaded session edits exactly as the original would; a session made with other
weights, another scheduler, or a damaged file is refused with an error that names it; no pickle on disk."""

from __future__ import annotations

import functools
import json

import pytest
import torch

import fisedit_compiler as fisedit
from fisedit_compiler.editing.persistence import SessionFileError
from fisedit_compiler.models import make_scheduler, random_pipeline

STEPS = 6


@functools.lru_cache(maxsize=None)
def pipeline():
    """One pipeline for the module: sessions over it share its compiled U-Net and decoder (built once, not per test),
    each with its own cache; a loaded session edits as the original only through what it read from the folder."""
    return random_pipeline("sd2", latent_size=16, seed=0)


def _session(pipe) -> fisedit.EditSession:
    return fisedit.EditSession(pipe, fisedit.Policy(block_size=2), num_inference_steps=STEPS)


@torch.no_grad()
def test_a_loaded_session_edits_bit_for_bit_as_the_saved_one(tmp_path):
    original = _session(pipeline())
    original.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    original.edit("a cabin in the woods with a river")  # continuous: the saved run is an edit
    original.save(tmp_path / "s")
    assert not list((tmp_path / "s").rglob("*.pt")) and not list((tmp_path / "s").rglob("*.pkl"))

    loaded = fisedit.EditSession.load(tmp_path / "s", pipeline())
    assert loaded.cache.steps == original.cache.steps and loaded.cache.nbytes == original.cache.nbytes
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:9, 4:12] = True
    expected = original.edit("a red cabin in the woods", mask=mask)
    got = loaded.edit("a red cabin in the woods", mask=mask)
    assert torch.equal(got.latents, expected.latents)
    detected_a = original.edit("a red cabin in the woods at night")
    detected_b = loaded.edit("a red cabin in the woods at night")
    assert torch.equal(detected_a.latents, detected_b.latents) and torch.equal(detected_a.mask, detected_b.mask)


@torch.no_grad()
def test_a_scheduler_that_calls_twice_at_a_timestep_saves_and_loads_every_call(tmp_path):
    """PNDM calls the U-Net twice at its first timestep (the step key's occurrence tells the calls apart): a saved
    session keeps both records, and the loaded one replays them as the original does."""
    pipe = random_pipeline("sd2", latent_size=16, seed=0, scheduler="pndm")
    original = fisedit.EditSession(pipe, fisedit.Policy(block_size=2), num_inference_steps=4)
    original.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    assert len(original.cache.steps) == 5 and any(key.occurrence == 1 for key in original.cache.steps)
    original.save(tmp_path / "s")

    loaded = fisedit.EditSession.load(tmp_path / "s", pipe)  # its compiled U-Net is shared, its cache is read
    assert loaded.cache.steps == original.cache.steps
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:9, 4:12] = True
    expected = original.edit("a red cabin in the woods", mask=mask)
    assert torch.equal(loaded.edit("a red cabin in the woods", mask=mask).latents, expected.latents)


@torch.no_grad()
def test_mismatches_and_damage_are_refused_by_name(tmp_path):
    s = _session(pipeline())
    s.generate("a cabin", generator=torch.Generator().manual_seed(0))
    folder = s.save(tmp_path / "s")

    other_weights = random_pipeline("sd2", latent_size=16, seed=1)
    with pytest.raises(SessionFileError, match="other U-Net weights"):
        fisedit.EditSession.load(folder, other_weights)
    other_scheduler = random_pipeline("sd2", latent_size=16, seed=0)
    other_scheduler.scheduler = make_scheduler("dpm")
    with pytest.raises(SessionFileError, match="saved with a DDIMScheduler, the pipeline has a DPMSolver"):
        fisedit.EditSession.load(folder, other_scheduler)
    other_size = random_pipeline("sd2", latent_size=8, seed=0)
    with pytest.raises(SessionFileError, match="U-Net config .*sample_size"):
        fisedit.EditSession.load(folder, other_size)

    step = sorted((folder / "steps").iterdir())[0]
    step.write_bytes(step.read_bytes()[:100])
    with pytest.raises(SessionFileError, match=f"{step.name} is damaged"):
        fisedit.EditSession.load(folder, pipeline())
    manifest = json.loads((folder / "session.json").read_text())
    (folder / "session.json").write_text(json.dumps({**manifest, "format": "other/9"}))
    with pytest.raises(SessionFileError, match="expected 'fisedit-session/2'.*another version"):
        fisedit.EditSession.load(folder, pipeline())
    with pytest.raises(SessionFileError, match="not a saved session"):
        fisedit.EditSession.load(tmp_path / "nothing", pipeline())


@torch.no_grad()
def test_a_session_loaded_into_a_budgeted_cache_keeps_within_its_budget(tmp_path):
    """Each step read from a session folder is settled like a recorded one: a cache with a byte budget moves the
    steps beyond it to disk while loading, and edits as the saved session does."""
    from fisedit_compiler.runtime.tiered_store import TieredStore

    unbounded = _session(pipeline())
    unbounded.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    largest = max(sum(kinds.values()) for name, kinds in unbounded.cache.breakdown().items() if name != "total")
    budget = int(1.5 * largest)  # one step fits, two do not
    original = fisedit.EditSession(pipeline(), fisedit.Policy(block_size=2, cache_budget=budget),
                                   num_inference_steps=STEPS)
    original.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    original.save(tmp_path / "s")
    loaded = fisedit.EditSession.load(tmp_path / "s", pipeline())
    store = loaded.cache.store
    assert isinstance(store, TieredStore)
    assert store.resident_nbytes <= budget and store.spilled > 0
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:9, 4:12] = True
    assert torch.equal(loaded.edit("a red cabin in the woods", mask=mask).latents,
                       original.edit("a red cabin in the woods", mask=mask).latents)


@torch.no_grad()
def test_the_policy_is_saved_by_group_and_a_flat_saved_policy_still_loads(tmp_path):
    """New sessions save one dict per policy group; sessions saved before the groups hold the flat dict, and load to
    the same policy. A policy field this version does not know is refused by name."""
    policy = fisedit.Policy(block_size=2, dense_steps=0.3, hold_layout_steps=0.1, cache_budget="unbounded")
    s = fisedit.EditSession(pipeline(), policy, num_inference_steps=STEPS)
    s.generate("a cabin", generator=torch.Generator().manual_seed(0))
    folder = s.save(tmp_path / "s")
    manifest_path = folder / "session.json"
    manifest = json.loads(manifest_path.read_text())
    assert set(manifest["policy"]) == {"sparsity", "edit", "cache", "debug"}
    assert manifest["policy"]["sparsity"]["block_size"] == 2
    assert fisedit.EditSession.load(folder, pipeline()).policy == policy

    flat = {name: getattr(policy, name) for name in (
        "max_sparse_downscale", "halo", "halo_unit", "block_size", "attention", "norm_stats", "dense_steps",
        "detect_from", "detect_to", "mask_dilation", "user_mask_dense_steps", "hold_layout_steps", "inversion_skip",
        "refresh_every", "deep_reuse_interval", "deep_reuse_downscale", "cache_dtype", "cache_dense_steps",
        "dump_dir", "dump_svg", "cache_budget", "cache_dir", "program_backend", "retain_freed_memory")}
    manifest_path.write_text(json.dumps({**manifest, "policy": flat}))  # as sessions saved before the groups
    assert fisedit.EditSession.load(folder, pipeline()).policy == policy

    manifest_path.write_text(json.dumps({**manifest, "policy": {**flat, "a_future_knob": 1}}))
    with pytest.raises(SessionFileError, match="a_future_knob"):
        fisedit.EditSession.load(folder, pipeline())
