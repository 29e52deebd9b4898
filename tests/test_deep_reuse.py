"""Temporal reuse stacked on the spatial one (`Policy.deep_reuse_interval`, `passes.reuse_deep_levels`): of every N
sparse calls the first computes every level, the others take the deep levels' outputs from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fisedit_compiler as fisedit
from conftest import close, ellipse_mask, tiny_unet, unet_inputs
from fisedit_compiler.ir import LAYOUT
from fisedit_compiler.ir import ops as ir_ops
from fisedit_compiler.macs import count_macs
from fisedit_compiler.models import random_pipeline

SIZE = 32


def _compiled(arch: str, interval: int = 2, **policy) -> fisedit.CompiledUNet:
    return fisedit.compile(tiny_unet(arch), fisedit.Policy(block_size=2, deep_reuse_interval=interval, **policy))


@torch.no_grad()
def test_a_reuse_call_computes_only_the_fine_levels_and_on_the_recorded_input_returns_the_recorded_output(arch):
    """The reuse variant keeps no op below the latents' resolution but the reused values and what reads them; on the
    recorded input its deep values are the recorded ones, so full and reuse calls both give the recorded output
    back (exactness contract 2), bit for bit outside the active blocks (contract 3), for fewer MACs."""
    unet = _compiled(arch)
    inputs = unet_inputs(unet.unet, size=SIZE)
    with unet.record():
        recorded = unet(**inputs).sample
    variants = unet.variants(unet.adapter.bind((), inputs)[0])
    deep = [n for n in variants.reuse.graph.nodes
            if n.meta.get(LAYOUT) is not None and n.meta[LAYOUT].res != (SIZE, SIZE)]
    assert deep and all(n.target is ir_ops.reused or n.args[0].target is ir_ops.reused for n in deep)
    with unet.sparse(ellipse_mask(SIZE, 0.15)):
        full_macs, full = count_macs(lambda: unet(**inputs).sample)
        reuse_macs, reused = count_macs(lambda: unet(**inputs).sample)
        outside = ~unet.active_pixels()
    for output in (full, reused):
        assert close(output, recorded)
        assert torch.equal(output[..., outside], recorded[..., outside])
    assert reuse_macs < 0.55 * full_macs  # measured 0.52 (SD 1.5, SD 2), 0.27 (SDXL): every level of a full call sparse


@torch.no_grad()
def test_reuse_calls_take_the_deep_levels_of_the_last_full_call():
    """Interval 3: calls 1 and 4 are full, 2 and 3 reuse call 1's deep outputs. A reuse call on new latents differs
    from a full call on them (its deep features are call 1's), and equals it when call 1 saw the same latents;
    call 4 computes everything afresh."""
    unet = _compiled("sd2", interval=3)
    a, b = (unet_inputs(unet.unet, size=SIZE, seed=seed) for seed in (0, 1))
    mask = ellipse_mask(SIZE, 0.3)
    with unet.record():
        unet(**a)
    with unet.sparse(mask):
        fresh_b = [unet(**b).sample for _ in range(2)]  # full, then reuse of b's own deep values
    assert close(fresh_b[1], fresh_b[0])
    with unet.sparse(mask):
        calls = [unet(**x).sample for x in (a, b, b, b)]
        assert unet.current_run.state.calls == 4
    assert not close(calls[1], fresh_b[0], rtol=1e-3)  # deep features of a, not of b
    assert torch.equal(calls[1], calls[2])
    assert close(calls[3], fresh_b[0])


@pytest.mark.slow  # three sessions of a tiny pipeline: fifteen seconds
@torch.no_grad()
def test_an_edit_session_with_deep_reuse_keeps_the_source_outside_its_mask_for_fewer_macs():
    pipe = random_pipeline("sd2", latent_size=16, seed=0, scheduler="ddim")
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:9, 4:10] = True
    results = {}
    for interval in (1, 2):
        s = fisedit.EditSession(pipe, fisedit.Policy(block_size=2, deep_reuse_interval=interval),
                                num_inference_steps=6, sparse_decode=False)
        source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
        results[interval] = s.edit("a red cabin in the woods", mask=mask)
        latents = results[interval].latents
        assert torch.equal(latents[..., ~mask], source.latents[..., ~mask])
    assert results[2].stats["sparse"].macs < 0.7 * results[1].stats["sparse"].macs  # measured 0.68
    edited = [np.asarray(results[i].images[0], dtype=float) for i in (1, 2)]
    assert np.abs(edited[0] - edited[1]).max() > 0  # an approximation, not the same computation


def test_bad_reuse_settings_are_refused():
    with pytest.raises(ValueError, match="deep_reuse_interval must be an int >= 1"):
        fisedit.Policy(deep_reuse_interval=0)
    with pytest.raises(ValueError, match="deep_reuse_downscale must be >= 2"):
        fisedit.Policy(deep_reuse_downscale=1)
    unet = _compiled("sd2", deep_reuse_downscale=64)
    inputs = unet_inputs(unet.unet, size=SIZE)
    with pytest.raises(ValueError, match="no level of this model is 64 or more times smaller"):
        with unet.record():
            unet(**inputs)
