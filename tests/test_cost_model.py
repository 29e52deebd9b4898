"""APSC cost model decisions, and calibration."""

from __future__ import annotations

import torch

from fisedit_compiler import cost_model
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
    assert b in (2, 4, 8) and b < 96


def test_scattered_mask_picks_differently_than_compact_of_equal_area():
    c, s = compact(96, 20), scattered(96, 400)
    assert c.sum() == s.sum()
    assert choose_block_size(c) != choose_block_size(s)
    assert cost(s, choose_block_size(s)) > cost(c, choose_block_size(c))  # scattered work costs more


def test_ninety_percent_mask_picks_dense():
    m = torch.ones(96, 96, dtype=torch.bool)
    m[:10, :] = False
    assert m.float().mean() >= 0.89
    assert choose_block_size(m) == 96


def test_constants_change_decisions_the_way_they_should():
    m = compact(96, 12) | compact(96, 12).roll(40, dims=1)
    cheap_blocks = choose_block_size(m, constants=CostConstants(block=0.0, moved_pixel=0.0))
    costly_blocks = choose_block_size(m, constants=CostConstants(block=2000.0))
    assert costly_blocks > cheap_blocks  # per-block overhead favours fewer, bigger blocks
    costly_moves = choose_block_size(m, constants=CostConstants(moved_pixel=10.0))
    assert costly_moves == 96  # when moving pixels costs more than computing them, dense wins


def test_mask_plan_uses_the_cost_model_per_resolution():
    mask = compact(64, 6)
    plan = MaskPlan(mask, Policy(), constants=cost_model.DEFAULT)
    for res in [(64, 64), (32, 32), (16, 16), (8, 8)]:
        assert plan.block_size(res) == choose_block_size(plan.active_map(res))
    assert MaskPlan(mask, Policy(block_size=4)).block_size((64, 64)) == 4


def test_calibration_writes_and_loads_constants(tmp_path, monkeypatch):
    monkeypatch.setenv("FISEDIT_CACHE_DIR", str(tmp_path))
    device = torch.device("cpu")
    assert cost_model.load_constants(device) == cost_model.DEFAULT
    measured = cost_model.calibrate(device, channels=16)
    assert cost_model.calibration_path(device).is_file()
    assert cost_model.load_constants(device) == measured
    assert measured.moved_pixel >= 0 and measured.block >= 0
