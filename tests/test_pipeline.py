"""A diffusers pipeline runs unchanged with the compiled U-Net swapped in: a record run, then sparse runs."""

from __future__ import annotations

import pytest
import torch

import fisedit_compiler as fisedit
from conftest import close, ellipse_mask, run_pipeline
from sparse_reference import active_region
from fisedit_compiler.models import random_pipeline

LATENT = 16


def run(pipe, prompt, latents):
    return run_pipeline(pipe, prompt, latents, steps=4)


@torch.no_grad()
def test_stable_diffusion_pipeline_records_and_replays_sparsely():
    pipe = random_pipeline("sd2", latent_size=LATENT, seed=0)
    compiled = fisedit.compile(pipe.unet, fisedit.Policy(block_size=4))
    pipe.unet = compiled
    latents = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    with compiled.record():
        source = run(pipe, "a cabin in the woods", latents)
    assert len(compiled.cache.steps) == 4 and all(k.batch == 2 for k in compiled.cache.steps)  # CFG batch
    mask = ellipse_mask(LATENT, 0.15)
    with compiled.sparse(mask):
        replay = run(pipe, "a cabin in the woods", latents)
        edited = run(pipe, "a cabin in the woods with a river", latents)
        active = compiled.active_pixels()
    assert (replay - source).abs().max() <= 1e-4
    assert torch.isfinite(edited).all()
    # every step's output outside the active blocks is the recorded one, so the latents there never change
    assert torch.equal(active, active_region(mask, (LATENT, LATENT), halo=1, block=4, halo_unit="latent_pixels"))
    assert torch.equal(edited[..., ~active], source[..., ~active])
    assert (edited[..., active] - source[..., active]).abs().max() > 1e-3
    dense = run(pipe.__class__(**{**pipe.components, "unet": compiled.unet}), "a cabin in the woods", latents)
    torch.testing.assert_close(source, dense, rtol=1e-4, atol=1e-4)  # linear layers in oneDNN: float rounding


@torch.no_grad()
@pytest.mark.parametrize("scheduler", ["pndm", "heun"])
def test_replays_of_schedulers_that_call_twice_at_one_timestep(scheduler):
    """PNDM and Heun call the U-Net twice at some timesteps, with different latents: a sparse replay of the same
    prompt must read the record of the matching call (the step key's occurrence) to give back the source run."""
    from diffusers import HeunDiscreteScheduler

    pipe = random_pipeline("sd2", latent_size=LATENT, seed=0, scheduler="pndm")
    if scheduler == "heun":
        pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    compiled = fisedit.compile(pipe.unet, fisedit.Policy(block_size=4))
    pipe.unet = compiled
    latents = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    with compiled.record():
        source = run(pipe, "a cabin in the woods", latents)
    assert any(key.occurrence == 1 for key in compiled.cache.steps)
    with compiled.sparse(ellipse_mask(LATENT, 0.15)):
        replay = run(pipe, "a cabin in the woods", latents)
    assert close(replay, source, rtol=1e-5)
