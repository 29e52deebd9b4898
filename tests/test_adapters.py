"""Model adapters: what a model family declares, what `compile` refuses, and inputs with pixels besides the latents
(ControlNet residuals) going through the same passes as the latents."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import fisedit_compiler as fisedit
from conftest import backend_matches_compile, close, tiny_unet, unet_inputs
from fisedit_compiler.capture import capture
from fisedit_compiler.ir import LAYOUT, SpatialLayout, latent_input
from fisedit_compiler.models import random_pipeline
from fisedit_compiler.models.controlnet import controlnet_pipeline, random_controlnet
from fisedit_compiler.passes.annotate_spatial_layout import annotate_spatial_layout
from sparse_reference import active_region, block_size, reference_sparse_call

SIZE = 32
RESIDUALS = ("down_block_additional_residuals", "mid_block_additional_residual")
POLICY = fisedit.Policy(block_size=4)
CONDITIONING = (8, 8, 8, 8)  # the tiny ControlNets' conditioning embedding widths


def _model_without_adapter():
    from diffusers import UNet2DModel  # an unconditional U-Net: a family no adapter declares

    return UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def test_compile_refuses_a_model_family_without_an_adapter_by_name():
    model = _model_without_adapter()
    with pytest.raises(fisedit.UnsupportedModelError, match="no adapter for UNet2DModel"):
        fisedit.compile(model)
    with pytest.raises(fisedit.UnsupportedModelError, match="no adapter for UNet2DModel"):
        with fisedit.record(torch.compile(model, backend="fisedit")):
            pass


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, sample, timestep, depth=None, return_dict=True):
        out = self.conv(sample)
        return (out if depth is None else out + depth,)


class _NeedsDepth(_ConvNet):
    def forward(self, sample, timestep, depth, return_dict=True):
        return (self.conv(sample) + depth,)


def test_inputs_the_adapter_does_not_declare_are_refused_by_name():
    with pytest.raises(fisedit.UnsupportedModelError, match="requires input 'depth'"):
        fisedit.compile(_NeedsDepth(), adapter=fisedit.UNet2DConditionAdapter)
    compiled = fisedit.compile(_ConvNet(), adapter=fisedit.UNet2DConditionAdapter)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor(3)
    with torch.no_grad(), compiled.record():
        assert torch.equal(compiled(x, t, return_dict=False)[0], compiled.unet(x, t)[0])  # an optional one left out
        with pytest.raises(fisedit.UnsupportedModelError, match="input 'depth', which UNet2DConditionAdapter"):
            compiled(x, t, depth=torch.zeros(1, 4, 8, 8))


def test_annotate_spatial_layout_starts_at_every_input_with_pixels():
    """A hand-built module with a pixel-map input at half resolution besides the latents."""

    class TwoScales(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)

        def forward(self, sample, timestep, mid_block_additional_residual, return_dict=False):
            return (self.down(sample) * timestep + mid_block_additional_residual,)

    model = TwoScales()
    inputs = {"sample": torch.randn(1, 4, 8, 8), "timestep": torch.tensor(2.0),
              "mid_block_additional_residual": torch.randn(1, 4, 4, 4)}
    gm = capture(fisedit.UNet2DConditionAdapter(model), inputs)
    annotate_spatial_layout(gm)
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    assert latent_input(gm) is placeholders["inputs_sample"]
    assert placeholders["inputs_mid_block_additional_residual"].meta[LAYOUT] == SpatialLayout(
        "map", (4, 4), (2, 3), (1, 4, 4, 4))
    assert placeholders["inputs_timestep"].meta[LAYOUT] is None
    add = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.add.Tensor)
    assert add.meta[LAYOUT].res == (4, 4)


@functools.lru_cache(maxsize=None)
def _controlnet(arch: str):
    unet = tiny_unet(arch)
    return unet, random_controlnet(unet, conditioning_embedding_out_channels=CONDITIONING)


def _control_image(seed: int = 4):
    """A seeded noise picture at image resolution: the control image of the session tests."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(8 * SIZE, 8 * SIZE, 3, generator=g) * 255).to(torch.uint8).numpy())


def _fresh_inside(new: dict, old: dict, mask: torch.Tensor, policy: fisedit.Policy) -> dict:
    """`new` with residuals that equal `old`'s outside each resolution's active blocks. A sparse call reads a
    pixel input at the halo of a region too, where the masked-dense reference reads the recorded layer output; the
    two agree when the input is unchanged there (as for the latents, whose halo only the first conv reads)."""
    def blend(r_new, r_old):
        res = tuple(r_new.shape[-2:])
        if min(res) < min(mask.shape) // policy.max_sparse_downscale:
            return r_new  # dense resolution: computed in full
        region = active_region(mask, res, policy.halo, block_size(policy, res), policy.halo_unit)
        return torch.where(region, r_new, r_old)

    return {**new, "down_block_additional_residuals": tuple(
        blend(a, b) for a, b in zip(new["down_block_additional_residuals"], old["down_block_additional_residuals"])),
        "mid_block_additional_residual": blend(new["mid_block_additional_residual"],
                                               old["mid_block_additional_residual"])}


def _with_residuals(controlnet, inputs: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    cond = torch.rand(inputs["sample"].shape[0], 3, SIZE * 8, SIZE * 8, generator=g)
    with torch.no_grad():
        down, mid = controlnet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                               controlnet_cond=cond, return_dict=False)
    return {**inputs, "down_block_additional_residuals": tuple(down), "mid_block_additional_residual": mid}


@torch.no_grad()
def test_controlnet_residuals_are_pixel_inputs_of_sparse_calls():
    """ControlNet residuals are gathered where a sparse region reads them: record equals eager, a full mask with
    fresh statistics equals the dense call, and a sparse call with new residuals equals the masked-dense reference
    (before, they were repeated like per-batch vectors and the call failed with a shape error)."""
    unet, controlnet = _controlnet("sd2")
    inputs = _with_residuals(controlnet, unet_inputs(unet, size=SIZE), seed=0)
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[4:12, 18:27] = True
    new_inputs = _with_residuals(controlnet, unet_inputs(unet, size=SIZE, seed=1), seed=1)
    new_inputs = _fresh_inside(new_inputs, inputs, mask, POLICY)
    compiled = fisedit.compile(unet, POLICY)
    with compiled.record():
        recorded = compiled(**inputs).sample
    assert close(recorded, unet(**inputs).sample)
    with compiled.sparse(mask):
        output = compiled(**new_inputs).sample
    reference = reference_sparse_call(unet, inputs, new_inputs, mask, POLICY)
    assert close(output, reference)
    # the residuals' fresh values reach the output: with the recorded ones it differs inside the region
    without = reference_sparse_call(unet, inputs, {**new_inputs, **{k: inputs[k] for k in RESIDUALS}}, mask, POLICY)
    assert (without - reference).abs().max() > 1e-2

    fresh = fisedit.compile(unet, fisedit.Policy(block_size=4, norm_stats="fresh"))
    with fresh.record():
        fresh(**inputs)
    with fresh.sparse(torch.ones(SIZE, SIZE, dtype=torch.bool)):
        assert close(fresh(**new_inputs).sample, unet(**new_inputs).sample)


@pytest.mark.slow  # dynamo traces a U-Net with ControlNet residuals: fifteen seconds
@torch.no_grad()
def test_backend_finds_residuals_among_the_graph_inputs():
    """torch.compile(backend="fisedit"): the graph inputs that are the call's residual tensors get their layouts,
    so record and sparse calls equal `fisedit.compile`'s."""
    unet, controlnet = _controlnet("sd2")
    inputs = _with_residuals(controlnet, unet_inputs(unet, size=SIZE), seed=0)
    new_inputs = _with_residuals(controlnet, unet_inputs(unet, size=SIZE, seed=1), seed=1)
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[4:12, 18:27] = True
    backend_matches_compile(unet, inputs, new_inputs, mask, POLICY)


def _controlnet_inputs(unet, seed: int) -> dict:
    inputs = unet_inputs(unet, size=SIZE, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    return {"sample": inputs["sample"], "timestep": inputs["timestep"],
            "encoder_hidden_states": inputs["encoder_hidden_states"],
            "controlnet_cond": torch.rand(inputs["sample"].shape[0], 3, SIZE * 8, SIZE * 8, generator=g)}


def _residuals(output) -> list[torch.Tensor]:
    down, mid = output
    return [*down, mid]


@torch.no_grad()
def test_a_compiled_controlnet_keeps_the_contract_for_every_residual():
    """`fisedit.compile(controlnet)` (the ControlNet adapter: the latents and the control image, a map at 8x the
    latents' resolution, carry pixels): record equals eager; a sparse call on the recorded inputs returns the recorded
    residuals; a full mask with fresh statistics equals the dense call; with new inputs (latents and control image),
    every residual is the recorded one outside the active blocks of its resolution and fresh inside; and the MACs
    fall with the mask."""
    from fisedit_compiler.macs import count_macs
    from fisedit_compiler.runtime.mask_plan import MaskPlan

    unet, controlnet = _controlnet("sd2")
    inputs, new = _controlnet_inputs(unet, 0), _controlnet_inputs(unet, 1)
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[4:12, 18:27] = True
    compiled = fisedit.compile(controlnet, POLICY)
    with compiled.record():
        recorded = _residuals(compiled(**inputs, return_dict=False))
        record_macs, _ = count_macs(compiled, **inputs)
    assert all(close(r, e) for r, e in zip(recorded, _residuals(controlnet(**inputs, return_dict=False))))
    assert type(compiled(**inputs)) is type(controlnet(**inputs))  # outside a run: the ControlNet's own output
    with compiled.sparse(mask):
        assert all(close(s, r) for s, r in zip(_residuals(compiled(**inputs, return_dict=False)), recorded))
        edited = _residuals(compiled(**new, return_dict=False))
        sparse_macs, _ = count_macs(compiled, **new)
    plan = MaskPlan(mask, POLICY)
    for e, r in zip(edited, recorded):
        res = tuple(r.shape[-2:])
        if POLICY.is_sparse_resolution(res, (SIZE, SIZE)):
            active = plan.active_pixels(res)
            assert torch.equal(e[..., ~active], r[..., ~active]), res
            assert not torch.equal(e[..., active], r[..., active]), res
    assert sparse_macs < 0.6 * record_macs

    fresh = fisedit.compile(controlnet, fisedit.Policy(block_size=4, norm_stats="fresh"))
    with fresh.record():
        fresh(**inputs)
    with fresh.sparse(torch.ones(SIZE, SIZE, dtype=torch.bool)):
        full = _residuals(fresh(**new, return_dict=False))
    assert all(close(f, d) for f, d in zip(full, _residuals(controlnet(**new, return_dict=False))))


@functools.lru_cache(maxsize=None)
def _controlnet_session():
    base = random_pipeline("sd15", latent_size=SIZE)
    pipe = controlnet_pipeline(base, random_controlnet(base.unet, conditioning_embedding_out_channels=CONDITIONING))
    control = _control_image()
    session = fisedit.EditSession(pipe, num_inference_steps=6)
    with pytest.raises(ValueError, match="control_image"):
        session.generate("a cabin in the woods")
    source = session.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0),
                              control_image=control)
    return session, source


@torch.no_grad()
def test_an_edit_session_runs_a_controlnet_sparse_beside_the_unet():
    """A ControlNet pipeline's `EditSession` compiles `pipe.controlnet` too (the pipeline still sees a
    `ControlNetModel`): the source run records it, an edit's dense steps run it under control and its sparse steps
    sparse over the same mask, and the latents outside the mask stay the source's, bit for bit."""
    from diffusers import ControlNetModel

    from fisedit_compiler.editing.masks import ellipse_mask

    session, source = _controlnet_session()
    controlnet = session.pipe.controlnet
    assert isinstance(controlnet, ControlNetModel) and isinstance(controlnet, fisedit.CompiledUNet)
    assert session.memory_breakdown()["controlnet"] > 0  # its records, in the session's budget
    modes = []
    hook = controlnet.register_forward_pre_hook(lambda m, a: modes.append(type(m.current_run.mode).__name__))
    try:
        # a word swap: its first steps hold the layout, dense under control
        edit = session.edit("a house in the woods", mask=ellipse_mask(SIZE, 0.15, grid_offset=0), keep=False)
    finally:
        hook.remove()
    assert torch.equal(edit.latents[..., ~edit.mask], source.latents[..., ~edit.mask])
    assert not torch.equal(edit.latents[..., edit.mask], source.latents[..., edit.mask])
    dense = edit.stats["dense"].unet_calls
    assert modes == ["ControlMode"] * dense + ["SparseMode"] * (6 - dense) and 0 < dense < 6
    with pytest.raises(NotImplementedError, match="has a ControlNet"):
        session.save("/nonexistent")


def test_control_image_is_refused_without_a_controlnet():
    session = fisedit.EditSession(random_pipeline("sd15", latent_size=SIZE), num_inference_steps=2)
    with pytest.raises(ValueError, match="has no ControlNet or T2I-Adapter"):
        session.generate("a cabin", control_image=torch.zeros(3, 8, 8))


@torch.no_grad()
def test_an_edit_may_change_the_control_image_inside_its_mask_only():
    """A ControlNet edit with a new control image changed inside its mask (the source's prompt: the change is the
    control image's doing) keeps the latents outside bit-identical; one changed outside, or without a mask, is
    refused with the reason."""
    from PIL import ImageDraw

    session, source = _controlnet_session()
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[8:20, 10:22] = True
    control = session._control_image.copy()
    ImageDraw.Draw(control).rectangle([8 * 12, 8 * 10, 8 * 18, 8 * 16], outline=(255, 255, 255), width=2)
    edit = session.edit("a cabin in the woods", mask=mask, control_image=control, keep=False)
    assert torch.equal(edit.latents[..., ~mask], source.latents[..., ~mask])
    assert not torch.equal(edit.latents[..., mask], source.latents[..., mask])  # the new control image's effect
    outside = control.copy()
    ImageDraw.Draw(outside).rectangle([0, 0, 20, 20], fill=(255, 255, 255))
    with pytest.raises(ValueError, match="pixels outside the mask"):
        session.edit("a cabin in the woods", mask=mask, control_image=outside, keep=False)
    with pytest.raises(ValueError, match="needs the user's mask"):
        session.edit("a cabin in the woods", control_image=control, keep=False)
    assert session._control_image is not control  # keep=False: the source's control image stays


@torch.no_grad()
def test_an_sdxl_controlnet_pipeline_edits_too():
    """`StableDiffusionXLControlNetPipeline`: the ControlNet takes SDXL's added conditions, and the session compiles
    and runs it beside the U-Net as over SD's ControlNet pipeline."""
    from fisedit_compiler.editing.masks import ellipse_mask

    base = random_pipeline("sdxl", latent_size=SIZE)
    pipe = controlnet_pipeline(base, random_controlnet(base.unet, conditioning_embedding_out_channels=CONDITIONING))
    control = _control_image()
    session = fisedit.EditSession(pipe, num_inference_steps=4)
    source = session.generate("a cabin", generator=torch.Generator().manual_seed(0), control_image=control)
    mask = ellipse_mask(SIZE, 0.15, grid_offset=0)
    edit = session.edit("a house", mask=mask)
    assert torch.equal(edit.latents[..., ~mask], source.latents[..., ~mask])
    assert not torch.equal(edit.latents[..., mask], source.latents[..., mask])
    assert session.memory_breakdown()["controlnet"] > 0
