"""LoRA (PEFT layers loaded with diffusers' loaders, scaled per call or with `set_adapters`), IP-Adapter (image tokens
through extra cross-attention) and T2I-Adapter (residuals added inside the down blocks) in record and sparse calls
and in edit sessions; and the settings a record is only replayed under (`adapters/settings.py`)."""

from __future__ import annotations

import functools

import pytest
import torch

import fisedit_compiler as fisedit
from conftest import backend_matches_compile, close, unet_inputs
from fisedit_compiler.editing.masks import ellipse_mask
from fisedit_compiler.models import random_pipeline
from fisedit_compiler.models.adapters import (
    random_t2i_adapter,
    save_random_ip_adapter,
    save_random_lora,
    t2i_adapter_pipeline,
)
from sparse_reference import reference_sparse_call

SIZE = 16
POLICY = fisedit.Policy(block_size=4)
IMAGE_DIM = 32  # the IP-Adapter's image embedding width
MASK = torch.zeros(SIZE, SIZE, dtype=torch.bool)
MASK[3:9, 8:14] = True


FEW_TARGETS = ("to_q", "to_v", "conv1")  # a lighter LoRA (linear and convolution layers) for the tests that capture often


def _lora_pipeline(tmp_path_factory, adapter_name: str = "style", targets: tuple[str, ...] | None = None):
    """A tiny SD 1.5 pipeline with a random LoRA (by default on attention, feed-forward and ResNet convolutions;
    `targets`: on those layers) loaded from a file by `pipe.load_lora_weights`, as a user loads one."""
    pipe = random_pipeline("sd15", latent_size=SIZE)
    folder = tmp_path_factory.mktemp("lora")
    save_random_lora(pipe.unet, folder, **({} if targets is None else {"targets": targets}))
    pipe.load_lora_weights(folder, adapter_name=adapter_name)
    return pipe


@pytest.fixture(scope="module")
def lora_unet(tmp_path_factory):
    return _lora_pipeline(tmp_path_factory).unet


def _scaled(inputs: dict, scale: float) -> dict:
    return {**inputs, "cross_attention_kwargs": {"scale": scale}}


@pytest.mark.slow  # a LoRA U-Net compiled and recorded, its scale changed: fifteen seconds
@torch.no_grad()
def test_lora_layers_keep_the_contract_at_a_call_scale(lora_unet):
    """PEFT LoRA layers (linear and convolution) go through the same passes as the layers they wrap: with
    `cross_attention_kwargs={"scale": 0.5}`, record equals eager, a sparse call on the recorded inputs returns the
    recorded output, one on new inputs equals the masked-dense reference, and a full mask with fresh statistics
    equals the dense call."""
    unet = lora_unet
    inputs, new = _scaled(unet_inputs(unet, size=SIZE), 0.5), _scaled(unet_inputs(unet, size=SIZE, seed=1), 0.5)
    eager = unet(**inputs).sample
    assert (eager - unet(**unet_inputs(unet, size=SIZE)).sample).abs().max() > 1e-2  # the scale matters
    compiled = fisedit.compile(unet, POLICY)
    with compiled.record():
        recorded = compiled(**inputs).sample
    assert close(recorded, eager)
    with compiled.sparse(MASK):
        assert close(compiled(**inputs).sample, recorded)
        output = compiled(**new).sample
    assert close(output, reference_sparse_call(unet, inputs, new, MASK, POLICY))

    fresh = fisedit.compile(unet, fisedit.Policy(block_size=4, norm_stats="fresh"))
    with fresh.record():
        fresh(**inputs)
    with fresh.sparse(torch.ones(SIZE, SIZE, dtype=torch.bool)):
        assert close(fresh(**new).sample, unet(**new).sample)


@pytest.mark.slow  # a LoRA U-Net compiled and recorded under three settings: twenty seconds
@torch.no_grad()
def test_a_record_is_replayed_only_under_its_lora_settings(tmp_path_factory):
    """Another call scale, other adapter weights (`set_adapters`), disabled or fused adapters: each is refused by a
    sparse call with what differs; back to the recorded settings, sparse calls run again. A record under new settings
    captures the graph again (the scales are constants of a captured graph): it equals the eager U-Net."""
    unet = _lora_pipeline(tmp_path_factory, targets=FEW_TARGETS).unet
    inputs = unet_inputs(unet, size=SIZE)
    compiled = fisedit.compile(unet, POLICY)
    with compiled.record():
        recorded = compiled(**_scaled(inputs, 0.5)).sample
    with compiled.sparse(MASK):
        with pytest.raises(fisedit.SettingsMismatchError, match=r"\['scale'\]: 0.5 when recorded, none now"):
            compiled(**inputs)
        assert close(compiled(**_scaled(inputs, 0.5)).sample, recorded)
    unet.set_adapters(["style"], [0.3])
    with compiled.sparse(MASK), pytest.raises(fisedit.SettingsMismatchError, match=r"LoRA: 'style' x1 .* 'style' x0.3"):
        compiled(**_scaled(inputs, 0.5))
    with compiled.record():  # the same input signature as the first record: recaptured for the new weight
        assert close(compiled(**_scaled(inputs, 0.5)).sample, unet(**_scaled(inputs, 0.5)).sample)
    unet.set_adapters(["style"], [1.0])
    with compiled.sparse(MASK), pytest.raises(fisedit.SettingsMismatchError, match="x0.3 on .* when recorded"):
        compiled(**inputs)
    with compiled.record():
        recorded = compiled(**inputs).sample
    unet.disable_lora()
    with compiled.sparse(MASK), pytest.raises(fisedit.SettingsMismatchError, match="disabled on"):
        compiled(**inputs)
    unet.enable_lora()
    with compiled.sparse(MASK):
        assert close(compiled(**inputs).sample, recorded)
    with pytest.raises(NotImplementedError, match="'ip_adapter_masks'.* only 'scale'"):
        with compiled.sparse(MASK):
            compiled(**{**inputs, "cross_attention_kwargs": {"ip_adapter_masks": [MASK]}})


@pytest.mark.slow  # dynamo traces a U-Net with PEFT layers twice: most of a minute on a CPU
@torch.no_grad()
def test_the_backend_runs_lora_layers_and_checks_their_settings(tmp_path_factory):
    """`torch.compile(unet, backend="fisedit")` over a U-Net with LoRA layers: record and sparse calls at a call
    scale equal `fisedit.compile`'s, and a sparse call after `set_adapters` changed the weights (dynamo recompiles
    its graph) is refused as by `fisedit.compile`."""
    unet = _lora_pipeline(tmp_path_factory, targets=("to_q", "to_v")).unet
    inputs, new = _scaled(unet_inputs(unet, size=SIZE), 0.5), _scaled(unet_inputs(unet, size=SIZE, seed=1), 0.5)
    dynamo = backend_matches_compile(unet, inputs, new, MASK, POLICY)
    unet.set_adapters(["style"], [0.3])
    with fisedit.sparse(dynamo, MASK), pytest.raises(fisedit.SettingsMismatchError, match="x0.3"):
        dynamo(**new)


@pytest.mark.slow  # a LoRA pipeline's session, a save and a load: most of twenty seconds
@torch.no_grad()
def test_an_edit_session_over_a_lora_pipeline(tmp_path_factory, tmp_path):
    """`pipe.load_lora_weights` before the session: the source run records the LoRA's model, an edit keeps the
    latents outside its mask bit for bit; after `pipe.set_adapters` with another weight the edit is refused with the
    reason and the session stays usable; a saved session keeps the LoRA settings it was recorded under."""
    pipe = _lora_pipeline(tmp_path_factory)
    session = fisedit.EditSession(pipe, num_inference_steps=4)
    source = session.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    plain = fisedit.EditSession(random_pipeline("sd15", latent_size=SIZE), num_inference_steps=4)
    without = plain.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    assert (source.latents - without.latents).abs().max() > 1e-2  # the LoRA is in the source run
    mask = ellipse_mask(SIZE, 0.2, grid_offset=0)
    pipe.set_adapters(["style"], [0.4])
    with pytest.raises(fisedit.SettingsMismatchError, match="LoRA"):
        session.edit("a house in the woods", mask=mask)
    pipe.set_adapters(["style"], [1.0])
    edit = session.edit("a house in the woods", mask=mask)
    assert torch.equal(edit.latents[..., ~mask], source.latents[..., ~mask])
    assert not torch.equal(edit.latents[..., mask], source.latents[..., mask])

    session.save(tmp_path / "saved")
    pipe.set_adapters(["style"], [0.5])  # the same weights (the saved fingerprint's), another adapter weight
    reopened = fisedit.EditSession.load(tmp_path / "saved", pipe)
    with pytest.raises(fisedit.SettingsMismatchError, match="LoRA: 'style' x1 on .* when recorded, 'style' x0.5"):
        reopened.edit("a red house in the woods", mask=mask)


def _ip_adapter_unet(tmp_path_factory):
    """A tiny SD 1.5 U-Net with a random IP-Adapter loaded by `pipe.load_ip_adapter` from a local file."""
    pipe = random_pipeline("sd15", latent_size=SIZE)
    folder = tmp_path_factory.mktemp("ip_adapter")
    save_random_ip_adapter(pipe.unet, folder, image_dim=IMAGE_DIM)
    pipe.load_ip_adapter(folder, subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    return pipe.unet


def _with_image_embeds(inputs: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(inputs["sample"].shape[0], 1, IMAGE_DIM, generator=g)
    return {**inputs, "added_cond_kwargs": {"image_embeds": [embeds]}}


@pytest.mark.slow  # fifteen seconds
@torch.no_grad()
def test_ip_adapter_image_tokens_keep_the_contract(tmp_path_factory):
    """An IP-Adapter's image tokens (the U-Net's image projection, a second cross-attention per layer) carry no
    pixels: record equals eager; a sparse call on the recorded inputs returns the recorded output, one with a new image
    embedding equals the masked-dense reference; a full mask with fresh statistics equals the dense call; another
    `set_ip_adapter_scale` is refused."""
    unet = _ip_adapter_unet(tmp_path_factory)
    inputs = _with_image_embeds(unet_inputs(unet, size=SIZE), 0)
    new = _with_image_embeds(unet_inputs(unet, size=SIZE, seed=1), 1)
    same_text = _with_image_embeds(inputs, 1)
    assert (unet(**same_text).sample - unet(**inputs).sample).abs().max() > 1e-2  # the image prompt matters
    compiled = fisedit.compile(unet, POLICY)
    with compiled.record():
        recorded = compiled(**inputs).sample
    assert close(recorded, unet(**inputs).sample)
    with compiled.sparse(MASK):
        assert close(compiled(**inputs).sample, recorded)
        assert close(compiled(**same_text).sample, reference_sparse_call(unet, inputs, same_text, MASK, POLICY))
        assert close(compiled(**new).sample, reference_sparse_call(unet, inputs, new, MASK, POLICY))

    fresh = fisedit.compile(unet, fisedit.Policy(block_size=4, norm_stats="fresh"))
    with fresh.record():
        fresh(**inputs)
    with fresh.sparse(torch.ones(SIZE, SIZE, dtype=torch.bool)):
        assert close(fresh(**new).sample, unet(**new).sample)

    for processor in unet.attn_processors.values():  # what pipe.set_ip_adapter_scale(0.5) does
        if hasattr(processor, "scale"):
            processor.scale = [0.5]
    with compiled.sparse(MASK), pytest.raises(fisedit.SettingsMismatchError, match=r"IP-Adapter scales: scale \(1.0,\)"):
        compiled(**inputs)


def _intrablock(adapter, batch: int, seed: int) -> list[torch.Tensor]:
    """The T2I-Adapter's residuals of a seeded noise picture (a list: the U-Net pops them as it goes)."""
    g = torch.Generator().manual_seed(seed)
    return list(adapter(torch.rand(batch, 3, 8 * SIZE, 8 * SIZE, generator=g)))


@torch.no_grad()
def test_t2i_adapter_residuals_are_pixel_inputs_of_sparse_calls():
    """`down_intrablock_additional_residuals` (a T2I-Adapter's features, added inside each down block) are maps
    gathered where a region reads them: record equals eager; a sparse call on the recorded inputs returns the
    recorded output; with new residuals the output is the recorded one outside the active pixels and takes the new
    residuals inside; a full mask with fresh statistics equals the dense call."""
    pipe = random_pipeline("sd15", latent_size=SIZE)
    unet, adapter = pipe.unet, random_t2i_adapter(pipe.unet)
    base = unet_inputs(unet, size=SIZE)

    def call(model, residuals):
        return model(**base, down_intrablock_additional_residuals=[r.clone() for r in residuals]).sample

    old, new = _intrablock(adapter, 1, 0), _intrablock(adapter, 1, 1)
    assert (call(unet, old) - unet(**base).sample).abs().max() > 1e-2  # the residuals matter
    compiled = fisedit.compile(unet, POLICY)
    with compiled.record():
        recorded = call(compiled, old)
    assert close(recorded, call(unet, old))
    with compiled.sparse(MASK):
        assert close(call(compiled, old), recorded)
        edited = call(compiled, new)
        active = compiled.active_pixels()
    assert torch.equal(edited[..., ~active], recorded[..., ~active])
    assert (edited[..., active] - recorded[..., active]).abs().max() > 1e-3

    fresh = fisedit.compile(unet, fisedit.Policy(block_size=4, norm_stats="fresh"))
    with fresh.record():
        call(fresh, old)
    with fresh.sparse(torch.ones(SIZE, SIZE, dtype=torch.bool)):
        assert close(call(fresh, new), call(unet, new))


@functools.lru_cache(maxsize=None)
def _control_picture(seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(8 * SIZE, 8 * SIZE, 3, generator=g) * 255).to(torch.uint8).numpy())


@torch.no_grad()
def test_an_edit_session_over_a_t2i_adapter_pipeline():
    """`StableDiffusionAdapterPipeline`: `generate` takes the control image its adapter follows, an edit keeps the
    latents outside its mask bit for bit and may change the control image inside the mask only, like a ControlNet
    pipeline's."""
    import numpy as np
    from PIL import Image

    base = random_pipeline("sd15", latent_size=SIZE)
    pipe = t2i_adapter_pipeline(base, random_t2i_adapter(base.unet))
    session = fisedit.EditSession(pipe, num_inference_steps=4)
    with pytest.raises(ValueError, match="has a T2I-Adapter: pass generate"):
        session.generate("a cabin")
    control = _control_picture(0)
    source = session.generate("a cabin", generator=torch.Generator().manual_seed(0), control_image=control)
    # nothing to change: the detected region is empty and the pipeline (one with the legacy `callback`) stops early
    unchanged = session.edit("a cabin")
    assert unchanged.region is None and torch.equal(unchanged.latents, source.latents)
    assert unchanged.stats["dense"].unet_calls < 4 and "sparse" not in unchanged.stats
    mask = ellipse_mask(SIZE, 0.2, grid_offset=0)
    edit = session.edit("a house", mask=mask, keep=False)
    assert torch.equal(edit.latents[..., ~mask], source.latents[..., ~mask])
    assert not torch.equal(edit.latents[..., mask], source.latents[..., mask])
    pixels = np.array(control)
    pixels[mask.repeat_interleave(8, 0).repeat_interleave(8, 1).numpy()] = 255  # white inside the mask
    edit = session.edit("a cabin", mask=mask, control_image=Image.fromarray(pixels))
    assert torch.equal(edit.latents[..., ~mask], source.latents[..., ~mask])
    assert not torch.equal(edit.latents[..., mask], source.latents[..., mask])
    with pytest.raises(NotImplementedError, match="has a T2I-Adapter"):
        session.save("/nonexistent")


@pytest.mark.slow  # an IP-Adapter pipeline's session: most of twenty seconds
@torch.no_grad()
def test_an_edit_session_over_an_ip_adapter_pipeline(tmp_path_factory):
    """A pipeline with an IP-Adapter: `generate` takes the image prompt (here its embedding), which the edits keep;
    a detected edit's dense steps control the prompt's cross-attention only (the image tokens' attention is not the
    prompt's: its maps have other columns), and an edit with a new image prompt and a mask keeps the latents outside
    the mask bit for bit."""
    pipe = random_pipeline("sd15", latent_size=SIZE)
    folder = tmp_path_factory.mktemp("ip_session")
    save_random_ip_adapter(pipe.unet, folder, image_dim=IMAGE_DIM)
    pipe.load_ip_adapter(folder, subfolder="", weight_name="ip_adapter.safetensors", image_encoder_folder=None)
    session = fisedit.EditSession(pipe, num_inference_steps=4)
    with pytest.raises(ValueError, match="has an IP-Adapter loaded: pass generate"):
        session.generate("a cabin in the woods")
    g = torch.Generator().manual_seed(3)
    embeds = [torch.randn(2, 1, IMAGE_DIM, generator=g)]  # (negative, positive): the CFG batch
    source = session.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0),
                              ip_adapter_image=embeds)
    detected = session.edit("a house in the woods", keep=False)  # a word swap: dense steps under control
    assert detected.stats["dense"].unet_calls > 0
    mask = ellipse_mask(SIZE, 0.2, grid_offset=0)
    other = [torch.randn(2, 1, IMAGE_DIM, generator=g)]
    edit = session.edit("a cabin in the woods", mask=mask, ip_adapter_image=other)
    assert torch.equal(edit.latents[..., ~mask], source.latents[..., ~mask])
    assert not torch.equal(edit.latents[..., mask], source.latents[..., mask])
    with pytest.raises(NotImplementedError, match="has an IP-Adapter is not supported yet: its image prompt"):
        session.save("/nonexistent")  # a reopened session would call the pipeline without it
