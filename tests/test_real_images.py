"""Editing real pictures: `EditSession.load_image` (VAE encoding, DDIM inversion with step skipping, a source run
recorded on the inversion trajectory), user masks honoured exactly on loaded images, and clear errors for what
cannot be loaded."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

import fisedit_compiler as fisedit
from fisedit_compiler.editing.inversion import ImageError, centre_crop_box, ddim_inversion, image_tensor
from fisedit_compiler.models import make_scheduler, random_pipeline

LATENT = 16
STEPS = 6
PROMPT = "a photo of a cat on a sofa"


@functools.lru_cache(maxsize=None)
def compiled_pipeline(scheduler: str = "ddim"):
    pipe = random_pipeline("sd2", latent_size=LATENT, seed=0, scheduler=scheduler)
    pipe.unet = fisedit.compile(pipe.unet, fisedit.Policy(block_size=2))
    return pipe


def session(scheduler: str = "ddim") -> fisedit.EditSession:
    return fisedit.EditSession(compiled_pipeline(scheduler), num_inference_steps=STEPS)


@functools.lru_cache(maxsize=None)
def photo() -> Image.Image:
    """A real photograph (scikit-image's), 451x300: not the session's size or aspect ratio."""
    from skimage import data

    return Image.fromarray(data.chelsea())


def encoded(s: fisedit.EditSession, image) -> torch.Tensor:
    vae = s.pipe.vae
    with torch.no_grad():
        return vae.encode(image_tensor(image, s.height, s.width)).latent_dist.mean * vae.config.scaling_factor


def box(rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    mask[rows, cols] = True
    return mask


class ConstantNoise(torch.nn.Module):
    """A stand-in U-Net whose prediction depends on the timestep only, so that DDIM steps invert exactly."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states):
        self.calls.append(int(timestep))
        g = torch.Generator().manual_seed(int(timestep))

        class Output:
            pass

        out = Output()
        out.sample = torch.randn(self.shape, generator=g)
        return out


def test_plain_ddim_inversion_is_the_exact_inverse_of_ddim_sampling():
    """skip = 1 is plain DDIM inversion: with a prediction that does not depend on the latents, the DDIM sampler
    stepping from the inverted noise with the same predictions walks the inversion back to the clean latents."""
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(10)
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unet = ConstantNoise(clean.shape)
    inversion = ddim_inversion(unet, scheduler, clean, None, scheduler.timesteps, skip=1)
    assert inversion.unet_calls == 10 and len(inversion.latents) == 11
    assert torch.equal(inversion.latents[-1], clean)
    for i, t in enumerate(scheduler.timesteps):
        stepped = scheduler.step(unet(inversion.latents[i], t, None).sample, t, inversion.latents[i]).prev_sample
        torch.testing.assert_close(stepped, inversion.latents[i + 1], rtol=1e-4, atol=1e-5)


class LinearNoise(torch.nn.Module):
    """A stand-in U-Net whose prediction depends on the latents it is given (and on the timestep)."""

    def forward(self, sample, timestep, encoder_hidden_states):
        g = torch.Generator().manual_seed(int(timestep))

        class Output:
            pass

        out = Output()
        out.sample = 0.3 * sample + torch.randn(sample.shape, generator=g)
        return out


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_inversion_walks_the_trajectory_of_diffusers_ddim_inverse_scheduler(prediction_type):
    """Every inversion step feeds the U-Net the current latents and turns its prediction (noise, or v for SD 2's
    768 models) into the next noise level as `DDIMInverseScheduler` does: the latents after each step match it."""
    from diffusers import DDIMInverseScheduler

    scheduler = make_scheduler("ddim")
    scheduler = scheduler.__class__.from_config({**scheduler.config, "prediction_type": prediction_type})
    scheduler.set_timesteps(10)
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(10)
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    inversion = ddim_inversion(LinearNoise(), scheduler, clean, None, scheduler.timesteps)
    z = clean
    for i, t in enumerate(inverse.timesteps):
        z = inverse.step(LinearNoise()(z, t, None).sample, t, z).prev_sample
        torch.testing.assert_close(inversion.latents[-2 - i], z, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("skip", [2, 3, 4])
def test_inversion_step_skipping_calls_the_unet_every_mth_step_and_reuses_its_noise(skip):
    scheduler = make_scheduler("ddim")
    scheduler.set_timesteps(10)
    clean = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unet = ConstantNoise(clean.shape)
    inversion = ddim_inversion(unet, scheduler, clean, None, scheduler.timesteps, skip=skip)
    ascending = scheduler.timesteps.flip(0).tolist()
    assert unet.calls == ascending[::skip] and inversion.unet_calls == -(-10 // skip)
    # a skipped step used the prediction of the last call: stepping back with it recovers its latents
    for n, t in enumerate(ascending):
        i = len(ascending) - 1 - n
        used = ascending[n - n % skip]
        prediction = unet(None, torch.tensor(used), None).sample
        stepped = scheduler.step(prediction, torch.tensor(t), inversion.latents[i]).prev_sample
        torch.testing.assert_close(stepped, inversion.latents[i + 1], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_a_loaded_photo_round_trips_and_a_user_mask_is_honoured_exactly():
    s = session()
    source = s.load_image(photo(), PROMPT)
    want = encoded(s, photo())
    assert torch.equal(source.latents, want) and source.mask is None
    assert source.stats["inversion"].unet_calls == STEPS and source.stats["dense"].unet_calls == STEPS
    assert source.images[0].size == (s.width, s.height)
    trajectory = s.source_trajectory
    # the same prompt, no edit: the final latents outside the mask are the encoded image's, bit for bit
    mask = box(slice(4, 10), slice(5, 12))
    same = s.edit(PROMPT, mask=mask)
    assert torch.equal(same.mask, mask)
    assert torch.equal(same.latents[..., ~mask], want[..., ~mask])
    # an edit: every step keeps the inversion trajectory outside the user's mask
    s = session()
    s.load_image(photo(), PROMPT)
    edit = s.edit("a photo of a dog on a sofa", mask=mask)
    for before, after in zip(trajectory, s.source_trajectory):
        assert torch.equal(after[..., ~mask], before[..., ~mask])
    assert not torch.equal(edit.latents[..., mask], want[..., mask])
    assert (edit.region & ~mask).any()  # halo and blocks were recomputed as context
    # continuous: a second edit builds on the first, still exact outside its mask
    again = s.edit("a photo of a dog on a red sofa", mask=box(slice(0, 6), slice(0, 6)))
    assert torch.equal(again.latents[..., ~again.mask], edit.latents[..., ~again.mask])


@torch.no_grad()
def test_a_detected_edit_of_a_loaded_image_compares_with_a_control_run_of_its_prompt():
    """Detection compares an edit's dense steps with a control run of the source prompt made at load time (the
    inversion trajectory is no run of the sampler): the unchanged prompt detects nothing and returns the source."""
    s = session()
    source = s.load_image(photo(), PROMPT)
    unchanged = s.edit(PROMPT)
    assert unchanged.mask is not None and not unchanged.mask.any()
    assert torch.equal(unchanged.latents, source.latents)
    edited = s.edit("a watercolor painting of a dog on a sofa")
    assert edited.mask.any()
    assert torch.equal(edited.latents[..., ~edited.mask], source.latents[..., ~edited.mask])


@torch.no_grad()
def test_a_saved_loaded_image_session_keeps_its_detection_reference_and_picture_size(tmp_path):
    s = session()
    source = s.load_image(photo(), PROMPT)
    s.save(tmp_path / "session")
    again = fisedit.EditSession.load(tmp_path / "session", compiled_pipeline())
    unchanged = again.edit(PROMPT)
    assert not unchanged.mask.any() and torch.equal(unchanged.latents, source.latents)
    w, h = photo().size
    drawn = np.zeros((h, w), dtype=np.uint8)
    drawn[:, : w // 2] = 255
    assert again.edit("a photo of a dog on a sofa", mask=Image.fromarray(drawn)).mask.any()


@torch.no_grad()
def test_a_mask_drawn_on_the_original_picture_is_cropped_like_it():
    s = session()
    s.load_image(photo(), PROMPT)
    w, h = photo().size
    drawn = np.zeros((h, w), dtype=np.uint8)
    left, top, right, bottom = centre_crop_box(w, h, s.width, s.height)
    drawn[top:bottom, left:left + (right - left) // 2] = 255  # the left half of what the session sees
    result = s.edit("a photo of a dog on a sofa", mask=Image.fromarray(drawn))
    assert torch.equal(result.mask, box(slice(0, LATENT), slice(0, LATENT // 2)))


def test_images_and_sessions_load_image_refuses():
    s = session()
    with pytest.raises(RuntimeError, match="generate.*or load_image"):
        s.edit("a dog")
    rgb = photo()
    for image, message in [
        (rgb.convert("L"), "'L' PIL image; load_image takes RGB"),
        (rgb.convert("RGBA"), "'RGBA' PIL image; load_image takes RGB"),
        (torch.rand(3, 32, 32) * 2, r"not all in \[0, 1\]"),
        (torch.rand(4, 32, 32), r"shape \(4, 32, 32\)"),
        ((torch.rand(3, 32, 32) * 255).to(torch.uint8), "dtype torch.uint8"),
        (np.zeros((32, 32, 3)), "ndarray"),
        (Image.new("RGB", (4, 4)), "too small"),
    ]:
        with pytest.raises(ImageError, match=message):
            s.load_image(image, PROMPT)
    s.load_image(rgb, PROMPT)
    with pytest.raises(ValueError, match=r"mask image is 7x7"):
        s.edit("a dog", mask=Image.new("L", (7, 7)))
    euler = fisedit.EditSession(random_pipeline("sd2", latent_size=LATENT, seed=0, scheduler="euler"),
                                num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="EulerDiscreteScheduler scales its latents by sigma"):
        euler.load_image(rgb, PROMPT)


@torch.no_grad()
def test_paste_back_keeps_the_pictures_pixels_outside_the_mask_and_feathers_inwards():
    mask = box(slice(4, 10), slice(5, 12))
    results = []
    for paste_back in (None, 3):
        s = session()
        s.load_image(photo(), PROMPT)
        results.append(s.edit("a photo of a dog on a sofa", mask=mask, paste_back=paste_back))
    plain, pasted = results
    assert torch.equal(plain.latents, pasted.latents)  # pasting is after decoding only
    picture = ((image_tensor(photo(), 128, 128)[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    inside = np.kron(mask.numpy(), np.ones((8, 8), dtype=bool))
    deep = np.kron(box(slice(5, 9), slice(6, 11)).numpy(), np.ones((8, 8), dtype=bool))  # >= 8 pixels in
    got, edited = np.asarray(pasted.images[0]), np.asarray(plain.images[0])
    assert np.array_equal(got[~inside], picture[~inside])
    assert np.array_equal(got[deep], edited[deep])
    assert not np.array_equal(got[inside & ~deep], edited[inside & ~deep])  # the feathered rim
    with pytest.raises(ValueError, match="paste_back is a feather width"):
        s.edit("a photo of a dog", mask=mask, paste_back=-1)


def test_feathered_alpha_rises_from_the_mask_border_inwards():
    from fisedit_compiler.editing.compositing import feathered_alpha

    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:4] = True  # touches the right border
    alpha = feathered_alpha(mask, (32, 32), feather=4)
    inside = np.kron(mask.numpy(), np.ones((8, 8), dtype=bool))
    assert (alpha.numpy()[~inside] == 0).all()
    assert alpha[8, 16] == pytest.approx(0.25) and alpha[11, 16] == 1 and alpha[12, 31] == 1  # border counts in
    assert (alpha.numpy()[inside] > 0).all()


@torch.no_grad()
def test_inversion_step_skipping_is_the_sessions_policy_even_on_a_compiled_pipeline():
    pipe = random_pipeline("sd2", latent_size=LATENT, seed=0)
    fisedit.EditSession(pipe, num_inference_steps=STEPS)  # compiles pipe.unet with the default policy
    s = fisedit.EditSession(pipe, policy=fisedit.Policy(inversion_skip=4), num_inference_steps=STEPS)
    assert s.policy.inversion_skip == 4 and pipe.unet is s.unet
    assert s.load_image(photo(), PROMPT).stats["inversion"].unet_calls == 2  # steps 0 and 4 of 6


@functools.lru_cache(maxsize=None)
def inpainting_pipeline():
    pipe = random_pipeline("sd15", latent_size=LATENT, seed=0, inpainting=True)
    pipe.unet = fisedit.compile(pipe.unet, fisedit.Policy(block_size=2))
    return pipe


@torch.no_grad()
def test_an_inpainting_session_gives_the_unet_the_users_mask_and_keeps_the_picture_outside_it():
    """Over a `StableDiffusionInpaintPipeline` the inversion and the recorded source run see an empty mask and the
    whole picture; an edit sees the user's mask and the picture blanked inside it (the U-Net's channels 4 and
    5..8), and its latents outside the mask are the encoded picture's, bit for bit."""
    s = fisedit.EditSession(inpainting_pipeline(), num_inference_steps=STEPS)
    calls = []
    hook = s.unet.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        kwargs.get("sample", args[0] if args else None).clone()), with_kwargs=True)
    try:
        source = s.load_image(photo(), PROMPT)
        loaded = len(calls)
        mask = box(slice(4, 10), slice(5, 12))
        edit = s.edit("a photo of a dog on a sofa", mask=mask)
    finally:
        hook.remove()
    want = encoded(s, photo())
    assert torch.equal(source.latents, want) and torch.equal(edit.latents[..., ~mask], want[..., ~mask])
    assert not torch.equal(edit.latents[..., mask], want[..., mask])
    # the conditioning picture is the one the session shows and pastes back: the crop rounded to 8 bits
    picture = ((image_tensor(photo(), s.height, s.width)[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8)
    pixels = image_tensor(Image.fromarray(picture.numpy()), s.height, s.width)
    vae = s.pipe.vae
    picture_latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    for sample in calls[:loaded]:
        assert not sample[:, 4].any()
        torch.testing.assert_close(sample[:, 5:], picture_latents.expand(len(sample), -1, -1, -1))
    blanked = pixels * ~torch.from_numpy(np.kron(mask.numpy(), np.ones((8, 8), dtype=bool)))
    blanked_latents = vae.encode(blanked).latent_dist.mean * vae.config.scaling_factor
    assert len(calls) == loaded + STEPS
    for sample in calls[loaded:]:
        assert torch.equal(sample[:, 4].bool(), mask.expand(2, -1, -1))
        torch.testing.assert_close(sample[:, 5:], blanked_latents.expand(2, -1, -1, -1))


@torch.no_grad()
def test_a_full_mask_inpainting_edit_is_the_inpainting_pipelines_own_run():
    """A mask covering everything leaves nothing to reuse: the edit runs dense, and is what the diffusers inpainting
    pipeline computes from the same noise with that mask (the picture's latents given as the VAE's mean)."""
    s = fisedit.EditSession(inpainting_pipeline(), num_inference_steps=STEPS)
    s.load_image(photo(), PROMPT)
    noise = s.source_trajectory[0]  # after the first step; the run starts from the session's initial latents
    start = s._latents.clone()
    full = torch.ones(LATENT, LATENT, dtype=torch.bool)
    edit = s.edit("a photo of a dog on a sofa", mask=full)
    vae = s.pipe.vae
    blank = vae.encode(torch.zeros(1, 3, s.height, s.width)).latent_dist.mean * vae.config.scaling_factor
    with s.unet.run(None):
        want = s.pipe("a photo of a dog on a sofa", image=photo().crop((0, 0, s.width, s.height)),
                      mask_image=Image.new("L", (s.width, s.height), 255), masked_image_latents=blank,
                      latents=start, num_inference_steps=STEPS, guidance_scale=7.5, height=s.height,
                      width=s.width, output_type="latent").images
    assert noise.shape == want.shape
    torch.testing.assert_close(edit.latents, want, rtol=1e-4, atol=1e-4)


def test_inpainting_sessions_refuse_what_an_inpainting_model_cannot_do():
    s = fisedit.EditSession(inpainting_pipeline(), num_inference_steps=STEPS)
    with pytest.raises(ValueError, match="call load_image"):
        s.generate(PROMPT)
    s.load_image(photo(), PROMPT)
    with pytest.raises(ValueError, match="pass edit\\(prompt, mask=...\\)"):
        s.edit("a photo of a dog on a sofa")
    plain = random_pipeline("sd15", latent_size=LATENT, seed=0)
    plain.unet = inpainting_pipeline().unet
    with pytest.raises(ValueError, match="9 input channels.*StableDiffusionInpaintPipeline"):
        fisedit.EditSession(plain, num_inference_steps=STEPS)


@pytest.mark.parametrize("size", [(48, 32), (32, 48)])
def test_a_mask_drawn_on_the_original_picture_is_cropped_as_the_picture_is(size):
    """A mask the size of the picture given to `load_image` lands on the same pixels as what it was drawn over,
    for a session wider or taller than square."""
    from fisedit_compiler.editing.inversion import crop_mask_like_image

    width, height = size
    picture = np.zeros((300, 451), dtype=np.uint8)
    picture[120:170, 180:260] = 255
    cropped = image_tensor(Image.fromarray(picture).convert("RGB"), height, width)[0, 0] > 0
    mask = crop_mask_like_image(Image.fromarray(picture), (451, 300), height, width)
    assert mask.size == (width, height)
    marked = torch.from_numpy(np.asarray(mask) > 127)
    assert marked.any() and (marked & cropped).sum() >= 0.9 * (marked | cropped).sum()
