"""Diffusion transformers (SD3's MMDiT) through the same compiler as U-Nets: the exactness contract of
docs/design.md on tiny SD3 transformers (patch size 1 and SD3's 2), and what the passes do to their graphs."""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

import fisedit_compiler as fisedit
from conftest import close
from fisedit_compiler.ir import LAYOUT, SpatialLayout
from fisedit_compiler.passes.annotate_spatial_layout import UnknownLayout

SIZE = 32  # latent pixels per side (a mask's resolution)
POLICIES = {
    "b2": fisedit.Policy(block_size=2),
    "b1": fisedit.Policy(block_size=1),
    "auto": fisedit.Policy(),
    "dense-attention": fisedit.Policy(block_size=2, attention="dense"),
}
TEXT = 7  # text tokens


def tiny_sd3(patch_size: int = 2, layers: int = 2):
    """The blocks of SD3 (joint attention, AdaLN, a final block whose text stream stops before its MLP), tiny."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=SIZE, patch_size=patch_size, in_channels=4, num_layers=layers,
                                 attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                 joint_attention_dim=32, pooled_projection_dim=16, out_channels=4,
                                 pos_embed_max_size=2 * SIZE).eval()


def tiny_flux():
    """FLUX's blocks (a double-stream and a single-stream one, rotary embeddings, guidance embedding), tiny; its
    latents are packed 2x2 patches of 4-channel latents (16 channels per token)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, axes_dims_rope=[4, 4, 8], guidance_embeds=True).eval()


def sd3_inputs(seed: int, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, SIZE, SIZE, generator=g),
            "encoder_hidden_states": torch.randn(batch, TEXT, 32, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g),
            "timestep": torch.full((batch,), 500.0)}


def flux_inputs(seed: int, batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    grid = SIZE // 2
    ids = torch.zeros(grid, grid, 3)
    ids[..., 1], ids[..., 2] = torch.arange(grid)[:, None], torch.arange(grid)[None]
    return {"hidden_states": torch.randn(batch, grid * grid, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, TEXT, 32, generator=g),
            "pooled_projections": torch.randn(batch, 16, generator=g), "timestep": torch.full((batch,), 0.5),
            "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(TEXT, 3), "guidance": torch.full((batch,), 3.5)}


# name -> (model, inputs of a seed, token downscale: latent pixels per token side)
MODELS = {
    "sd3-patch1": (functools.partial(tiny_sd3, 1), sd3_inputs, 1),
    "sd3-patch2": (functools.partial(tiny_sd3, 2), sd3_inputs, 2),
    "flux": (tiny_flux, flux_inputs, 2),
}


def tokens_of(model_name: str, output: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and the active map per token: (B, tokens, ...) and (tokens,) (FLUX's output is packed tokens
    already, SD3's a latent map made of patches)."""
    f = MODELS[model_name][2]
    grid = SIZE // f
    per_token = active.reshape(grid, f, grid, f).any(dim=3).any(dim=1).reshape(-1)
    if output.dim() == 3:
        return output, per_token
    b, c = output.shape[:2]
    patches = output.reshape(b, c, grid, f, grid, f).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, -1)
    return patches, per_token


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
def recorded(model_name: str, policy_name: str = "b2"):
    """A compiled tiny transformer with one recorded step; shared, since sparse calls leave it unchanged."""
    build, make_inputs, _ = MODELS[model_name]
    model = build()
    compiled = fisedit.compile(model, POLICIES[policy_name])
    inputs = make_inputs(0)
    with torch.no_grad(), compiled.record():
        output = compiled(**inputs).sample
    return model, compiled, inputs, output


@pytest.fixture(params=list(MODELS))
def model_name(request) -> str:
    return request.param


@torch.no_grad()
def test_record_equals_eager_and_returns_what_the_model_returns(model_name):
    model, compiled, inputs, output = recorded(model_name)
    eager = model(**inputs)
    assert close(output, eager.sample)
    assert type(compiled(**inputs)) is type(eager)  # outside record/sparse: the model itself
    with compiled.record():
        assert isinstance(compiled(**inputs, return_dict=False), tuple)


@torch.no_grad()
@pytest.mark.parametrize("policy_name", ["b2", "b1", "auto"])
@pytest.mark.parametrize("mask_name", list(masks()))
def test_sparse_call_on_recorded_input_returns_recorded_output(model_name, mask_name, policy_name):
    _, compiled, inputs, output = recorded(model_name, policy_name)
    with compiled.sparse(masks()[mask_name]):
        assert close(compiled(**inputs).sample, output)


@torch.no_grad()
@pytest.mark.parametrize("policy_name", list(POLICIES))
def test_full_mask_equals_the_dense_call_on_new_inputs(model_name, policy_name):
    model, compiled, _, _ = recorded(model_name, policy_name)
    new = MODELS[model_name][1](1)  # new latents, text and pooled text
    with compiled.sparse(torch.ones(SIZE, SIZE, dtype=torch.bool)):
        assert close(compiled(**new).sample, model(**new).sample)


@torch.no_grad()
@pytest.mark.parametrize("mask_name", ["one_pixel", "border", "blobs"])
def test_outside_the_recomputed_tokens_the_output_is_recorded_exactly(model_name, mask_name):
    _, compiled, _, output = recorded(model_name)
    with compiled.sparse(masks()[mask_name]):
        edited = compiled(**MODELS[model_name][1](1)).sample
        active = compiled.active_pixels()
    # the recomputed latent pixels are whole tokens (patches) around the mask
    assert active.shape == (SIZE, SIZE) and (active | ~masks()[mask_name]).all()
    f = MODELS[model_name][2]
    patches = active.reshape(SIZE // f, f, SIZE // f, f)
    assert torch.equal(patches.all(dim=3).all(dim=1), patches.any(dim=3).any(dim=1))
    edited, tokens = tokens_of(model_name, edited, active)
    output, _ = tokens_of(model_name, output, active)
    assert torch.equal(edited[:, ~tokens], output[:, ~tokens])
    assert not torch.equal(edited[:, tokens], output[:, tokens])


def _masked_dense_reference(model, recorded_inputs: dict, new_inputs: dict, tokens_active: torch.Tensor):
    """What a sparse call computes, written with the eager model: after the image tokens are embedded and after
    every block, the image tokens outside the active ones are put back to their recorded values (the text tokens are
    always computed). Attention then reads the inactive tokens' recorded keys and values, as the sparse call does."""
    recorded_values: dict[str, torch.Tensor] = {}
    embedding = model.pos_embed if hasattr(model.pos_embed, "proj") else model.x_embedder  # SD3's, FLUX's
    blocks = [*model.transformer_blocks, *getattr(model, "single_transformer_blocks", [])]
    modules = {"embedding": embedding, "proj_out": model.proj_out, **{f"block{i}": b for i, b in enumerate(blocks)}}

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
def test_sparse_call_equals_the_masked_dense_reference(model_name, mask_name):
    """Inside the recomputed tokens too: the active image tokens attend to all text tokens and to every image
    token, the inactive ones with their recorded keys and values."""
    model, compiled, inputs, _ = recorded(model_name)
    # new latents and text; the pooled text, timestep and guidance reach every token through AdaLN's modulation, so
    # the sparse call's recorded keys and values of inactive tokens are the reference's only when those are kept (as
    # for SDXL's added conditions: the approximation of an edit is larger where they change)
    new = {**MODELS[model_name][1](1), "pooled_projections": inputs["pooled_projections"]}
    with compiled.sparse(masks()[mask_name]):
        output = compiled(**new).sample
        active = compiled.active_pixels()
    reference = _masked_dense_reference(model, inputs, new, tokens_of(model_name, output, active)[1])
    assert close(output, reference)
    dense = model(**new).sample  # the reference is not the dense call: inactive tokens' values are recorded ones
    assert not close(dense, reference, rtol=1e-4)


@torch.no_grad()
def test_a_sparse_call_costs_fewer_macs_and_the_text_stream_stays_dense():
    from fisedit_compiler.macs import count_macs

    _, compiled, inputs, _ = recorded("sd3-patch2")
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
    _, compiled, inputs, _ = recorded("sd3-patch2")
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
    _, compiled, inputs, _ = recorded("sd3-patch2")
    with compiled.record(), pytest.raises(NotImplementedError, match="skip_layers"):
        compiled(**inputs, skip_layers=[0])
    with compiled.record(), pytest.raises(NotImplementedError, match="joint_attention_kwargs.*'ip_adapter_image_embeds'"):
        compiled(**inputs, joint_attention_kwargs={"ip_adapter_image_embeds": [inputs["pooled_projections"]]})


@functools.lru_cache(maxsize=None)
def session_over(family: str):
    from fisedit_compiler.models.flux import random_flux_pipeline
    from fisedit_compiler.models.sd3 import random_sd3_pipeline

    pipe = {"sd3": random_sd3_pipeline, "flux": random_flux_pipeline}[family](latent_size=SIZE)
    session = fisedit.EditSession(pipe, num_inference_steps=6, guidance_scale=5.0, height=8 * SIZE, width=8 * SIZE)
    source = session.generate("a red circle", generator=torch.Generator().manual_seed(0))
    return session, source


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_an_edit_session_over_a_transformer_keeps_the_latents_outside_a_users_mask(family):
    """`EditSession` over `StableDiffusion3Pipeline` and `FluxPipeline` (flow matching; FLUX's latents packed into
    tokens): the transformer is compiled in place, and an edit with a user's mask, then a continuous edit on top of
    it, change the latents only inside their masks; each picture is decoded sparsely around what changed."""
    from fisedit_compiler.editing.masks import ellipse_mask

    session, source = session_over(family)
    assert isinstance(session.pipe.transformer, fisedit.CompiledUNet)
    assert source.latents.shape[-2:] == (SIZE, SIZE)  # the session keeps latent maps, packed or not in the pipeline
    first = session.edit("a blue circle", mask=ellipse_mask(SIZE, 0.15, center=(0.5, 0.4), grid_offset=0))
    assert torch.equal(first.latents[..., ~first.mask], source.latents[..., ~first.mask])
    assert not torch.equal(first.latents[..., first.mask], source.latents[..., first.mask])
    dense, sparse = first.stats["dense"], first.stats["sparse"]
    assert sparse.unet_calls > 0 and sparse.macs / sparse.unet_calls < dense.macs / dense.unet_calls
    second = session.edit("a blue square", mask=ellipse_mask(SIZE, 0.1, center=(0.3, 0.7), grid_offset=0))
    assert torch.equal(second.latents[..., ~second.mask], first.latents[..., ~second.mask])
    assert second.stats["decode"].mode == "sparse"


def test_flux_graph_passes_and_its_token_grid():
    """FLUX: the packed latents are a token sequence over the grid of `img_ids`; the rotary embeddings (computed
    from the ids) are constants with pixels, gathered into every sparse attention's queries and keys; the single
    blocks' joint sequence (text first) is split back by slices."""
    _, compiled, inputs, _ = recorded("flux")
    variants = compiled.variants(inputs)
    records = {r.name: r for r in variants.passes["sparse"]}
    assert records["annotate_spatial_layout"].rewrites > 0
    after = records["insert_region_boundaries"].ops_after
    # the latents, and the rotary cos and sin of each attention's queries and keys (2 blocks), enter gathered
    assert after["gather_active"] == 1 + 2 * 2 * 2
    final = records["eliminate_dead_code"].ops_after
    assert final["aten.split_with_sizes.default"] == 0 and final["aten.scaled_dot_product_attention.default"] == 2
    layouts = [n.meta.get(LAYOUT) for n in variants.sparse.graph.nodes]
    assert any(isinstance(layout, SpatialLayout) and layout.tokens == (TEXT, 0) for layout in layouts)
    assert compiled.adapter.latent_shape(inputs) == (1, 4, SIZE, SIZE)


def test_flux_refuses_ids_that_are_not_the_grid():
    model = tiny_flux()
    inputs = flux_inputs(0)
    compiled = fisedit.compile(model)
    shuffled = {**inputs, "img_ids": inputs["img_ids"].flip(0)}
    with compiled.record(), pytest.raises(fisedit.UnsupportedModelError, match="row-major grid"):
        compiled(**shuffled)
    with compiled.record():
        compiled(**inputs)
    with pytest.raises(fisedit.MaskError, match=f"latents are {SIZE}x{SIZE}"):  # masks are at the VAE latents'
        with compiled.sparse(torch.ones(SIZE // 2, SIZE // 2, dtype=torch.bool)):
            compiled(**inputs)


def _sd35_like():
    """SD3.5's additions: RMS q/k norms written out (mean over the head dim) and a second, image-only attention in
    a block (`dual_attention_layers`)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=SIZE, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=2 * SIZE,
                                 qk_norm="rms_norm", dual_attention_layers=(0,)).eval()


def _flux_schnell_like():
    """FLUX.1-schnell's blocks: no guidance embedding, more single blocks."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=16, axes_dims_rope=[4, 4, 8], guidance_embeds=False).eval()


def _wide_inputs(family: str, seed: int, h: int = 24, w: int = 40) -> dict:
    """Inputs of a picture wider than tall (latents h x w)."""
    g = torch.Generator().manual_seed(seed)
    text = {"encoder_hidden_states": torch.randn(1, TEXT, 32, generator=g),
            "pooled_projections": torch.randn(1, 16, generator=g)}
    if family == "sd3":
        return {**text, "hidden_states": torch.randn(1, 4, h, w, generator=g), "timestep": torch.full((1,), 500.0)}
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h // 2)[:, None], torch.arange(w // 2)[None]
    return {**text, "hidden_states": torch.randn(1, h * w // 4, 16, generator=g), "timestep": torch.full((1,), 0.5),
            "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(TEXT, 3)}


@torch.no_grad()
@pytest.mark.parametrize("family, build", [("sd3", _sd35_like), ("flux", _flux_schnell_like)],
                         ids=["sd3.5-like", "flux-schnell-like"])
def test_other_transformer_configs_and_a_wide_picture(family, build):
    model = build()
    compiled = fisedit.compile(model, fisedit.Policy(block_size=2))
    inputs, new = _wide_inputs(family, 0), _wide_inputs(family, 1)
    with compiled.record():
        output = compiled(**inputs).sample
    assert close(output, model(**inputs).sample)
    mask = torch.zeros(24, 40, dtype=torch.bool)
    mask[6:12, 13:20] = True
    with compiled.sparse(mask):
        assert close(compiled(**inputs).sample, output)
        edited = compiled(**new).sample
        active = compiled.active_pixels()
    assert active.shape == (24, 40) and 0 < active.float().mean() < 0.5
    if family == "flux":  # packed tokens: compare per token
        per_token = active.reshape(12, 2, 20, 2).any(dim=3).any(dim=1).reshape(-1)
        assert torch.equal(edited[:, ~per_token], output[:, ~per_token])
    else:
        assert torch.equal(edited[..., ~active], output[..., ~active])
    with compiled.sparse(torch.ones(24, 40, dtype=torch.bool)):
        assert close(compiled(**new).sample, model(**new).sample)


@torch.no_grad()
def test_a_local_sd3_folder_without_t5_loads_and_edits(tmp_path):
    """A user's SD3 pipeline folder (here saved without its T5 encoder: `[null, null]` in model_index.json) loads
    with `load_pipeline` and edits in a session."""
    from fisedit_compiler.editing.masks import ellipse_mask
    from fisedit_compiler.models import load_pipeline
    from fisedit_compiler.models.sd3 import random_sd3_pipeline

    random_sd3_pipeline(latent_size=SIZE).save_pretrained(tmp_path)
    pipe = load_pipeline(tmp_path)
    assert pipe.text_encoder_3 is None and type(pipe).__name__ == "StableDiffusion3Pipeline"
    session = fisedit.EditSession(pipe, num_inference_steps=3, guidance_scale=5.0)
    source = session.generate("a red circle", generator=torch.Generator().manual_seed(0))
    edit = session.edit("a blue circle", mask=ellipse_mask(SIZE, 0.15, grid_offset=0))
    assert torch.equal(edit.latents[..., ~edit.mask], source.latents[..., ~edit.mask])


@torch.no_grad()
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_photo_loads_into_a_transformer_session_by_flow_inversion(family):
    """`load_image` over SD3 and FLUX pipelines (EEdit's setting): the photo's latents inverted up the pipeline's own
    flow schedule with its own conditioning (one transformer call per step, `Policy.inversion_skip` fewer), the
    source run recorded on that trajectory: its final latents are the encoded photo's, and an edit keeps them outside
    a user's mask."""
    from PIL import Image
    from skimage import data

    from fisedit_compiler.editing.masks import ellipse_mask
    from fisedit_compiler.models.flux import random_flux_pipeline
    from fisedit_compiler.models.sd3 import random_sd3_pipeline

    pipe = {"sd3": random_sd3_pipeline, "flux": random_flux_pipeline}[family](latent_size=SIZE)
    session = fisedit.EditSession(pipe, num_inference_steps=4, guidance_scale=5.0, height=8 * SIZE, width=8 * SIZE,
                                  policy=fisedit.Policy(inversion_skip=2))
    photo = Image.fromarray(data.chelsea()).resize((8 * SIZE, 8 * SIZE))
    source = session.load_image(photo, "a photo of a cat")
    assert source.stats["inversion"].unet_calls == 2 and source.stats["dense"].unet_calls == 4
    pixels = torch.from_numpy(__import__("numpy").asarray(photo, dtype="float32") / 127.5 - 1).permute(2, 0, 1)[None]
    vae = pipe.vae
    encoded = (vae.encode(pixels).latent_dist.mean - (vae.config.shift_factor or 0)) * vae.config.scaling_factor
    assert close(source.latents, encoded)
    mask = ellipse_mask(SIZE, 0.15, grid_offset=0)
    edit = session.edit("a photo of a dog", mask=mask)
    assert torch.equal(edit.latents[..., ~mask], source.latents[..., ~mask])
    assert not torch.equal(edit.latents[..., mask], source.latents[..., mask])


@torch.no_grad()
def test_the_torch_compile_backend_runs_a_transformer_as_fisedit_compile_does(model_name):
    """`torch.compile(transformer, backend="fisedit")`: the same record, and a sparse call on new inputs equal to
    `fisedit.compile`'s, bit for bit (one capture, passes and runtime behind both entry points)."""
    build, make_inputs, _ = MODELS[model_name]
    model = build()
    compiled = fisedit.compile(model, POLICIES["b2"])
    backend = torch.compile(model, backend=fisedit.backend(POLICIES["b2"]))
    inputs, new, mask = make_inputs(0), make_inputs(1), masks()["blobs"]
    with compiled.record():
        want_record = compiled(**inputs).sample
    with compiled.sparse(mask):
        want_sparse = compiled(**new).sample
    with fisedit.record(backend):
        got_record = backend(**inputs).sample
    with fisedit.sparse(backend, mask) as session:
        got_sparse = backend(**new).sample
        assert session.active_pixels().any() and not session.active_pixels().all()
    assert torch.equal(got_record, want_record) and torch.equal(got_sparse, want_sparse)
    assert not torch.equal(got_sparse, want_record)


@torch.no_grad()
def test_lora_layers_of_a_transformer_keep_the_contract_and_are_replayed_only_under_their_scale(model_name):
    """PEFT LoRA layers on a transformer's attention (`add_adapter`, as diffusers' LoRA loaders make them), called
    with `joint_attention_kwargs={"scale": 0.5}`: record equals eager, a sparse call on the recorded inputs returns
    the recorded output, a full mask on new inputs equals the dense call; a record is not replayed at another scale."""
    from peft import LoraConfig

    build, make_inputs, _ = MODELS[model_name]
    torch.manual_seed(0)
    model = build()
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    scaled = lambda inputs: {**inputs, "joint_attention_kwargs": {"scale": 0.5}}  # noqa: E731
    inputs, new = scaled(make_inputs(0)), scaled(make_inputs(1))
    eager = model(**inputs).sample
    assert (eager - model(**make_inputs(0)).sample).abs().max() > 1e-3  # the LoRA and its scale matter
    compiled = fisedit.compile(model, POLICIES["b2"])
    with compiled.record():
        recorded = compiled(**inputs).sample
    assert close(recorded, eager)
    with compiled.sparse(masks()["blobs"]):
        assert close(compiled(**inputs).sample, recorded)
    with compiled.sparse(torch.ones(SIZE, SIZE, dtype=torch.bool)):
        assert close(compiled(**new).sample, model(**new).sample)
    with compiled.sparse(masks()["blobs"]), pytest.raises(fisedit.SettingsMismatchError, match="0.5"):
        compiled(**make_inputs(1))


def kontext_inputs(seed: int, reference_rows: int = SIZE // 2, reference_cols: int = SIZE // 2) -> dict:
    """FLUX Kontext's call: the latents' tokens, then a reference picture's (`img_ids[:, 0]` = 1, its own grid);
    the reference is the same for every seed."""
    inputs = flux_inputs(seed)
    g = torch.Generator().manual_seed(7)
    reference = torch.randn(1, reference_rows * reference_cols, 16, generator=g)
    ids = torch.zeros(reference_rows, reference_cols, 3)
    ids[..., 0] = 1
    ids[..., 1], ids[..., 2] = torch.arange(reference_rows)[:, None], torch.arange(reference_cols)[None]
    return {**inputs, "hidden_states": torch.cat([inputs["hidden_states"], reference], dim=1),
            "img_ids": torch.cat([inputs["img_ids"], ids.reshape(-1, 3)])}


@torch.no_grad()
def test_flux_kontext_reference_tokens_are_stacked_below_the_picture_and_never_recomputed():
    """FLUX Kontext appends a reference picture's tokens to the latents'. They get rows of the layout's grid below
    the picture's, which masks never reach: a sparse call reads their recorded keys and values (as it does the
    picture's inactive tokens) and returns their recorded outputs; the picture's tokens inside the mask are what the
    model computes with the reference tokens recorded."""
    model = tiny_flux()
    compiled = fisedit.compile(model, POLICIES["b2"])
    inputs = kontext_inputs(0)
    with compiled.record():
        output = compiled(**inputs).sample
    assert close(output, model(**inputs).sample)
    assert compiled.adapter.latent_shape(inputs) == (1, 4, SIZE, SIZE)  # masks are the picture's
    assert compiled.adapter.mask_extent(inputs) == (2 * SIZE, SIZE) == compiled.cache.extent
    for mask in (masks()["border"], torch.ones(SIZE, SIZE, dtype=torch.bool)):
        with compiled.sparse(mask):
            assert close(compiled(**inputs).sample, output)
    new = {**kontext_inputs(1), "pooled_projections": inputs["pooled_projections"]}
    for mask in (masks()["blobs"], torch.ones(SIZE, SIZE, dtype=torch.bool)):
        with compiled.sparse(mask):
            edited = compiled(**new).sample
            active = compiled.active_pixels()
        assert active.shape == (SIZE, SIZE)
        picture = tokens_of("flux", edited, active)[1]
        tokens = torch.cat([picture, torch.zeros_like(picture)])  # the reference's: never active
        assert torch.equal(edited[:, ~tokens], output[:, ~tokens])
        assert close(edited, _masked_dense_reference(model, inputs, new, tokens))
    assert not close(edited, model(**new).sample, rtol=1e-4)  # a dense call recomputes the reference tokens


def test_flux_kontext_references_of_another_form_are_refused_by_name():
    compiled = fisedit.compile(tiny_flux(), POLICIES["b2"])
    with compiled.record(), pytest.raises(fisedit.UnsupportedModelError, match="as wide"):
        compiled(**kontext_inputs(0, reference_cols=SIZE // 4, reference_rows=SIZE))
    third = kontext_inputs(0)
    third["img_ids"][-4:, 0] = 2
    with compiled.record(), pytest.raises(fisedit.UnsupportedModelError, match="one reference image"):
        compiled(**third)
    with torch.no_grad(), compiled.record():
        compiled(**kontext_inputs(0))
    shorter = kontext_inputs(1, reference_rows=SIZE // 4)
    with torch.no_grad(), compiled.sparse(masks()["blobs"]), pytest.raises(ValueError, match="reference image"):
        compiled(**shorter)


@torch.no_grad()
def test_an_edit_session_over_flux_kontext_edits_its_picture_inside_the_mask_only(tmp_path):
    """`EditSession` over `FluxKontextPipeline`: the source run follows a picture (`control_image`, resized to the
    session's size) and its prompt (an instruction); an edit with a user's mask keeps the latents outside it; a
    detected edit finds its region in its first steps, as for prompt edits; a saved session keeps its picture."""
    from skimage import data

    from fisedit_compiler.editing.masks import ellipse_mask
    from fisedit_compiler.editing.persistence import SessionFileError
    from fisedit_compiler.models.flux import random_flux_pipeline

    pipe = random_flux_pipeline(latent_size=SIZE, kontext=True)
    session = fisedit.EditSession(pipe, num_inference_steps=4, guidance_scale=3.5, height=8 * SIZE, width=8 * SIZE)
    with pytest.raises(ValueError, match="FLUX Kontext reference picture: pass generate"):
        session.generate("keep the cat")
    photo = Image.fromarray(data.chelsea())  # 451 x 300: cropped and resized to the session's 256 x 256
    source = session.generate("keep the cat", generator=torch.Generator().manual_seed(0), control_image=photo)
    assert session.cache.extent == (2 * SIZE, SIZE)  # the reference's tokens below the picture's
    edit = session.edit("give the cat a hat", mask=ellipse_mask(SIZE, 0.15, center=(0.4, 0.5), grid_offset=0))
    assert torch.equal(edit.latents[..., ~edit.mask], source.latents[..., ~edit.mask])
    assert not torch.equal(edit.latents[..., edit.mask], source.latents[..., edit.mask])
    assert edit.stats["sparse"].unet_calls == 4
    detected = session.edit("make the cat black", keep=False)
    assert detected.detected is not None and detected.detected.shape == (SIZE, SIZE)

    # saved with its picture; continued over the same pipeline, refused over FLUX without Kontext
    session.save(tmp_path / "saved")
    reopened = fisedit.EditSession.load(tmp_path / "saved", pipe)
    again = reopened.edit("give the cat a hat", mask=edit.mask)
    assert torch.equal(again.latents[..., ~edit.mask], edit.latents[..., ~edit.mask])
    with pytest.raises(SessionFileError, match="FLUX Kontext"):
        fisedit.EditSession.load(tmp_path / "saved", random_flux_pipeline(latent_size=SIZE))



@torch.no_grad()
def test_the_cli_session_regenerates_the_picture_flux_kontext_edits_and_takes_masks_at_its_size(tmp_path):
    """`fisedit edit --image photo --prompt ... --edit ... --mask m.png` over a Kontext model (`report.run_session`,
    what the CLI runs): the picture is the one Kontext edits (generated under the prompt, not inverted), and a mask
    drawn on the photo is cropped and resized the way the photo was."""
    from PIL import ImageDraw
    from skimage import data

    from fisedit_compiler.models.flux import random_flux_pipeline
    from fisedit_compiler.report import ScriptedEdit, run_session

    photo = Image.fromarray(data.chelsea())  # 451 x 300: its centre 300 x 300 (x from 75) is the session's picture
    drawn = Image.new("L", photo.size)
    ImageDraw.Draw(drawn).rectangle((75, 0, 374, 149), fill=255)  # the top half of that centre
    logged = []
    pipe = random_flux_pipeline(latent_size=SIZE, kontext=True)
    pipe.default_sample_size = SIZE  # the session's picture: 8 * SIZE pixels (FLUX's default is 1024)
    result = run_session(pipe, "keep the cat",
                         [ScriptedEdit("give the cat a hat", mask=drawn)], tmp_path, steps=3, seed=0,
                         policy=fisedit.Policy(), log=logged.append, image=photo)
    assert "regenerated" in logged[0]
    assert result["edits"][0]["mask_fraction"] == pytest.approx(0.5, abs=1 / SIZE)


@torch.no_grad()
def test_a_photo_loaded_into_a_flux_kontext_session_is_kept_exactly_outside_an_edit():
    """`load_image` over `FluxKontextPipeline` (EEdit's setting on Kontext): the photo is inverted up the flow with
    itself as the picture the transformer reads beside the latents, the source run recorded on that trajectory ends
    at the encoded photo exactly, and an instruction edit keeps it outside the user's mask."""
    from skimage import data

    from fisedit_compiler.editing.masks import ellipse_mask
    from fisedit_compiler.models.flux import random_flux_pipeline

    session = fisedit.EditSession(random_flux_pipeline(latent_size=SIZE, kontext=True), num_inference_steps=4,
                                  guidance_scale=3.5, height=8 * SIZE, width=8 * SIZE)
    photo = Image.fromarray(data.coffee())
    loaded = session.load_image(photo, "a cup of coffee")
    assert loaded.stats["inversion"].unet_calls == 4 and session.cache.extent == (2 * SIZE, SIZE)
    assert torch.equal(loaded.latents, session._encode(photo)[1])
    mask = ellipse_mask(SIZE, 0.15, center=(0.5, 0.5), grid_offset=0)
    edit = session.edit("make the cup red", mask=mask)
    assert torch.equal(edit.latents[..., ~mask], loaded.latents[..., ~mask])
    assert not torch.equal(edit.latents[..., mask], loaded.latents[..., mask])
