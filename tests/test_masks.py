"""The synthetic edit masks of `fisedit_compiler.editing.masks` (the demo's, `fisedit inspect`'s, the benchmarks'
and the tests' ellipses)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fisedit_compiler.editing.masks import coverage_mask, ellipse_mask


@pytest.mark.parametrize("fraction", [0.05, 0.15, 0.3])
def test_an_ellipse_covers_about_its_fraction_and_exactly_when_asked(fraction):
    size = 96
    mask = ellipse_mask(size, fraction)
    assert mask.dtype == torch.bool and mask.shape == (size, size)
    assert mask.float().mean().item() == pytest.approx(fraction, rel=0.05)
    exact = ellipse_mask(size, fraction, aspect=1.3, exact=True)
    assert exact.sum().item() == round(fraction * size * size)  # no ties at these sizes
    rows, cols = exact.nonzero().float().mean(dim=0) / size  # centred at 45 % / 55 % by default
    assert rows.item() == pytest.approx(0.45, abs=0.01) and cols.item() == pytest.approx(0.55, abs=0.01)


def test_an_ellipse_is_taller_than_wide_by_its_aspect():
    mask = ellipse_mask(64, 0.2, center=(0.5, 0.5), aspect=1.5)
    height, width = mask.any(dim=1).sum().item(), mask.any(dim=0).sum().item()
    assert height / width == pytest.approx(1.5, rel=0.1)


def test_a_tiny_fraction_still_marks_the_centre_pixel_and_a_bad_one_is_an_error():
    mask = ellipse_mask(8, 0.001, center=(0.5, 0.25))
    assert mask.sum() == 1 and mask[4, 2]
    for fraction in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"fraction in \(0, 1\]"):
            ellipse_mask(8, fraction)


def test_coverage_mask_keeps_the_nearest_pixels_ties_included():
    distance = torch.tensor([[3.0, 1.0], [1.0, 2.0]])
    assert coverage_mask(distance, 0.25).tolist() == [[False, True], [True, False]]  # a tie at the threshold
    assert coverage_mask(distance, 0.75).tolist() == [[False, True], [True, True]]
    assert coverage_mask(distance, 0.01).sum() == 2  # at least one pixel, and its ties


def test_a_mask_drawn_at_image_resolution_marks_the_latent_pixels_mostly_painted():
    """A latent pixel is active when most of its f x f image pixels are bright (a brush stroke's soft or ragged
    edge neither drops a mostly painted pixel nor adds one where a stray pixel was painted), whichever pixel of the
    block is the bright one."""
    from PIL import Image

    from fisedit_compiler.inputs import mask_from_image

    f, h, w = 8, 4, 6
    pixels = np.zeros((f * h, f * w), dtype=np.uint8)
    pixels[0:f, 0:f] = 255
    pixels[0:f, 0:f][f // 2, f // 2] = 0  # mostly painted, but not its centre pixel
    pixels[f:2 * f, f:2 * f][f // 2, f // 2] = 255  # only the centre pixel painted
    pixels[2 * f:3 * f, 2 * f:3 * f][: f // 2 + 1] = 255  # 5 of 8 rows painted
    pixels[3 * f:4 * f, 3 * f:4 * f][: f // 2 - 1] = 255  # 3 of 8 rows
    mask = mask_from_image(Image.fromarray(pixels), (h, w), scale_factor=f)
    want = torch.zeros(h, w, dtype=torch.bool)
    want[0, 0] = want[2, 2] = True
    assert torch.equal(mask, want)
