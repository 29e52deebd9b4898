"""The VAE decoder compiled like the U-Net (`adapters.vae_decoder`) and an edit's image decoded around the latents
that changed (`editing.decoding`): outside the recomputed region the image is the recorded one, bit for bit."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

import fisedit_compiler as fisedit
from conftest import close
from fisedit_compiler.models import random_pipeline, random_vae

LATENT = 16
POLICY = fisedit.Policy(block_size=2)


@functools.lru_cache(maxsize=None)
def _vae():
    """SD 2's VAE block types (four levels, a mid-block attention at latent resolution), few channels."""
    return random_vae("sd2", "tiny", seed=0, sample_size=8 * LATENT)


def _latents(seed: int) -> torch.Tensor:
    return torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def _box(top: int, left: int, size: int) -> torch.Tensor:
    mask = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    mask[top: top + size, left: left + size] = True
    return mask


@torch.no_grad()
def test_a_recorded_decode_equals_the_eager_decoder_and_a_sparse_one_of_the_same_latents_reproduces_it():
    """Every resolution of the decoder is finer than or equal to the latents' (up to the image's, 8x): a sparse
    decode of the latents it recorded recomputes the region's blocks at each and must give the recorded image back,
    up to float rounding inside the region and bit for bit outside it. A wrong gather at an upsampled resolution,
    or the attention block's token GroupNorm with wrong statistics, gives errors of the image's scale."""
    vae = _vae()
    decoder = fisedit.compile(vae.decoder, POLICY)
    z = vae.post_quant_conv(_latents(0))
    eager = vae.decoder(z)
    with decoder.record():
        recorded = decoder(z)
    assert torch.equal(recorded, eager)
    mask = _box(5, 3, 4)
    with decoder.sparse(mask):
        again = decoder(z)
        plan = decoder.current_run.plan
    region = plan.active_pixels(tuple(again.shape[-2:]))
    assert 0 < region.float().mean() < 0.5
    assert close(again, recorded)
    assert torch.equal(again[..., ~region], recorded[..., ~region])


@torch.no_grad()
def test_a_sparse_decode_of_changed_latents_matches_the_dense_decode_inside_the_change():
    """Latents changed inside a box: the sparse decode is the recorded image outside its region and close to the
    dense decode of the new latents inside the box (the approximations are a sparse U-Net call's: recorded
    GroupNorm statistics, context from the recorded decode beyond the halo)."""
    vae = _vae()
    decoder = fisedit.compile(vae.decoder, fisedit.Policy(block_size=2, halo=2))
    z = vae.post_quant_conv(_latents(0))
    mask = _box(6, 6, 4)
    changed = torch.where(mask, vae.post_quant_conv(_latents(1)), z)
    with decoder.record():
        source = decoder(z)
    with decoder.sparse(mask):
        sparse = decoder(changed)
        region = decoder.current_run.plan.active_pixels(tuple(sparse.shape[-2:]))
    dense = vae.decoder(changed)
    assert torch.equal(sparse[..., ~region], source[..., ~region])
    inside = torch.kron(mask, torch.ones(8, 8, dtype=torch.bool))
    error = ((sparse - dense)[..., inside] ** 2).mean().item()
    scale = (dense[..., inside] ** 2).mean().item()
    # Measured 19.5 dB (26.8 with halo 4); keeping the source image there gives -0.3 dB.
    assert 10 * math.log10(scale / error) > 15


def test_a_spatially_conditioned_decoder_call_is_refused_by_name():
    vae = _vae()
    decoder = fisedit.compile(vae.decoder, POLICY)
    z = _latents(0)
    with pytest.raises(NotImplementedError, match="latent_embeds"):
        with decoder.record():
            decoder(z, latent_embeds=torch.zeros(1, 4, LATENT, LATENT))


@torch.no_grad()
def test_the_decoder_s_halo_is_one_cell_of_each_map_not_one_latent_pixel():
    """The session's decoder keeps a halo of one cell of each of its maps (all as fine as the latents or finer),
    whatever the U-Net's halo unit: one changed latent pixel recomputes its 8x8 image pixels and a one-pixel ring,
    not the 24x24 pixels of the latent pixel dilated by one latent pixel (the U-Net's default unit)."""
    from fisedit_compiler.editing.decoding import SparseDecoder

    vae = random_vae("sd2", "tiny", seed=0, sample_size=8 * LATENT)
    decoder = SparseDecoder(vae, fisedit.Policy(block_size=1, halo_unit="latent_pixels"))
    z = _latents(0)
    changed = z.clone()
    changed[..., 7, 9] += 1.0
    with decoder.steering():
        vae.decode(z)
    with decoder.steering():
        vae.decode(changed)
    assert decoder.last.mode == "sparse"
    expected = torch.zeros(8 * LATENT, 8 * LATENT, dtype=torch.bool)
    expected[8 * 7 - 1: 8 * 8 + 1, 8 * 9 - 1: 8 * 10 + 1] = True
    assert torch.equal(decoder.last.region, expected)


def test_the_cost_model_prices_each_decoder_map_at_its_own_width():
    """SD's VAE decoder widens as its maps shrink: 128 channels at the image's resolution (8x the latents'), 256
    at 4x, 512 at 2x and 1x. A mask plan looks each map's width up by its downscale factor (below 1 here)."""
    from fractions import Fraction

    vae = random_vae("sd15", "full", seed=0, sample_size=64)  # SD's widths, a small image (weights untouched)
    decoder = fisedit.compile(vae.decoder, POLICY)
    widths = decoder.adapter.channels()
    assert widths == {Fraction(1): 512, Fraction(1, 2): 512, Fraction(1, 4): 256, Fraction(1, 8): 128}
    plan = decoder.mask_plan(torch.ones(8, 8, dtype=torch.bool))
    assert plan.channels.get(Fraction(8, 64)) == 128 and plan.channels.get(Fraction(8, 8)) == 512


@functools.lru_cache(maxsize=None)
def _pipeline():
    return random_pipeline("sd2", latent_size=LATENT, seed=0, scheduler="ddim")


def _session(**options) -> fisedit.EditSession:
    return fisedit.EditSession(_pipeline(), POLICY, num_inference_steps=4, **options)


@torch.no_grad()
def test_an_edit_decodes_only_around_its_region_and_keeps_the_source_image_elsewhere():
    """generate records the decode; a user-mask edit decodes sparse (its stats say so) and its picture is the
    source picture outside the decode's region, bit for bit; a continuous edit builds on the edit's picture."""
    s = _session()
    source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    assert source.stats["decode"].mode == "record"
    edit = s.edit("a red cabin in the woods", mask=_box(2, 3, 4))
    decode = edit.stats["decode"]
    assert decode.mode == "sparse" and 0 < decode.recomputed < 0.5
    before, after = np.asarray(source.images[0]), np.asarray(edit.images[0])
    region = decode.region.numpy()
    assert np.array_equal(before[~region], after[~region])
    assert not np.array_equal(before[region], after[region])
    # The picture inside is the decode of the edit's latents (up to the sparse decode's approximations).
    dense = _pipeline().vae.decode(edit.latents / _pipeline().vae.config.scaling_factor).sample
    dense = _pipeline().image_processor.postprocess(dense, output_type="np")[0]
    box = np.kron(edit.mask.numpy(), np.ones((8, 8), dtype=bool))
    error = np.mean((after[box] / 255.0 - dense[box]) ** 2)
    assert 10 * math.log10(1 / error) > 45  # measured 53.6 dB
    second = s.edit("a red cabin in the snowy woods", mask=_box(10, 9, 3))
    region2 = second.stats["decode"].region.numpy()
    assert second.stats["decode"].mode == "sparse"
    assert np.array_equal(after[~region2], np.asarray(second.images[0])[~region2])


@torch.no_grad()
def test_without_sparse_decode_the_decoder_is_the_pipelines_own(tmp_path):
    pipe = random_pipeline("sd2", latent_size=LATENT, seed=0, scheduler="ddim")
    s = fisedit.EditSession(pipe, POLICY, num_inference_steps=4, sparse_decode=False)
    assert type(pipe.vae.decoder).__name__ == "Decoder"
    source = s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    assert "decode" not in source.stats and "decode" not in s.memory_breakdown()


@torch.no_grad()
def test_a_loaded_session_records_its_first_decode(tmp_path):
    """A saved session holds no decode: the first edit after loading decodes densely and records, the next one is
    sparse again."""
    s = _session()
    s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    s.save(tmp_path / "session")
    loaded = fisedit.EditSession.load(tmp_path / "session", _pipeline())
    first = loaded.edit("a red cabin in the woods", mask=_box(2, 3, 4))
    assert first.stats["decode"].mode == "record"
    second = loaded.edit("a red cabin in the snowy woods", mask=_box(10, 9, 3))
    assert second.stats["decode"].mode == "sparse"


@torch.no_grad()
def test_a_latent_pixel_counts_as_changed_when_any_of_its_channels_changed():
    """The decode after a recorded one recomputes around every pixel of the decoder's input that differs in any
    channel: the image changes there and the region holds it."""
    from fisedit_compiler.editing.decoding import SparseDecoder

    vae = random_vae("sd2", "tiny", seed=0, sample_size=8 * LATENT)
    decoder = SparseDecoder(vae, POLICY)
    z = vae.post_quant_conv(_latents(0))
    with decoder.steering():
        recorded = vae.decoder(z)
    assert decoder.last.mode == "record"
    moved = z.clone()
    moved[0, 2, 4, 11] += 2.0  # one channel of one pixel
    with decoder.steering():
        sparse = vae.decoder(moved)
    assert decoder.last.mode == "sparse" and 0 < decoder.last.recomputed < 0.5
    pixel = torch.zeros(LATENT, LATENT, dtype=torch.bool)
    pixel[4, 11] = True
    inside = torch.kron(pixel, torch.ones(8, 8, dtype=torch.bool))
    assert decoder.last.region[inside].all()
    assert (sparse - recorded)[..., inside].abs().amax() > 1e-3


@torch.no_grad()
def test_a_recording_decode_lets_the_old_record_go_before_it_records(tmp_path):
    """A decode that records anew (a new generation) never holds the old record beside the one it is making: when
    the new record is started, the decoder's store holds nothing."""
    import fisedit_compiler as fisedit
    from fisedit_compiler.models import random_pipeline
    from fisedit_compiler.runtime.cache import RecordCache

    pipe = random_pipeline("sd2", latent_size=16, seed=0)
    s = fisedit.EditSession(pipe, fisedit.Policy(block_size=2, cache_budget=1 << 30, cache_dir=str(tmp_path)),
                            num_inference_steps=3)
    s.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    cache = s.decoding.cache
    assert cache.store.resident_nbytes > 0
    held = []
    new_step = RecordCache.new_step

    def spied(self, *args, **kwargs):
        if self is cache:
            held.append(self.store.resident_nbytes)
        return new_step(self, *args, **kwargs)

    RecordCache.new_step = spied
    try:
        s.generate("a red cabin in the snowy woods", generator=torch.Generator().manual_seed(1))
    finally:
        RecordCache.new_step = new_step
    assert held == [0] and cache.store.resident_nbytes > 0
