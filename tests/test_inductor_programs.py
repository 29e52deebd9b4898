"""Programs compiled by Inductor (`Policy.program_backend="inductor"`) compute what the eager programs compute, up
to float rounding, on the record, control and sparse variants of a tiny SD-2-shaped U-Net and two mask structures.

Inductor takes minutes to compile these programs on a 2-core CPU, so the tests are marked `slow` and left out of
`make test`; `make slow-test` runs them (CI does, after the suite).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fisedit_compiler as fisedit
from conftest import ellipse_mask, tiny_unet, unet_inputs
from fisedit_compiler.runtime.cache import RecordCache
from fisedit_compiler.runtime.run import ControlMode

pytestmark = pytest.mark.slow

SIZE = 16
POLICY = fisedit.Policy(block_size=2, halo=1)


def assert_rounding_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal within float rounding of the output's scale: Inductor fuses and reorders sums (measured: at most
    2.4e-6 of the scale on these calls)."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


def run_variants(compiled: fisedit.CompiledUNet, inputs: dict, new: dict, masks: list[torch.Tensor]) -> dict:
    """What each variant returns: the record call's output (and the tensors it recorded), a control call's (the
    same prompt: every token keeps its own map), and a sparse call's on new inputs per mask."""
    with compiled.record(attention_maps=1):
        out = {"record": compiled(**inputs).sample}
    step = compiled.cache.step(compiled.cache.steps[0])
    out["recorded"] = {ref: value for ref, value in step.items() if isinstance(value, torch.Tensor)}
    tokens = inputs["encoder_hidden_states"].shape[1]
    alignment = torch.arange(tokens).expand(inputs["sample"].shape[0], tokens)
    with compiled.run(ControlMode(alignment, RecordCache())):
        out["control"] = compiled(**new).sample
    for i, mask in enumerate(masks):
        with compiled.sparse(mask):
            out[f"sparse{i}"] = compiled(**new).sample
    return out


@torch.no_grad()
def test_inductor_programs_equal_the_eager_programs_on_every_variant():
    unet = tiny_unet("sd2")
    inputs, new = unet_inputs(unet, size=SIZE, seed=0), unet_inputs(unet, size=SIZE, seed=1)
    # two mask structures: a blob inside, and a strip along the border (windows that reach past the image)
    border = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    border[:3] = True
    masks = [ellipse_mask(SIZE, 0.15), border]
    eager = run_variants(fisedit.compile(unet, POLICY), inputs, new, masks)
    inductor = fisedit.compile(unet, dataclasses.replace(POLICY, program_backend="inductor"))
    compiled = run_variants(inductor, inputs, new, masks)
    assert set(compiled) == set(eager)
    for name in eager:
        if name == "recorded":
            assert compiled[name].keys() == eager[name].keys() and eager[name]
            for ref, value in eager[name].items():
                assert_rounding_close(compiled[name][ref], value)
        else:
            assert_rounding_close(compiled[name], eager[name])
    assert not torch.equal(eager["sparse0"], eager["sparse1"])  # the masks differ where it shows
