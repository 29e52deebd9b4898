"""`Policy` is four frozen groups; the flat constructor, flat reads, `dataclasses.replace` with flat names, equality,
hashing and the flat dict of older saved sessions keep working."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest

from fisedit_compiler.policy import (
    FLAT_FIELDS,
    GROUPS,
    CacheConfig,
    DebugConfig,
    EditConfig,
    Policy,
    SparsityConfig,
)

# The fields of the flat Policy with their defaults (the 24 from before the groups, and those added since): flat
# reads and the flat constructor keep them.
OLD_FLAT_DEFAULTS = {
    "max_sparse_downscale": 8, "halo": 1, "halo_unit": "latent_pixels", "block_size": None, "block_count_steps": 0,
    "attention": "active_queries", "norm_stats": "recorded", "dense_steps": 0.2, "detect_from": 0.1, "detect_to": 0.2,
    "mask_dilation": 1, "user_mask_dense_steps": 0.0, "hold_layout_steps": 0.3, "controlled_steps": 0.0,
    "inversion_skip": 1,
    "refresh_every": None, "deep_reuse_interval": 1, "deep_reuse_downscale": 2, "cache_dtype": None,
    "cache_dense_steps": True, "dump_dir": None, "dump_svg": True, "cache_budget": 0.5, "cache_dir": None,
    "program_backend": None, "retain_freed_memory": True,
}


def test_every_old_field_is_in_exactly_one_group_with_its_default():
    assert set(FLAT_FIELDS) == set(OLD_FLAT_DEFAULTS)
    assert sum(len(dataclasses.fields(cls)) for cls in GROUPS.values()) == len(OLD_FLAT_DEFAULTS)
    policy = Policy()
    for name, default in OLD_FLAT_DEFAULTS.items():
        assert getattr(policy, name) == default, name
        assert getattr(Policy, name) == default, name  # on the class: the default (cli's argparse defaults)
        assert getattr(getattr(policy, FLAT_FIELDS[name]), name) == default


def test_the_flat_constructor_equals_the_grouped_one():
    flat = Policy(block_size=4, halo=2, dense_steps=0.3, cache_dtype="float16", dump_dir="d")
    grouped = Policy(sparsity=SparsityConfig(block_size=4, halo=2), edit=EditConfig(dense_steps=0.3),
                     cache=CacheConfig(cache_dtype="float16"), debug=DebugConfig(dump_dir="d"))
    assert flat == grouped and hash(flat) == hash(grouped)
    assert flat.block_size == flat.sparsity.block_size == 4 and flat.dense_steps == 0.3
    assert {flat: 1}[grouped] == 1  # usable as a dict key
    assert flat != Policy(block_size=4)


def test_flat_keywords_apply_over_the_groups_given():
    policy = Policy(sparsity=SparsityConfig(block_size=4, halo=2), halo=3)
    assert (policy.block_size, policy.halo) == (4, 3)


def test_dataclasses_replace_takes_flat_names_and_groups():
    policy = Policy(block_size=4, norm_stats="fresh")
    replaced = dataclasses.replace(policy, deep_reuse_interval=1, halo_unit="cells", dense_steps=0.4)
    assert (replaced.block_size, replaced.norm_stats, replaced.halo_unit, replaced.dense_steps) == (4, "fresh",
                                                                                                   "cells", 0.4)
    assert policy.halo_unit == "latent_pixels"  # the original is untouched
    regrouped = dataclasses.replace(policy, cache=CacheConfig(cache_budget="unbounded"))
    assert regrouped.cache_budget == "unbounded" and regrouped.sparsity == policy.sparsity


def test_a_policy_is_frozen_copyable_and_picklable():
    policy = Policy(block_size=2, refresh_every=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.block_size = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.sparsity = SparsityConfig()
    assert pickle.loads(pickle.dumps(policy)) == policy and copy.deepcopy(policy) == policy


def test_unknown_keywords_and_wrong_groups_are_type_errors():
    with pytest.raises(TypeError, match="blok_size"):
        Policy(blok_size=4)
    with pytest.raises(TypeError, match="takes a SparsityConfig"):
        Policy(sparsity=EditConfig())
    with pytest.raises(TypeError):
        Policy(8)  # the groups are keyword-only: no positional field order to get wrong


@pytest.mark.parametrize("kwargs, message", [
    ({"attention": "sparse"}, "attention"), ({"block_size": 0}, "block_size"), ({"cache_dtype": "fp8"}, "cache_dtype"),
    ({"hold_layout_steps": 1.5}, "hold_layout_steps"), ({"detect_from": 0.3}, "detect_from"),
    ({"cache_budget": 1.5}, "cache_budget"), ({"deep_reuse_downscale": 1}, "deep_reuse_downscale"),
    ({"inversion_skip": True}, "inversion_skip"), ({"refresh_every": 0}, "refresh_every"),
    ({"program_backend": "no-such-backend"}, "program_backend"), ({"cache_dense_steps": 1}, "cache_dense_steps"),
])
def test_validation_errors_name_the_field_flat_or_grouped(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Policy(**kwargs)
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=message):
        GROUPS[FLAT_FIELDS[name]](**{name: value})


def test_schedules():
    assert Policy().edit_schedule(50) == (10, 5, 10) == Policy().edit.edit_schedule(50)
    assert Policy().hold_layout_schedule(20) == 6 and Policy(hold_layout_steps=0).hold_layout_schedule(20) == 0
    assert Policy().maps_schedule(20) == 6 and Policy(hold_layout_steps=0).maps_schedule(20) == 4
    assert Policy(controlled_steps=0.5).maps_schedule(20) == 10 and Policy(controlled_steps=1).maps_schedule(20) == 20
    assert Policy(user_mask_dense_steps=0.1).user_mask_schedule(50) == 5
    assert Policy(cache_dense_steps=False).user_mask_schedule(50) == 10  # at least the dense steps
    assert Policy(cache_dense_steps=False).recorded_activations_from(50) == 10
    assert Policy().recorded_activations_from(50) == 0
    assert Policy(cache_dtype="float16").storage_dtype is not None and Policy().storage_dtype is None
    assert Policy(max_sparse_downscale=4).is_sparse_resolution((16, 16), (64, 64))
    assert not Policy(max_sparse_downscale=4).is_sparse_resolution((8, 8), (64, 64))


def test_from_dict_reads_the_grouped_and_the_flat_form():
    policy = Policy(block_size=2, dense_steps=0.3, hold_layout_steps=0.1, cache_budget=1234, dump_svg=False)
    grouped = json.loads(json.dumps(dataclasses.asdict(policy)))
    assert set(grouped) == set(GROUPS)
    assert Policy.from_dict(grouped) == policy
    flat = json.loads(json.dumps(policy.flat_dict()))
    assert set(flat) == set(OLD_FLAT_DEFAULTS)
    assert Policy.from_dict(flat) == policy
    assert Policy.from_dict({"block_size": 2}) == Policy(block_size=2)  # fields saved before others existed
    with pytest.raises(TypeError, match="no_such_field"):
        Policy.from_dict({"no_such_field": 1})
