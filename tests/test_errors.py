"""Bad input gets an error that says what was wrong and what to do."""

from __future__ import annotations

import functools

import pytest
import torch

import fisedit_compiler as fisedit
from conftest import tiny_unet, unet_inputs


@functools.lru_cache(maxsize=None)
def recorded():
    unet = tiny_unet("sd2")
    compiled = fisedit.compile(unet, fisedit.Policy(block_size=4))
    inputs = unet_inputs(unet, size=16)
    with torch.no_grad(), compiled.record():
        compiled(**inputs)
    return compiled, inputs


def test_mask_of_the_wrong_shape():
    compiled, _ = recorded()
    with pytest.raises(fisedit.MaskError, match=r"mask has shape \(64, 64\) but the latents are 16x16"):
        with compiled.sparse(torch.ones(64, 64, dtype=torch.bool)):
            pass
    with pytest.raises(fisedit.MaskError, match=r"\(3, 1, 16, 16\)"):
        with compiled.sparse(torch.ones(3, 1, 16, 16, dtype=torch.bool)):
            pass


def test_mask_of_the_wrong_dtype_or_values():
    compiled, _ = recorded()
    with pytest.raises(fisedit.MaskError, match="bool or hold only 0 and 1"):
        with compiled.sparse(torch.full((16, 16), 0.5)):
            pass
    with pytest.raises(fisedit.MaskError, match="must be a torch.Tensor"):
        with compiled.sparse([[True]]):
            pass

@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8, torch.int64])
def test_a_0_1_mask_of_another_dtype_is_the_bool_mask(dtype):
    compiled, inputs = recorded()
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[2:5, 9:14] = True
    new_inputs = unet_inputs(compiled.unet, size=16, seed=1)
    with compiled.sparse(mask):
        want, active = compiled(**new_inputs).sample, compiled.active_pixels()
    with compiled.sparse(mask.to(dtype)):
        got = compiled(**new_inputs).sample
        assert torch.equal(compiled.active_pixels(), active)
    assert torch.equal(got, want)
    assert not active.all()


def test_sparse_before_any_record():
    compiled = fisedit.compile(tiny_unet("sd2"))
    with pytest.raises(RuntimeError, match=r"nothing is recorded.*with unet.record\(\)"):
        with compiled.sparse(torch.ones(16, 16, dtype=torch.bool)):
            pass


@torch.no_grad()
def test_sparse_call_at_a_timestep_never_recorded():
    compiled, inputs = recorded()
    with compiled.sparse(torch.ones(16, 16, dtype=torch.bool)):
        with pytest.raises(fisedit.StepNotRecordedError, match=r"timestep 321 \(batch 2\) was never recorded.*500"):
            compiled(**{**inputs, "timestep": torch.tensor(321)})


@torch.no_grad()
def test_sparse_call_with_another_batch_or_latent_size():
    compiled, inputs = recorded()
    with compiled.sparse(torch.ones(16, 16, dtype=torch.bool)):
        other = unet_inputs(tiny_unet("sd2"), batch=1, size=16)
        with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 16, 16\).*recorded with \(2, 4, 16, 16\)"):
            compiled(**other)


def test_record_and_sparse_do_not_nest():
    compiled, _ = recorded()
    with compiled.record():
        with pytest.raises(RuntimeError, match="do not nest"):
            with compiled.sparse(torch.ones(16, 16, dtype=torch.bool)):
                pass


def test_invalid_policy():
    with pytest.raises(ValueError, match="attention must be"):
        fisedit.Policy(attention="sparse")
    with pytest.raises(ValueError, match="block_size"):
        fisedit.Policy(block_size=0)
    with pytest.raises(ValueError, match="cache_dtype must be"):
        fisedit.Policy(cache_dtype="fp8")
