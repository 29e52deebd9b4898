"""Bad input gets an error that says what was wrong and what to do."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

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


def _box() -> torch.Tensor:
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[2:5, 9:14] = True
    return mask


@torch.no_grad()
@pytest.mark.parametrize("form", [
    "numpy bool", "numpy 0/1 float", "numpy (B, 1, H, W)", "tensor (1, H, W)", "PIL mode 1", "PIL mode L",
])
def test_numpy_arrays_and_pil_images_are_masks_too(form):
    """The compiled module takes a mask as a bool or 0/1 tensor, NumPy array or PIL image (white: edit), each the
    same as the bool tensor."""
    compiled, _ = recorded()
    mask = _box()
    array = mask.numpy()
    given = {
        "numpy bool": array,
        "numpy 0/1 float": array.astype(np.float32),
        "numpy (B, 1, H, W)": np.stack([array, array])[:, None],
        "tensor (1, H, W)": mask[None].to(torch.float16),
        "PIL mode 1": Image.fromarray(array),
        "PIL mode L": Image.fromarray(array.astype(np.uint8) * 255),
    }[form]
    new_inputs = unet_inputs(compiled.unet, size=16, seed=1)
    with compiled.sparse(mask):
        want, active = compiled(**new_inputs).sample, compiled.active_pixels()
    with compiled.sparse(given):
        got = compiled(**new_inputs).sample
        assert torch.equal(compiled.active_pixels(), active)
    assert torch.equal(got, want)
    assert not active.all()


@pytest.mark.parametrize("mask, message", [
    (torch.full((16, 16), float("nan")), r"bool or hold only 0 and 1, got a tensor of dtype torch.float32 with other "
                                         r"values \(e.g. nan\)"),
    (torch.where(_box(), 0.7, 0.0), r"bool or hold only 0 and 1, got a tensor .* other values \(e.g. 0.7\)"),
    (np.full((16, 16), 0.7), r"got a NumPy array of dtype float64 with other values \(e.g. 0.7\)"),
    (torch.ones(16, 16, dtype=torch.complex64), r"bool or hold only 0 and 1, got a complex tensor"),
    (np.ones((16, 16), dtype=np.complex128), r"got a complex NumPy array \(complex128\)"),
    (np.full((16, 16), "1"), r"got a NumPy array of dtype <U1"),
    (np.ones((1, 16), dtype=bool), r"mask has shape \(1, 16\) but the latents are 16x16 \(batch 2\): pass a "
                                   r"\(16, 16\) mask or a \(2, 1, 16, 16\) one, a bool or 0/1 torch.Tensor, NumPy "
                                   r"array or PIL image"),
    (Image.new("L", (20, 20)), r"mask image is 20x20 pixels, but the latents are 16x16: draw it at 16x16"),
    ([[True]], r"must be a torch.Tensor, a NumPy array or a PIL image \(bool, or 0/1 values\), got list"),
    (None, r"got NoneType"),
])
def test_masks_that_are_not_bool_or_0_1_maps_at_latent_resolution(mask, message):
    compiled, _ = recorded()
    with pytest.raises(fisedit.MaskError, match=message):
        with compiled.sparse(mask):
            pass


def test_mask_error_is_one_class():
    from fisedit_compiler.compiler import MaskError
    from fisedit_compiler.inputs import MaskError as InputsMaskError

    assert MaskError is InputsMaskError is fisedit.MaskError and issubclass(MaskError, ValueError)


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
def test_sparse_call_on_a_step_missing_a_tensor_it_reads():
    """A step recorded by another compiler version (which recorded other tensors) is refused by name, not with a
    bare KeyError from deep inside a call."""
    compiled, inputs = recorded()
    (key,) = compiled.cache.steps
    step = compiled.cache.step(key)
    ref = next(r for r in step if r.kind == "output")
    saved = step.pop(ref)
    try:
        with compiled.sparse(torch.ones(16, 16, dtype=torch.bool)):
            with pytest.raises(fisedit.StepNotRecordedError, match=f"has no .*{ref.key}.*record the source run again"):
                compiled(**inputs)
    finally:
        step[ref] = saved


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
