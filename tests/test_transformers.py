"""Diffusion transformers (SD3's MMDiT) through the same compiler as U-Nets: the exactness contract of
docs/design.md on tiny SD3 transformers (patch size 1 and SD3's 2), and what the passes do to their graphs."""

from __future__ import annotations

import functools

import pytest
import torch

import fisedit_compiler as fisedit
from conftest import close
from fisedit_compiler.ir import LAYOUT, SpatialLayout
from fisedit_compiler.passes.annotate_spatial_layout import UnknownLayout

SIZE = 32
POLICIES = {
    "b2": fisedit.Policy(block_size=2),
    "b1": fisedit.Policy(block_size=1),
    "auto": fisedit.Policy(),
    "dense-attention": fisedit.Policy(block_size=2, attention="dense"),
}


def tiny_sd3(patch_size: int = 2, layers: int = 2):
    """The blocks of SD3 (joint attention, AdaLN, a final block whose text stream stops before its MLP), tiny."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=SIZE, patch_size=patch_size, in_channels=4, num_layers=layers,
                                 attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                 joint_attention_dim=32, pooled_projection_dim=16, out_channels=4,
                                 pos_embed_max_size=2 * SIZE).eval()


def sd3_inputs(seed: int, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, SIZE, SIZE, generator=g),
            "encoder_hidden_states": torch.randn(batch, 7, 32, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
            "timestep": torch.full((batch,), 500.0)}


def masks() -> dict[str, torch.Tensor]:
    empty = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    one_pixel, border, blobs = empty.clone(), empty.clone(), empty.clone()
    one_pixel[13, 9] = True
    border[0:3, SIZE - 5:] = True
    border[SIZE - 1, 0] = True
    blobs[2:6, 3:8] = True
    blobs[20:27, 22:25] = True
    return {"empty": empty, "one_pixel": one_pixel, "border": border, "blobs": blobs}


@functools.lru_cache(maxsize=None)
def recorded(patch_size: int, policy_name: str = "b2"):
    """A compiled tiny SD3 with one recorded step; shared, since sparse calls leave it unchanged."""
    model = tiny_sd3(patch_size)
    compiled = fisedit.compile(model, POLICIES[policy_name])
    inputs = sd3_inputs(0)
    with torch.no_grad(), compiled.record():
        output = compiled(**inputs).sample
    return model, compiled, inputs, output


@pytest.fixture(params=[1, 2], ids=lambda p: f"patch{p}")
def patch_size(request) -> int:
    return request.param


@torch.no_grad()
def test_record_equals_eager_and_returns_what_the_model_returns(patch_size):
    model, compiled, inputs, output = recorded(patch_size)
    eager = model(**inputs)
    assert close(output, eager.sample)
    assert type(compiled(**inputs)) is type(eager)  # outside record/sparse: the model itself
    with compiled.record():
        assert isinstance(compiled(**inputs, return_dict=False), tuple)


@torch.no_grad()
@pytest.mark.parametrize("policy_name", ["b2", "b1", "auto"])
@pytest.mark.parametrize("mask_name", list(masks()))
def test_sparse_call_on_recorded_input_returns_recorded_output(patch_size, mask_name, policy_name):
    _, compiled, inputs, output = recorded(patch_size, policy_name)
    with compiled.sparse(masks()[mask_name]):
        assert close(compiled(**inputs).sample, output)


@torch.no_grad()
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_full_mask_equals_the_dense_call_on_new_inputs(patch_size, policy_name):
    model, compiled, _, _ = recorded(patch_size, policy_name)
    new = sd3_inputs(1)  # new latents, text and pooled text
    with compiled.sparse(torch.ones(SIZE, SIZE, dtype=torch.bool)):
        assert close(compiled(**new).sample, model(**new).sample)


@torch.no_grad()
@pytest.mark.parametrize("mask_name", ["one_pixel", "border", "blobs"])
def test_outside_the_recomputed_patches_the_output_is_recorded_exactly(patch_size, mask_name):
    _, compiled, _, output = recorded(patch_size)
    with compiled.sparse(masks()[mask_name]):
        edited = compiled(**sd3_inputs(1)).sample
        active = compiled.active_pixels()
    assert torch.equal(edited[..., ~active], output[..., ~active])
    assert not torch.equal(edited[..., active], output[..., active])
    # the recomputed latent pixels are whole patches around the mask: each token's patch_size x patch_size pixels
    assert (active | ~masks()[mask_name]).all()
    patches = active.reshape(SIZE // patch_size, patch_size, SIZE // patch_size, patch_size)
    assert torch.equal(patches.all(dim=3).all(dim=1), patches.any(dim=3).any(dim=1))


def _masked_dense_reference(model, recorded_inputs: dict, new_inputs: dict, tokens_active: torch.Tensor):
    """What a sparse call computes, written with the eager model: after the patch embedding and after every block,
    the image tokens outside the active ones are put back to their recorded values (the text tokens are always
    computed). Attention then reads the inactive tokens' recorded keys and values, as the sparse call does."""
    recorded_values: dict[str, torch.Tensor] = {}
    modules = {"pos_embed": model.pos_embed, "proj_out": model.proj_out,
               **{f"block{i}": b for i, b in enumerate(model.transformer_blocks)}}

    def image_tokens(output):
        return output[1] if isinstance(output, tuple) else output

    def record_hook(name):
        def hook(module, args, output):
            recorded_values[name] = image_tokens(output).clone()
        return hook

    def replace_hook(name):
        def hook(module, args, output):
            image = torch.where(tokens_active[None, :, None], image_tokens(output), recorded_values[name])
            return (output[0], image) if isinstance(output, tuple) else image
        return hook

    handles = [m.register_forward_hook(record_hook(n)) for n, m in modules.items()]
    model(**recorded_inputs)
    for h in handles:
        h.remove()
    handles = [m.register_forward_hook(replace_hook(n)) for n, m in modules.items()]
    try:
        return model(**new_inputs).sample
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
@pytest.mark.parametrize("mask_name", ["border", "blobs"])
def test_sparse_call_equals_the_masked_dense_reference(patch_size, mask_name):
    """Inside the recomputed patches too: the active image tokens attend to all text tokens and to every image
    token, the inactive ones with their recorded keys and values."""
    model, compiled, inputs, _ = recorded(patch_size)
    # new latents and text; the pooled text and the timestep reach every token through AdaLN's modulation, so the
    # sparse call's recorded keys and values of inactive tokens are the reference's only when those are kept (as for
    # SDXL's added conditions: the approximation of an edit is larger where they change)
    new = {**sd3_inputs(1), "pooled_projections": inputs["pooled_projections"]}
    with compiled.sparse(masks()[mask_name]):
        output = compiled(**new).sample
        plan = compiled.current_run.plan
        tokens = plan.active_pixels((SIZE // patch_size, SIZE // patch_size)).reshape(-1)
    reference = _masked_dense_reference(model, inputs, new, tokens)
    assert close(output, reference)
    dense = model(**new).sample  # the reference is not the dense call: inactive tokens' values are recorded ones
    assert not close(dense, reference, rtol=1e-4)


@torch.no_grad()
def test_a_sparse_call_costs_fewer_macs_and_the_text_stream_stays_dense():
    from fisedit_compiler.macs import count_macs

    _, compiled, inputs, _ = recorded(2)
    with compiled.record():
        dense, _ = count_macs(compiled, **inputs)
    with compiled.sparse(masks()["blobs"]):
        sparse, _ = count_macs(compiled, **sd3_inputs(1))
        active = compiled.active_pixels().float().mean().item()
    assert active < 0.3
    # the per-token layers scale with the active tokens; the text stream and attention's keys do not
    assert sparse < 0.6 * dense
    assert sparse > active * dense


def test_the_passes_on_a_transformer_graph():
    """What each pass does to an SD3 graph (2 joint blocks), by op counts: every joint attention keeps the stock op
    with queries of the active image tokens and the text, and keys and values at full size (the joint sequences'
    image tokens scattered into their recorded values, the text tokens fresh); the positional embedding is gathered
    like a full-size input."""
    _, compiled, inputs, _ = recorded(2)
    variants = compiled.variants(inputs)
    records = {r.name: r for r in variants.passes["sparse"]}  # op counts by op name
    assert records["annotate_spatial_layout"].rewrites > 0
    after = records["insert_region_boundaries"].ops_after
    # per block the joint keys and values, scattered for attention; one scatter before unpatchify
    assert after["scatter_into_recorded"] == 2 * 2 + 1
    # the latents (for the patch embedding) and the positional embedding enter gathered
    assert after["gather_active"] == 2
    final = records["eliminate_dead_code"].ops_after
    assert final["aten.scaled_dot_product_attention.default"] == 2 and final["active_query_attention"] == 0
    # the patch embedding reads windows of the latents; the joint sequences' reshapes and slices stay ATen ops
    assert final["gather_windows"] == 1 and final["conv_windows"] == 1 and final["gather_active"] == 1
    assert final["aten.cat.default"] == 8 and final["aten.einsum.default"] == 1
    # layouts: the joint sequence knows its text tokens; the text slices have none; nothing is unknown
    layouts = [n.meta.get(LAYOUT) for n in variants.sparse.graph.nodes]
    assert not any(isinstance(layout, UnknownLayout) for layout in layouts)
    assert any(isinstance(layout, SpatialLayout) and layout.tokens == (0, 7) for layout in layouts)


def test_inputs_sd3_calls_refuse_are_named():
    _, compiled, inputs, _ = recorded(2)
    with compiled.record(), pytest.raises(NotImplementedError, match="skip_layers"):
        compiled(**inputs, skip_layers=[0])
    with compiled.record(), pytest.raises(NotImplementedError, match="joint_attention_kwargs"):
        compiled(**inputs, joint_attention_kwargs={"scale": 0.5})


@functools.lru_cache(maxsize=None)
def sd3_session():
    from fisedit_compiler.models.sd3 import random_sd3_pipeline

    session = fisedit.EditSession(random_sd3_pipeline(latent_size=SIZE), num_inference_steps=6, guidance_scale=5.0)
    source = session.generate("a red circle", generator=torch.Generator().manual_seed(0))
    return session, source


@torch.no_grad()
def test_an_edit_session_over_sd3_keeps_the_latents_outside_a_users_mask():
    """`EditSession` over `StableDiffusion3Pipeline` (flow matching): the transformer is compiled in place, and an
    edit with a user's mask, then a continuous edit on top of it, change the latents only inside their masks."""
    from fisedit_compiler.editing.masks import ellipse_mask

    session, source = sd3_session()
    assert isinstance(session.pipe.transformer, fisedit.CompiledUNet)
    first = session.edit("a blue circle", mask=ellipse_mask(SIZE, 0.15, center=(0.5, 0.4), grid_offset=0))
    assert torch.equal(first.latents[..., ~first.mask], source.latents[..., ~first.mask])
    assert not torch.equal(first.latents[..., first.mask], source.latents[..., first.mask])
    assert first.stats["sparse"].unet_calls > 0
    assert first.stats["sparse"].macs < first.stats["sparse"].unet_calls * first.stats["dense"].macs / max(
        1, first.stats["dense"].unet_calls)
    second = session.edit("a blue square", mask=ellipse_mask(SIZE, 0.1, center=(0.3, 0.7), grid_offset=0))
    assert torch.equal(second.latents[..., ~second.mask], first.latents[..., ~second.mask])
    # the picture is decoded sparsely around the latents that changed
    assert second.stats["decode"].mode == "sparse"
