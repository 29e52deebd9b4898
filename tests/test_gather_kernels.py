"""The reference gather kernel and mask plans against naive per-pixel loops."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fisedit_compiler.ir import ActivePixels, ConvWindows, FullImage, SpatialLayout, Upsampled, concatenated
from fisedit_compiler.kernels import reference
from fisedit_compiler.policy import Policy
from fisedit_compiler.runtime.mask_plan import MaskPlan


def random_mask(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(h, w, generator=g) < 0.08


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("block", [1, 2, 4])
def test_layout_covers_the_dilated_mask_with_blocks(seed, block):
    mask = random_mask(16, 12, seed)
    plan = MaskPlan(mask, Policy(block_size=block, halo=1))
    for res in [(16, 12), (8, 6), (4, 3)]:
        layout = plan.layout(res)
        active = plan.active_map(res)
        covered = plan.active_pixels(res)
        assert covered[active].all()
        b = layout.block
        assert res[0] % b == 0 and res[1] % b == 0
        # every block holds at least one active cell
        for by, bx in layout.blocks.tolist():
            assert active[by * b:(by + 1) * b, bx * b:(bx + 1) * b].any()


def test_a_plan_memoises_what_it_builds():
    plan = MaskPlan(random_mask(16, 12, 0), Policy(block_size=2))
    spec = ConvWindows((16, 12), (8, 6), (3, 3), (2, 2), (1, 1), (1, 1))
    assert plan.active_map((8, 6)) is plan.active_map([8, 6])
    assert plan.layout((8, 6)) is plan.layout([8, 6])
    assert plan.gather_index(spec, True) is plan.gather_index(spec, from_gathered=True)
    assert plan.gather_index(spec, False) is not plan.gather_index(spec, True)
    assert plan.gather_indices_built == 2
    assert MaskPlan(random_mask(16, 12, 0), Policy(block_size=2)).gather_indices_built == 0  # nothing shared


def test_dropped_plans_are_freed():
    """Memoised layouts and indices live on the plan: once dropped, a plan and its tensors are freed (a cache on
    the class would keep every plan alive)."""
    refs = []
    for seed in range(3):
        plan = MaskPlan(random_mask(16, 12, seed), Policy(block_size=2))
        plan.active_pixels((16, 12))
        plan.gather_index(ConvWindows((16, 12), (8, 6), (3, 3), (2, 2), (1, 1), (1, 1)), True)
        plan.gather_index(FullImage((8, 6)), True)
        refs.append((weakref.ref(plan), weakref.ref(plan.layout((8, 6)).pixel_to_gathered)))
        del plan
    gc.collect()
    assert all(plan() is None and index() is None for plan, index in refs)


def naive_gather(fresh_full, recorded, coords_fn, active, n_windows, size, res):
    """Per-pixel loop: fresh where active, recorded elsewhere, zero outside."""
    out = torch.zeros(recorded.shape[0], recorded.shape[1], n_windows * size * size)
    for i, (y, x) in enumerate(coords_fn()):
        if 0 <= y < res[0] and 0 <= x < res[1]:
            out[:, :, i] = fresh_full[:, :, y, x] if active[y, x] else recorded[:, :, y, x]
    return out.reshape(recorded.shape[0], recorded.shape[1], n_windows, size, size).transpose(1, 2).reshape(
        -1, recorded.shape[1], size, size)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("block", [1, 4])
def test_two_source_conv_window_gather_matches_a_naive_loop(seed, stride, block):
    res_in = (16, 16)
    res_out = (16 // stride, 16 // stride)
    plan = MaskPlan(random_mask(16, 16, seed), Policy(block_size=block))
    layout_in = plan.layout(res_in)
    nchw = SpatialLayout("map", res_in, (2, 3), (2, 3, 16, 16))
    fresh_full, recorded = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    fresh = reference.gather_pixels(None, fresh_full, plan.gather_index(ActivePixels(res_in), False), nchw, 0)
    spec = ConvWindows(res_in, res_out, (3, 3), (stride, stride), (1, 1), (1, 1))
    got = reference.gather_pixels(fresh, recorded, plan.gather_index(spec, True), nchw, layout_in.num_blocks)
    out_layout = plan.layout(res_out)
    size = spec.window_size(out_layout.block)

    def coords():
        for by, bx in out_layout.blocks.tolist():
            for i in range(size):
                for j in range(size):
                    yield by * out_layout.block * stride - 1 + i, bx * out_layout.block * stride - 1 + j

    active = plan.active_pixels(res_in)
    want = naive_gather(fresh_full, recorded, coords, active, out_layout.num_blocks, size, res_in)
    assert torch.equal(got, want)


@pytest.mark.parametrize("from_gathered", [True, False])
def test_gather_sources_read_each_pixel_once(from_gathered):
    """The sources form of a gather index (`GatherIndex.source_recorded`, `source_rows`) names the same pixel for
    every window pixel as the per-pixel form (`from_fresh`, `fresh_index`, `recorded_index`, `inside`), and reads
    each recorded pixel once: pixel-wise blocks' 3x3 windows read each pixel up to 9 times."""
    plan = MaskPlan(random_mask(16, 16, 2), Policy(block_size=1))
    index = plan.gather_index(ConvWindows((16, 16), (16, 16), (3, 3), (1, 1), (1, 1), (1, 1)), from_gathered)
    fresh_pixels = plan.layout((16, 16)).num_pixels if from_gathered else 0
    recorded = index.source_recorded
    assert torch.equal(recorded, recorded.unique())
    zero_row = fresh_pixels + recorded.numel()
    from_fresh = index.from_fresh if from_gathered else torch.zeros_like(index.inside)
    want = torch.where(from_fresh, index.fresh_index if from_gathered else 0, -1)
    rows = index.source_rows
    reads_recorded = index.inside & ~from_fresh
    assert torch.equal(rows[from_fresh], want[from_fresh])
    assert torch.equal(recorded[rows[reads_recorded] - fresh_pixels], index.recorded_index[reads_recorded])
    assert (rows[~index.inside] == zero_row).all()
    assert zero_row < rows.numel() / 2  # the windows' 9 reads per pixel came down to about one


def test_upsampled_gather_and_full_image():
    plan = MaskPlan(random_mask(16, 16, 0), Policy(block_size=4))
    low = SpatialLayout("map", (8, 8), (2, 3), (1, 2, 8, 8))
    full_low = torch.randn(1, 2, 8, 8)
    up = torch.nn.functional.interpolate(full_low, scale_factor=2, mode="nearest")
    spec = Upsampled(ActivePixels((16, 16)), (8, 8))
    gathered = reference.gather_pixels(None, full_low, plan.gather_index(spec, False), low, 0)
    high = SpatialLayout("map", (16, 16), (2, 3), (1, 2, 16, 16))
    direct = reference.gather_pixels(None, up, plan.gather_index(ActivePixels((16, 16)), False), high, 0)
    assert torch.equal(gathered, direct)
    # scattering the gathered blocks back over a recorded tensor: fresh inside the blocks, recorded outside
    recorded = torch.randn(1, 2, 16, 16)
    layout = plan.layout((16, 16))
    merged = reference.gather_pixels(direct, recorded, plan.gather_index(FullImage((16, 16)), True), high,
                                     layout.num_blocks)
    active = plan.active_pixels((16, 16))
    assert torch.equal(merged[..., active], up[..., active])
    assert torch.equal(merged[..., ~active], recorded[..., ~active])


def test_seq_layout_round_trip():
    plan = MaskPlan(random_mask(8, 8, 1), Policy(block_size=2))
    seq = SpatialLayout("seq", (8, 8), (2,), (2, 3, 64, 5))
    dense = torch.randn(2, 3, 64, 5)
    gathered = reference.gather_pixels(None, dense, plan.gather_index(ActivePixels((8, 8)), False), seq, 0)
    positions = plan.gather_index(ActivePixels((8, 8)), False).recorded_index
    assert torch.equal(gathered, dense[:, :, positions])


def test_group_norm_affine_matches_group_norm():
    x = torch.randn(2, 8, 5, 5)
    w, b = torch.randn(8), torch.randn(8)
    out, mean, rstd = reference.group_norm_with_stats(x, 4, w, b, 1e-5)
    assert torch.allclose(out, torch.nn.functional.group_norm(x, 4, w, b, 1e-5), atol=1e-6)
    assert torch.allclose(reference.group_norm_affine(x, w, b, mean, rstd, 4, 2, 8, 4), out, atol=1e-5)
    blocks = x.reshape(2, 8, 5, 5).repeat_interleave(3, dim=0)  # 3 "blocks" per batch item
    assert torch.allclose(reference.group_norm_affine(blocks, w, b, mean, rstd, 4, 2, 8, 4),
                          out.repeat_interleave(3, dim=0), atol=1e-5)


@pytest.mark.parametrize("algorithm", ["nchw", "channels_last", "im2col"])
@pytest.mark.parametrize(("block", "stride"), [(1, 1), (2, 1), (4, 1), (2, 2), (4, 2)])
def test_every_convolution_algorithm_convolves_windows_like_conv2d(algorithm, block, stride):
    g = torch.Generator().manual_seed(block * 10 + stride)
    weight, bias = torch.randn(6, 5, 3, 3, generator=g), torch.randn(6, generator=g)
    size = (block - 1) * stride + 3
    # windows as gathers produce them: channels-last strided
    windows = torch.randn(7, size, size, 5, generator=g).permute(0, 3, 1, 2)
    want = torch.nn.functional.conv2d(windows.contiguous(), weight, bias, stride)
    flat_kernels = {}
    got = reference.conv_windows(windows, weight, bias, [stride, stride], [1, 1], 1, flat_kernels, algorithm)
    assert got.shape == want.shape == (7, 6, block, block)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # im2col (the only choice for pixel-wise blocks) keeps its flattened kernel for the next call
    assert list(flat_kernels) == ([id(weight)] if algorithm == "im2col" or block == 1 else [])


@pytest.mark.parametrize("gemm", ["blas", "onednn"])
def test_both_gemm_libraries_multiply_rows_like_linear(gemm):
    g = torch.Generator().manual_seed(3)
    rows, kernel, bias = (torch.randn(300, 45, generator=g), torch.randn(7, 45, generator=g),
                          torch.randn(7, generator=g))
    got = reference.matmul_rows(rows, kernel, bias, gemm)
    assert got.shape == (300, 7)
    torch.testing.assert_close(got, torch.nn.functional.linear(rows, kernel, bias), rtol=1e-5, atol=1e-5)
    windows = torch.randn(9, 3, 3, 5, generator=g).permute(0, 3, 1, 2)  # pixel-wise blocks' windows, as gathered
    weight = torch.randn(6, 5, 3, 3, generator=g)
    torch.testing.assert_close(reference.conv_windows(windows, weight, None, [1, 1], [1, 1], 1, None, "im2col", gemm),
                               torch.nn.functional.conv2d(windows, weight), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gemm='mkl'"):
        reference.matmul_rows(rows, kernel, bias, "mkl")


def test_onednn_gemm_is_one_opaque_op_that_inductor_compiles_and_flop_counters_count():
    """A program's oneDNN GEMM is `fisedit::onednn_linear`: Inductor's lowering of the raw oneDNN primitive
    assumes frozen weights, and `macs` must count it like the `F.linear` it replaces."""
    g = torch.Generator().manual_seed(4)
    rows, kernel, bias = torch.randn(40, 90, generator=g), torch.randn(7, 90, generator=g), torch.randn(7, generator=g)

    def program(rows, kernel, bias):
        return reference.matmul_rows(rows * 2, kernel, bias, "onednn").relu()

    compiled = torch.compile(program, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(rows, kernel, bias), program(rows, kernel, bias), rtol=1e-5, atol=1e-5)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        program(rows, kernel, bias)
    assert counter.get_total_flops() == 2 * 40 * 90 * 7
    torch.library.opcheck(torch.ops.fisedit.onednn_linear.default, (rows, kernel, bias))
    torch.library.opcheck(torch.ops.fisedit.onednn_linear.default, (rows, kernel, None))
    tokens = rows.view(2, 20, 90)  # a linear layer's (batch, tokens, features)
    torch.testing.assert_close(reference.matmul_rows(tokens, kernel, bias, "onednn"),
                               torch.nn.functional.linear(tokens, kernel, bias), rtol=1e-5, atol=1e-5)
    with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
        reference.matmul_rows(tokens, kernel, bias, "onednn")
    assert counter.get_total_flops() == 2 * 40 * 90 * 7
    torch.library.opcheck(torch.ops.fisedit.onednn_linear.default, (tokens, kernel, bias))


def test_operands_that_do_not_concatenate_are_refused():
    a = SpatialLayout("map", (8, 8), (2, 3), (2, 4, 8, 8))
    assert concatenated([a, a.with_rest_size(6)]).shape == (2, 10, 8, 8)
    with pytest.raises(ValueError, match="differ in their pixels"):
        concatenated([a, SpatialLayout("map", (4, 4), (2, 3), (2, 4, 4, 4))])
    with pytest.raises(ValueError, match="non-pixel dims"):
        SpatialLayout("seq", (2, 4), (2,), (2, 3, 8, 5)).with_rest_size(7)
    plan = MaskPlan(torch.ones(8, 8, dtype=torch.bool), Policy(block_size=2, halo=0))
    index = plan.gather_index(ConvWindows((8, 8), (8, 8), (3, 3), (1, 1), (1, 1), (1, 1)), False)
    scale = shift = torch.ones(2, 10)
    with pytest.raises(ValueError, match="do not concatenate"):  # 4 + 4 channels for a 10-channel layout
        reference.gather_pixels_affine_silu([None, None], [torch.randn(2, 4, 8, 8)] * 2, index,
                                            a.with_rest_size(10), 0, scale, shift)


def test_convolutions_im2col_cannot_run_take_the_convolution_library():
    assert reference.conv_method("im2col", (3, 3), (6, 6), [2, 2], 1) == "nchw"  # dilated
    assert reference.conv_method("im2col", (3, 3), (6, 6), [1, 1], 2) == "nchw"  # grouped
    assert reference.conv_method("channels_last", (3, 3), (3, 3), [1, 1], 1) == "im2col"  # one footprint per window
    windows = torch.randn(3, 4, 8, 8)
    weight = torch.randn(4, 2, 3, 3)
    got = reference.conv_windows(windows, weight, None, [1, 1], [2, 2], 2, None, "im2col")
    torch.testing.assert_close(got, torch.nn.functional.conv2d(windows, weight, None, 1, 0, 2, 2))
