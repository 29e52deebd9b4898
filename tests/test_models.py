"""Tests of fisedit_compiler.models: seeded random-weight diffusers components.

Everything runs on tiny configs on the CPU; the full configs are only built on the
meta device (no memory, no compute) to check that diffusers accepts them and that
they have the real checkpoints' parameter counts.
"""

from __future__ import annotations

import json
import random
import string

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from fisedit_compiler.models import (
    ARCHS,
    SCHEDULERS,
    _WORDS,
    example_unet_inputs,
    load_pipeline,
    make_scheduler,
    random_pipeline,
    random_tokenizer,
    random_unet,
    text_encoder_configs,
    unet_config,
)

LATENT = 16
PROMPT = "a cabin in the woods with a river at night"


@pytest.fixture(scope="module")
def pipelines() -> dict:
    """One tiny pipeline per arch, shared by the tests of this module (building is the slow part)."""
    return {arch: random_pipeline(arch, latent_size=LATENT, seed=0) for arch in ARCHS}


# --------------------------------------------------------------------------- configs


def test_archs() -> None:
    assert ARCHS == ("sd15", "sd2", "sdxl")


def test_full_sd2_config_values() -> None:
    cfg = unet_config("sd2", "full")
    assert tuple(cfg["block_out_channels"]) == (320, 640, 1280, 1280)
    assert cfg["cross_attention_dim"] == 1024
    assert cfg["use_linear_projection"] is True
    assert tuple(cfg["attention_head_dim"]) == (5, 10, 20, 20)
    assert cfg["sample_size"] == 96
    assert cfg["layers_per_block"] == 2


def test_full_sd15_and_sdxl_config_values() -> None:
    sd15 = unet_config("sd15", "full")
    assert sd15["cross_attention_dim"] == 768 and sd15["attention_head_dim"] == 8
    assert sd15["use_linear_projection"] is False
    sdxl = unet_config("sdxl", "full")
    assert tuple(sdxl["block_out_channels"]) == (320, 640, 1280)
    assert tuple(sdxl["transformer_layers_per_block"]) == (1, 2, 10)
    assert sdxl["down_block_types"][0] == "DownBlock2D"
    assert sdxl["addition_embed_type"] == "text_time"
    assert sdxl["projection_class_embeddings_input_dim"] == 2816
    assert sdxl["addition_time_embed_dim"] == 256
    assert sdxl["cross_attention_dim"] == 2048


# Parameter counts of the released U-Nets (SD 1.5, SD 2.1, SDXL base 1.0): matching
# them exactly is a strong check that the full configs are the real ones.
@pytest.mark.parametrize(
    "arch, n_params", [("sd15", 859_520_964), ("sd2", 865_910_724), ("sdxl", 2_567_463_684)]
)
def test_full_config_accepted_by_diffusers(arch: str, n_params: int) -> None:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(arch, "full"))
    assert sum(p.numel() for p in unet.parameters()) == n_params


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_config_mirrors_full(arch: str) -> None:
    full, tiny = unet_config(arch, "full"), unet_config(arch, "tiny")
    for key in ("down_block_types", "up_block_types", "mid_block_type", "use_linear_projection",
                "upcast_attention", "addition_embed_type"):
        assert tiny.get(key) == full.get(key), key
    assert len(tiny["block_out_channels"]) == len(full["block_out_channels"])
    assert tiny["norm_num_groups"] == 8 and tiny["layers_per_block"] == 1
    heads = tiny["attention_head_dim"]
    heads = heads if isinstance(heads, tuple) else (heads,) * len(tiny["block_out_channels"])
    for channels, n_heads in zip(tiny["block_out_channels"], heads):
        assert channels % n_heads == 0 and channels % tiny["norm_num_groups"] == 0
    if arch == "sdxl":
        assert set(tiny["transformer_layers_per_block"]) == {1}


def test_unet_config_returns_fresh_copy_and_rejects_unknown() -> None:
    cfg = unet_config("sd15", "tiny")
    cfg["cross_attention_dim"] = 999
    assert unet_config("sd15", "tiny")["cross_attention_dim"] == 32
    with pytest.raises(ValueError, match="sd3"):
        unet_config("sd3", "tiny")
    with pytest.raises(ValueError, match="huge"):
        unet_config("sd2", "huge")


def test_sdxl_text_encoders_match_unet() -> None:
    for size in ("tiny", "full"):
        unet = unet_config("sdxl", size)
        te1, te2 = text_encoder_configs("sdxl", size)
        assert te1["hidden_size"] + te2["hidden_size"] == unet["cross_attention_dim"]
        assert (te2["projection_dim"] + 6 * unet["addition_time_embed_dim"]
                == unet["projection_class_embeddings_input_dim"])
    for arch in ("sd15", "sd2"):
        for size in ("tiny", "full"):
            (te,) = text_encoder_configs(arch, size)
            assert te["hidden_size"] == unet_config(arch, size)["cross_attention_dim"]


# --------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_unet_runs(arch: str) -> None:
    unet = random_unet(arch, "tiny", seed=0)
    assert not unet.training
    inputs = example_unet_inputs(unet, timestep=torch.linspace(10, 500, 2).long())
    with torch.no_grad():
        out = unet(**inputs).sample
    assert out.shape == (2, 4, 32, 32)
    assert torch.isfinite(out).all()
    assert out.abs().mean() > 1e-2, "random U-Net output is (near) zero"
    assert out.std() > 1e-2, "random U-Net output is constant"
    # the two batch elements (different noise, timestep, text) must give different outputs
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_no_zero_initialised_layers(arch: str) -> None:
    unet = random_unet(arch, "tiny", seed=0)
    zero = [name for name, p in unet.named_parameters() if not p.detach().abs().sum() > 0]
    assert zero == []
    assert unet.conv_out.weight.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_unet_seeding(arch: str) -> None:
    a = random_unet(arch, "tiny", seed=0).state_dict()
    b = random_unet(arch, "tiny", seed=0).state_dict()
    c = random_unet(arch, "tiny", seed=1).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a if a[k].numel() > 1)


def test_unet_does_not_disturb_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    random_unet("sd15", "tiny", seed=5)
    assert torch.equal(torch.rand(4), expected)


def test_unet_dtype() -> None:
    unet = random_unet("sd2", "tiny", seed=0, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in unet.parameters())
    ref = random_unet("sd2", "tiny", seed=0)
    assert torch.equal(unet.conv_in.weight, ref.conv_in.weight.to(torch.bfloat16))


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_whole_words_and_round_trip() -> None:
    tok = random_tokenizer()
    assert tok.model_max_length == 77
    tokens = tok.tokenize(PROMPT)
    assert tokens == [w + "</w>" for w in PROMPT.split()]
    ids = tok(PROMPT).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    # every listed word is a single token
    for word in set(_WORDS):
        assert tok.tokenize(word) == [word + "</w>"], word
    assert tok.decode(tok("A  Cabin\tIN the Woods").input_ids, skip_special_tokens=True) == "a cabin in the woods"


def test_tokenizer_arbitrary_ascii() -> None:
    tok = random_tokenizer()
    rng = random.Random(0)
    visible = string.ascii_letters + string.digits + string.punctuation + " "
    for _ in range(50):
        text = "".join(rng.choice(visible) for _ in range(rng.randint(1, 60)))
        ids = tok(text).input_ids
        # unk is <|endoftext|>: it must only appear as the final eos
        assert tok.eos_token_id not in ids[1:-1], text
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert decoded.replace(" ", "") == text.lower().replace(" ", ""), text
    # every ASCII character, control characters included, and non-ASCII never fail
    everything = "".join(chr(i) for i in range(128)) + " naïve café 日本 🙂"
    batch = tok([everything, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 77)
    assert int(batch.input_ids.max()) < len(tok)


# --------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_runs_latent_and_pil(pipelines: dict, arch: str) -> None:
    pipe = pipelines[arch]
    expected_cls = StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline
    assert isinstance(pipe, expected_cls)
    assert pipe.unet.config.sample_size == LATENT
    generator = torch.Generator().manual_seed(0)
    latents = pipe(PROMPT, num_inference_steps=2, height=8 * LATENT, width=8 * LATENT,
                   output_type="latent", generator=generator).images
    assert latents.shape == (1, 4, LATENT, LATENT)
    assert torch.isfinite(latents).all()
    image = pipe("a cabin in the woods", num_inference_steps=2, output_type="pil").images[0]
    assert image.size == (8 * LATENT, 8 * LATENT)


def test_sdxl_empty_prompt_and_batch(pipelines: dict) -> None:
    pipe = pipelines["sdxl"]
    assert pipe.config.force_zeros_for_empty_prompt
    latents = pipe(["", "a river"], num_inference_steps=2, output_type="latent").images
    assert latents.shape == (2, 4, LATENT, LATENT)
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize(
    "name, cls",
    [("ddim", DDIMScheduler), ("dpm", DPMSolverMultistepScheduler), ("pndm", PNDMScheduler),
     ("euler", EulerDiscreteScheduler)],
)
def test_scheduler_choice(name: str, cls: type) -> None:
    scheduler = make_scheduler(name)
    assert type(scheduler) is cls
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.config.beta_start == 0.00085 and scheduler.config.beta_end == 0.012
    if name == "dpm":
        assert scheduler.config.algorithm_type == "dpmsolver++"
    if name == "pndm":
        assert scheduler.config.skip_prk_steps


@pytest.mark.parametrize("name", SCHEDULERS)
def test_pipeline_with_each_scheduler(name: str) -> None:
    pipe = random_pipeline("sd15", latent_size=8, scheduler=name)
    assert type(pipe.scheduler) is type(make_scheduler(name))
    latents = pipe("a cat", num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_unknown_scheduler() -> None:
    with pytest.raises(ValueError, match="lms"):
        make_scheduler("lms")


def test_pipeline_seeding() -> None:
    a = random_pipeline("sd2", latent_size=8, seed=3)
    b = random_pipeline("sd2", latent_size=8, seed=3)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    # the pipeline's U-Net is exactly random_unet with the same seed
    ref = random_unet("sd2", "tiny", seed=3).state_dict()
    assert all(torch.equal(ref[k], a.unet.state_dict()[k]) for k in ref)


# --------------------------------------------------------------------------- load_pipeline


@pytest.mark.parametrize("arch", ARCHS)
def test_load_pipeline_round_trip(pipelines: dict, arch: str, tmp_path) -> None:
    pipe = pipelines[arch]
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(tmp_path)
    assert type(loaded) is type(pipe)
    kwargs = {"num_inference_steps": 2, "output_type": "latent"}
    want = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    got = loaded(PROMPT, generator=torch.Generator().manual_seed(0), **kwargs).images
    for name, component in pipe.components.items():  # the same weights, bit for bit
        if isinstance(component, torch.nn.Module):
            have = loaded.components[name].state_dict()
            assert all(torch.equal(have[k], v) for k, v in component.state_dict().items()), name
    # the same computation: not always the same bits, since the CPU kernels oneDNN and BLAS pick may depend on where
    # a weight lies in memory (a reloaded tiny SDXL pipeline's latents differed by 1.8e-5 on an AMD EPYC)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_load_pipeline_missing_folder(tmp_path) -> None:
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_pipeline(missing)


def test_load_pipeline_empty_folder(tmp_path) -> None:
    with pytest.raises((FileNotFoundError, ValueError), match="model_index.json") as err:
        load_pipeline(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_load_pipeline_missing_unet(tmp_path) -> None:
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="unet/") as err:
        load_pipeline(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_load_pipeline_malformed_index(tmp_path) -> None:
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_index.json") as err:
        load_pipeline(tmp_path)
    assert str(tmp_path) in str(err.value)
