"""APSC cost model decisions, and calibration."""

from __future__ import annotations

import json

import pytest
import torch

from fisedit_compiler import cost_model, environment, tuning
from fisedit_compiler.cost_model import CostConstants, choose_block_size, cost
from fisedit_compiler.policy import Policy
from fisedit_compiler.runtime.mask_plan import MaskPlan


def compact(size: int, side: int) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    m[10:10 + side, 20:20 + side] = True
    return m


def scattered(size: int, count: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(size * size, dtype=torch.bool)
    m[torch.randperm(size * size, generator=g)[:count]] = True
    return m.reshape(size, size)


def test_small_compact_mask_picks_small_blocks_at_high_resolution():
    b = choose_block_size(compact(96, 10))
    assert b in (1, 2, 4, 8) and b < 96


def test_scattered_mask_picks_differently_than_compact_of_equal_area():
    c, s = compact(96, 20), scattered(96, 400)
    assert c.sum() == s.sum()
    # where pixel-wise blocks cost more per pixel than blocks of 4 (an earlier CPU's calibration at 320 channels)
    pricey = CostConstants(layer={320: {1: 1.6, 2: 1.45, 4: 1.1, 8: 1.02, 16: 1.0, 32: 0.95}})
    pick = lambda m: choose_block_size(m, constants=pricey, channels=320)  # noqa: E731
    assert pick(c) != pick(s)
    assert cost(s, pick(s), pricey, 320) > cost(c, pick(c), pricey, 320)  # scattered costs more


def test_ninety_percent_mask_picks_dense():
    m = torch.ones(96, 96, dtype=torch.bool)
    m[:10, :] = False
    assert m.float().mean() >= 0.89
    assert choose_block_size(m) == 96


def constants(**costs: float) -> CostConstants:
    """One channel count, every block size costing 1.0 per pixel unless given (as b1=..., b2=...)."""
    return CostConstants(layer={320: {b: costs.get(f"b{b}", 1.0) for b in cost_model.BLOCK_SIZES}})


def test_constants_change_decisions_the_way_they_should():
    m = compact(96, 12) | compact(96, 12).roll(40, dims=1)
    equal = choose_block_size(m, constants=constants())
    assert equal == 2  # equal per-pixel costs: the tightest cover (b1 and b2 tie on this even-aligned mask)
    slow_small = choose_block_size(m, constants=constants(b1=4.0, b2=4.0, b4=4.0))
    assert slow_small in (8, 16, 32) and slow_small > equal  # inefficient small blocks favour bigger ones
    slow = {f"b{b}": 50.0 for b in cost_model.BLOCK_SIZES}
    assert choose_block_size(m, constants=constants(**slow)) == 96  # when sparse pixels cost 50x, dense wins


def test_constants_are_used_per_channel_count():
    m = compact(96, 12)
    two = CostConstants(layer={320: constants().layer[320], 1280: constants(b1=9.0, b2=9.0).layer[320]})
    assert choose_block_size(m, constants=two, channels=320) == 2
    assert choose_block_size(m, constants=two, channels=1100) > 2  # nearest calibrated width: 1280
    assert two.for_channels(None) == two.layer[1280]


def test_constants_need_every_block_size():
    with pytest.raises(ValueError, match="missing"):
        CostConstants(layer={320: {2: 1.0, 4: 1.0}})


def test_convolution_algorithms_are_chosen_per_channel_count_and_block_size():
    costs = constants().layer[320]
    measured = CostConstants(layer={320: costs, 1280: costs},
                             conv={320: {2: "channels_last", 4: "im2col"}, 1280: {2: "im2col"}})
    assert measured.conv_algorithm(320, 2) == "channels_last"
    assert measured.conv_algorithm(384, 4) == "im2col"  # nearest calibrated width: 320
    assert measured.conv_algorithm(960, 2) == "im2col"  # nearest: 1280
    assert measured.conv_algorithm(320, 8) == "nchw"  # not measured
    assert constants().conv_algorithm(320, 2) == "nchw"  # nothing measured
    with pytest.raises(ValueError, match="unknown convolution algorithms.*winograd"):
        CostConstants(layer={320: costs}, conv={320: {2: "winograd"}})


def test_mask_plan_uses_the_cost_model_per_resolution():
    mask = compact(64, 6)
    channels = {1: 320, 2: 640, 4: 1280, 8: 1280}
    # each width has one block size that costs no more than dense per pixel: the plan must pick it at the
    # resolutions of that width (at 8x8 no smaller block divides the map into several: dense)
    cheap = {320: 1, 640: 4, 1280: 8}
    constants = CostConstants(layer={c: {b: 1.0 if b == cheap[c] else 9.0 for b in cost_model.BLOCK_SIZES}
                                     for c in cheap})
    # (a halo of one cell: at 8x8 the mask's 3x3 cells cost more pixel-wise than dense)
    plan = MaskPlan(mask, Policy(halo_unit="cells"), constants=constants, channels=channels)
    assert {res: plan.block_size((res, res)) for res in (64, 32, 16, 8)} == {64: 1, 32: 4, 16: 8, 8: 8}
    assert MaskPlan(mask, Policy(block_size=4)).block_size((64, 64)) == 4


def test_maps_with_many_active_pixels_take_the_larger_regions_constants():
    """Above `LARGE_FROM` active pixels a map is priced by the constants measured on the larger region: here
    pixel-wise blocks cost 4x there (gathers out of cache), so the same mask shape picks larger blocks when big."""
    small_costs = constants().layer[320]
    two = CostConstants(layer={320: small_costs}, large=constants(b1=4.0, b2=4.0))
    few = compact(96, 60)  # 3600 active pixels
    many = torch.zeros(256, 256, dtype=torch.bool)
    many[10:130, 20:140] = True  # 14400
    assert few.sum() <= cost_model.LARGE_FROM < many.sum()
    assert two.for_active(int(few.sum())) is two and two.for_active(int(many.sum())) is two.large
    assert choose_block_size(few, constants=two, channels=320) == 2
    assert choose_block_size(many, constants=two, channels=320) > 2
    plan = MaskPlan(many, Policy(halo_unit="cells", halo=0), constants=two, channels={1: 320})
    assert plan.constants_at((256, 256)) is two.large and plan.constants_at((32, 32)) is two
    with pytest.raises(ValueError, match="no `large` of its own"):
        CostConstants(layer={320: small_costs}, large=two)


def test_calibration_writes_and_loads_constants(tmp_path, monkeypatch):
    monkeypatch.setenv("FISEDIT_CACHE_DIR", str(tmp_path))
    environment.reread()  # the package reads its variables once
    device = torch.device("cpu")
    assert cost_model.load_constants(device) == cost_model.DEFAULT
    measured = tuning.calibrate(device, channels=(32, 64), side=16, large_side=32)
    assert cost_model.calibration_path(device).is_file()
    assert cost_model.load_constants(device) == measured
    assert set(measured.layer) == {32, 64} and set(measured.large.layer) == {32, 64}
    assert measured.large.gemm == measured.gemm and measured.large.large is None
    assert all(set(costs) == set(cost_model.BLOCK_SIZES) and min(costs.values()) > 0
               for costs in measured.layer.values())
    assert all(set(algorithms) == set(cost_model.BLOCK_SIZES) and algorithms[1] == "im2col"
               and set(algorithms.values()) <= set(cost_model.CONV_ALGORITHMS)
               for algorithms in measured.conv.values())
    assert measured.gemm in cost_model.GEMM_LIBRARIES


def test_gemm_library_takes_onednn_only_where_it_pays():
    onednn = cost_model.DEFAULT
    assert onednn.gemm == "onednn"  # the CPU default, measured
    small, large = 64 * 9 * 64, 1280 * 9 * 1280  # 3x3 kernels
    enough = -(-cost_model.ONEDNN_MIN_MACS // small)  # rows
    assert onednn.gemm_library(enough, small, torch.float32) == "onednn"
    assert onednn.gemm_library(enough - 1, small, torch.float32) == "blas"  # its per-call cost would not pay
    assert onednn.gemm_library(1, large, torch.float32) == "onednn"  # one row of a large kernel is enough
    assert onednn.gemm_library(enough, small, torch.bfloat16) == "blas"  # F.linear takes oneDNN for bf16 by itself
    assert CostConstants(layer=onednn.layer).gemm_library(enough, small, torch.float32) == "blas"
    with pytest.raises(ValueError, match="gemm='mkl'"):
        CostConstants(layer=onednn.layer, gemm="mkl")


def test_gemm_library_defaults_to_blas_off_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("FISEDIT_CACHE_DIR", str(tmp_path))
    environment.reread()  # the package reads its variables once
    assert cost_model.load_constants(torch.device("meta")).gemm == "blas"


def test_a_calibration_file_without_convolution_algorithms_still_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("FISEDIT_CACHE_DIR", str(tmp_path))
    environment.reread()  # the package reads its variables once
    device = torch.device("cpu")
    path = cost_model.calibration_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"layer": {"320": {str(b): 1.0 for b in cost_model.BLOCK_SIZES}}}))
    loaded = cost_model.load_constants(device)
    assert loaded.layer == {320: {b: 1.0 for b in cost_model.BLOCK_SIZES}}
    assert loaded.conv_algorithm(320, 4) == "nchw"
    assert loaded.gemm == "onednn"  # a file from before the GEMM choice: the CPU default
    assert loaded.large is None and loaded.for_active(10**6) is loaded  # and before the larger region


def test_the_cpu_measured_convolution_algorithms_are_not_applied_to_other_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("FISEDIT_CACHE_DIR", str(tmp_path))
    environment.reread()  # the package reads its variables once
    other = cost_model.load_constants(torch.device("meta"))  # an uncalibrated device that is not the CPU
    assert other.layer == cost_model.DEFAULT.layer and other.conv_algorithm(320, 4) == "nchw"
    assert cost_model.load_constants(torch.device("cpu")).conv_algorithm(320, 4) == cost_model.DEFAULT.conv[320][4]


def test_a_non_square_maps_largest_block_is_priced_at_the_dense_rate():
    """A non-square map's largest block is its sides' common divisor (64 for SD's 1024x512 latents, 128x64), larger
    than any measured block size: it is priced as dense pixels, not looked up (a KeyError before)."""
    active = torch.zeros(128, 64, dtype=torch.bool)
    active[:10, :10] = True
    assert cost_model.cost(active, 64) == 64 * 64  # the one block it touches, at the dense rate
    assert cost_model.choose_block_size(active) < 64
    assert cost_model.choose_block_size(torch.ones(128, 64, dtype=torch.bool)) == 64  # all active: dense
