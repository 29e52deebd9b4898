"""The edit schedule (`editing/schedule.py`) without a pipeline: which steps run under control, when the mask is
decided, which steps refresh, and what the run records of the cross-attention maps later edits read."""

from __future__ import annotations

import pytest

import fisedit_compiler as fisedit
from fisedit_compiler.editing.schedule import EditSchedule

STEPS = 20
UNCONTROLLED = {"controlled_steps": 0}  # no sparse step under control: the maps read are the control steps' alone


def test_a_detected_edit_runs_its_first_steps_under_control_then_sparse():
    schedule = EditSchedule.plan(fisedit.Policy(**UNCONTROLLED), STEPS, user_mask=False, swaps_words=False)
    # Policy defaults: dense_steps 0.2, detection from 0.1 to 0.2 of the steps
    assert (schedule.dense_steps, schedule.detect, schedule.hold_layout) == (4, (2, 4), 0)
    assert [schedule.phase(i) for i in range(STEPS)] == ["control"] * 4 + ["sparse"] * 16
    assert [i for i in range(STEPS) if schedule.decides_mask_after(i)] == [3]
    # the source recorded maps for the 6 steps a word swap holds: an edit that inserts words keeps its source's
    assert schedule.maps_steps == 6 and not schedule.records_all_maps(region_is_everything=False)
    unheld = EditSchedule.plan(fisedit.Policy(hold_layout_steps=0, **UNCONTROLLED), STEPS, user_mask=False,
                            swaps_words=False)
    assert unheld.records_all_maps(region_is_everything=False)  # its control steps are every step maps are read of


def test_a_word_swap_holds_the_layout_for_its_first_steps():
    policy = fisedit.Policy(hold_layout_steps=0.1)
    assert EditSchedule.plan(policy, STEPS, user_mask=False, swaps_words=True).hold_layout == 2
    assert EditSchedule.plan(policy, STEPS, user_mask=False, swaps_words=False).hold_layout == 0


def test_a_word_swap_holding_more_steps_than_the_dense_ones_runs_them_all_under_control():
    policy = fisedit.Policy(dense_steps=0.2, hold_layout_steps=0.3, **UNCONTROLLED)  # 4 dense steps, 6 held
    swap = EditSchedule.plan(policy, STEPS, user_mask=False, swaps_words=True)
    assert (swap.dense_steps, swap.hold_layout, swap.detect) == (6, 6, (2, 4))  # detected over the same steps
    assert swap.decides_mask_after(5) and swap.records_all_maps(region_is_everything=False)
    other = EditSchedule.plan(policy, STEPS, user_mask=False, swaps_words=False)
    assert (other.dense_steps, other.hold_layout, other.maps_steps) == (4, 0, 6)
    assert not other.records_all_maps(region_is_everything=False)  # it keeps its source's maps


def test_a_user_mask_goes_sparse_from_the_first_step_unless_the_layout_is_held():
    policy = fisedit.Policy(hold_layout_steps=0.1, **UNCONTROLLED)
    plain = EditSchedule.plan(policy, STEPS, user_mask=True, swaps_words=False)
    assert (plain.dense_steps, plain.detect) == (0, None)
    assert plain.phase(0) == "sparse" and plain.decides_mask_after(-1)
    held = EditSchedule.plan(policy, STEPS, user_mask=True, swaps_words=True)
    assert held.dense_steps == held.hold_layout == 2  # the held steps run dense, under control
    assert [held.phase(i) for i in range(3)] == ["control", "control", "sparse"]
    # fewer dense steps than the maps later edits read: this run keeps its source's maps
    assert not held.records_all_maps(region_is_everything=False)
    assert held.records_all_maps(region_is_everything=True)  # after the switch it would run dense and record
    assert (held.remaining_maps_steps(), held.remaining_maps_only()) == (2, 0)


@pytest.mark.parametrize("refresh", [2, 5])
def test_refresh_steps_come_every_r_steps_after_the_switch_past_the_maps_steps(refresh):
    schedule = EditSchedule.plan(fisedit.Policy(refresh_every=refresh, **UNCONTROLLED), STEPS, user_mask=True,
                                 swaps_words=False)
    refreshed = [i for i in range(STEPS) if schedule.phase(i) == "refresh"]
    # the switch is before step 0; steps below 6 (the maps steps: a word swap's held ones) never refresh
    assert refreshed == [i for i in range(6, STEPS) if (i + 1) % refresh == 0]


def test_the_steps_below_controlled_steps_stay_under_control_after_the_switch():
    policy = fisedit.Policy(controlled_steps=0.8, refresh_every=2)
    detected = EditSchedule.plan(policy, STEPS, user_mask=False, swaps_words=False)
    # 4 dense control steps, then 12 sparse ones under control; the source records the maps of all 16
    assert (detected.dense_steps, detected.controlled, detected.controlled_sparse_steps()) == (4, 16, 12)
    assert detected.maps_steps == 16 and not detected.records_all_maps(region_is_everything=False)
    # no refresh step under control: they are dense record calls, which take no maps
    assert [i for i in range(STEPS) if detected.phase(i) == "refresh"] == [17, 19]
    user = EditSchedule.plan(policy, STEPS, user_mask=True, swaps_words=False)
    assert (user.dense_steps, user.controlled_sparse_steps()) == (0, 16)
    assert EditSchedule.plan(fisedit.Policy(controlled_steps=1), STEPS, user_mask=False,
                             swaps_words=True).controlled_sparse_steps() == 14  # every step, 6 held ones dense
    assert EditSchedule.plan(fisedit.Policy(), STEPS, user_mask=False, swaps_words=True).controlled_sparse_steps() \
        == 0  # the default: the control steps only
    with pytest.raises(ValueError, match="controlled_steps is a fraction"):
        fisedit.Policy(controlled_steps=1.5)


def test_without_cache_dense_steps_a_user_mask_edit_runs_the_map_only_steps_dense():
    policy = fisedit.Policy(cache_dense_steps=False)
    schedule = EditSchedule.plan(policy, STEPS, user_mask=True, swaps_words=False)
    assert schedule.dense_steps == schedule.maps_only == 4
    assert schedule.remaining_maps_only() == 0
