"""`Policy`: every choice the compiler makes that a user may want to change, with the paper's defaults.

A `Policy` is four small frozen configs, one per concern:

    Policy(sparsity=SparsityConfig(block_size=4), edit=EditConfig(dense_steps=0.3),
           cache=CacheConfig(cache_dtype="float16"), debug=DebugConfig(dump_dir="dumps"))

`SparsityConfig`: which layers run sparse and how (resolutions, blocks, halo, attention, GroupNorm statistics,
temporal reuse, the program backend). `EditConfig`: which steps of an edit run dense, sparse or refreshed, and how
masks are detected and images inverted. `CacheConfig`: the record cache and the memory it lives in. `DebugConfig`:
graph dumps. Every field keeps its name in its group, and every name is unique across the groups, so that:

* ``policy.block_size`` reads ``policy.sparsity.block_size`` (every field can be read flat from the policy), and
  ``Policy.block_size`` (on the class) is the field's default;
* the flat constructor ``Policy(block_size=4, dense_steps=0.3)`` still works: each keyword replaces that field of
  its group (the groups given, else the defaults). Kept for one release for users' code; new code names the groups.
  ``dataclasses.replace(policy, block_size=1)`` works the same way, as does ``replace(policy, sparsity=...)``;
* `Policy.from_dict` reads both `dataclasses.asdict` of a policy (one dict per group) and the flat dict older
  versions saved, and `Policy.flat_dict` gives the flat form.

The measurements behind the defaults are in docs/policy.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch

AttentionMode = Literal["active_queries", "masked_only", "dense"]
NormStats = Literal["recorded", "fresh"]
HaloUnit = Literal["cells", "latent_pixels"]
CacheDtype = Literal["float32", "float16", "bfloat16"]


def _check_int(name: str, value: Any, minimum: int, meaning: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{meaning}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """Which layers of a compiled U-Net run sparse, and how their sparse calls compute."""

    max_sparse_downscale: int = 8
    """A layer runs sparse when its feature map is at most this many times smaller than the latents (8: every
    level of SD 1.5/2; the cost model may still keep a map dense where blocks do not pay)."""
    halo: int = 1
    """Dilation of the mask, in `halo_unit`s: the recomputed region is widened so that the seam between fresh and
    recorded activations falls outside the edit."""
    halo_unit: HaloUnit = "latent_pixels"
    """"latent_pixels": the mask is dilated at the latents, then max-pooled to every resolution. "cells": the mask is
    max-pooled to every resolution and dilated there by `halo` cells of that resolution."""
    block_size: int | None = None
    """The side of the square blocks sparse layers compute. None: the cost model picks it per resolution and mask
    from {1, 2, 4, 8, 16, 32} or dense. A number: at each resolution the largest divisor of the map size not
    above it."""
    block_count_steps: int = 0
    """0: every mask its own block counts. N: a resolution's count of active blocks is rounded up to one of N sizes
    per doubling (N = 8: 25 blocks -> 26, 285 -> 288), the added blocks repeating its last one, so that masks of
    about the same size share a program compiled once with `program_backend` (a compiler's programs take block
    counts as constants), at the price of up to 1/N more blocks computed. Off by default: eager programs take the
    counts as arguments, so one already serves masks of every size and N only adds blocks
    (`benchmarks/results/program-reuse.md`)."""
    attention: AttentionMode = "active_queries"
    """Self-attention at sparse resolutions. "active_queries": active tokens' queries against all keys and values
    (fresh for active tokens, recorded for the rest). "masked_only": active tokens attend to active tokens only (the
    paper's variant). "dense": self-attention is not made sparse."""
    norm_stats: NormStats = "recorded"
    """GroupNorm statistics in sparse calls. "recorded": the source run's mean and variance (GroupNorm becomes a
    per-channel affine map on active blocks). "fresh": the statistics of the current call's materialised input."""
    deep_reuse_interval: int = 1
    """Of every this many sparse calls of a run, the first computes every level and the others take the levels at
    least `deep_reuse_downscale` times smaller than the latents from it (`passes.reuse_deep_levels`). 1: off."""
    deep_reuse_downscale: int = 2
    """The levels a reuse call takes from the last full call: maps at least this many times smaller than the
    latents (at least 2)."""
    program_backend: str | None = None
    """A `torch.compile` backend that record, control and sparse calls run their programs with (`runtime.program`),
    e.g. "inductor". None: programs run eagerly."""

    def __post_init__(self) -> None:
        if self.max_sparse_downscale < 1:
            raise ValueError(f"max_sparse_downscale must be >= 1, got {self.max_sparse_downscale}")
        if self.halo < 0:
            raise ValueError(f"halo must be >= 0, got {self.halo}")
        _check_int("block_count_steps", self.block_count_steps, 0, " (0: exact block counts)")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.attention not in ("active_queries", "masked_only", "dense"):
            raise ValueError(
                f"attention must be 'active_queries', 'masked_only' or 'dense', got {self.attention!r}"
            )
        if self.halo_unit not in ("cells", "latent_pixels"):
            raise ValueError(f"halo_unit must be 'cells' or 'latent_pixels', got {self.halo_unit!r}")
        if self.norm_stats not in ("recorded", "fresh"):
            raise ValueError(f"norm_stats must be 'recorded' or 'fresh', got {self.norm_stats!r}")
        if self.program_backend is not None and self.program_backend not in _torch_compile_backends():
            raise ValueError(
                f"program_backend {self.program_backend!r} is not a torch.compile backend; choose one of "
                f"{_torch_compile_backends()}, or None to run programs eagerly"
            )
        _check_int("deep_reuse_interval", self.deep_reuse_interval, 1)
        _check_int("deep_reuse_downscale", self.deep_reuse_downscale, 1)
        if self.deep_reuse_downscale < 2:
            raise ValueError("deep_reuse_downscale must be >= 2: the levels at the latents' own resolution are always "
                             f"computed; got {self.deep_reuse_downscale}")

    def is_sparse_resolution(self, resolution: tuple[int, int], latent: tuple[int, int]) -> bool:
        """Whether a feature map of `resolution` runs sparse for latents of size `latent`."""
        return all(r * self.max_sparse_downscale >= l for r, l in zip(resolution, latent))


@dataclasses.dataclass(frozen=True)
class EditConfig:
    """Which steps of an edit run dense, sparse or refreshed; how masks are detected and images inverted. Fractions
    are of the edit's denoising steps, in [0, 1]."""

    dense_steps: float = 0.2
    """The fraction of steps that run dense (with cross-attention control) before the switch to sparse, when the
    mask is detected."""
    detect_from: float = 0.1
    """The first step whose latent difference makes the detected mask (rounded to a whole step, at least step 1)."""
    detect_to: float = 0.2
    """The last step whose latent difference makes the detected mask (at most the dense steps)."""
    mask_dilation: int = 1
    """Latent pixels by which a detected mask is dilated."""
    user_mask_dense_steps: float = 0.0
    """The fraction of steps that run dense before sparse when the user gives the mask (0: sparse from the first)."""
    hold_layout_steps: float = 0.3
    """The fraction of a word-swap edit's first steps whose layout features (the U-Net's mid block output) are the
    source run's (`passes/tap_layout_features.py`); they run dense under control, so a word swap's dense phase is
    the longer of this and `dense_steps` (its mask is still detected over `detect_from`..`detect_to`). 0: never.
    0.3 keeps the edited object in place better than 0.2 on the shapes model (benchmarks/results/edit-quality.md)."""
    controlled_steps: float = 0.0
    """The fraction of an edit's first steps whose cross-attention takes the source run's maps for the tokens both
    prompts share (Prompt-to-Prompt's cross-attention replacement, its `cross_replace_steps`): the dense control
    steps always, and the sparse steps after the switch that fall below it (`passes/control_cross_attention.py`).
    A source run records the maps of this many steps (more memory). No refresh step (`refresh_every`) falls below
    it. 0 (the control steps only): on the shapes model, sparse steps under control came no closer to a dense
    Prompt-to-Prompt edit and kept fewer edits (docs/policy.md)."""
    inversion_skip: int = 1
    """`EditSession.load_image` calls the U-Net at every this-many-th DDIM inversion step and reuses its predicted
    noise in between (EEdit's inversion step skipping). 1: plain DDIM inversion."""
    refresh_every: int | None = None
    """Every this-many-th step after the switch to sparse runs dense and records what it computed (EEdit's periodic
    refresh; steps whose maps a later edit reads excepted). None: every step after the switch is sparse."""

    def __post_init__(self) -> None:
        fractions = {"dense_steps": self.dense_steps, "detect_from": self.detect_from, "detect_to": self.detect_to,
                     "user_mask_dense_steps": self.user_mask_dense_steps, "hold_layout_steps": self.hold_layout_steps,
                     "controlled_steps": self.controlled_steps}
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a fraction of the denoising steps, in [0, 1]; got {value}")
        if self.detect_from > self.detect_to:
            raise ValueError(f"detect_from ({self.detect_from}) must not exceed detect_to ({self.detect_to})")
        if self.mask_dilation < 0:
            raise ValueError(f"mask_dilation must be >= 0, got {self.mask_dilation}")
        if self.refresh_every is not None and (isinstance(self.refresh_every, bool)
                                               or not isinstance(self.refresh_every, int) or self.refresh_every < 1):
            raise ValueError(f"refresh_every must be None or an int >= 1 (every that many steps one dense step), got "
                             f"{self.refresh_every!r}")
        _check_int("inversion_skip", self.inversion_skip, 1, " (1: every inversion step calls the U-Net)")

    def edit_schedule(self, num_steps: int) -> tuple[int, int, int]:
        """(dense steps k, first and last detection step t1..t2, 1-based) for an edit of `num_steps` steps."""
        k = min(num_steps, max(1, round(self.dense_steps * num_steps)))
        t2 = min(k, max(1, round(self.detect_to * num_steps)))
        t1 = min(t2, max(1, round(self.detect_from * num_steps)))
        return k, t1, t2

    def hold_layout_schedule(self, num_steps: int) -> int:
        """The first steps of a word-swap edit that take the source run's layout features."""
        if self.hold_layout_steps == 0:
            return 0
        return min(num_steps, max(1, round(self.hold_layout_steps * num_steps)))

    def controlled_schedule(self, num_steps: int) -> int:
        """The first steps of an edit whose cross-attention is under control, dense or sparse (`controlled_steps`)."""
        return min(num_steps, round(self.controlled_steps * num_steps))

    def maps_schedule(self, num_steps: int) -> int:
        """The first steps whose cross-attention maps and layout features a source run records: what any edit's
        controlled steps read (a detected edit's dense steps, a word swap's held ones, `controlled_steps`)."""
        return max(self.edit_schedule(num_steps)[0], self.hold_layout_schedule(num_steps),
                   self.controlled_schedule(num_steps))


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """The record cache: what it stores, in which dtype, and how much of it stays in memory."""

    cache_dtype: CacheDtype | None = None
    """The dtype recorded activations are stored in. None: the dtype they are computed in (a sparse call on the
    recorded input then returns the recorded output exactly); "float16"/"bfloat16" halve an fp32 U-Net's cache."""
    cache_dense_steps: bool = True
    """Whether the cache keeps the activations of a run's first `dense_steps` steps (only user-mask edits read them).
    False keeps their cross-attention maps only, and user-mask edits then run those steps dense too."""
    cache_budget: float | int | Literal["unbounded"] = 0.5
    """How many bytes of recorded steps stay in memory, the rest spilled to disk (`runtime.tiered_store`). A float
    in (0, 1]: that fraction of the memory available when the session or compiled model is made; an int: bytes;
    "unbounded": everything in memory."""
    cache_dir: str | None = None
    """Where spill folders are made (None: the system's temporary folder)."""
    retain_freed_memory: bool = True
    """On a CPU, the first run makes this process keep the memory it frees for reuse (glibc's malloc;
    `runtime.memory`), process-wide and for the process's lifetime. False: the allocator is left as it is."""

    def __post_init__(self) -> None:
        if self.cache_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(
                f"cache_dtype must be None, 'float32', 'float16' or 'bfloat16', got {self.cache_dtype!r}"
            )
        if not isinstance(self.cache_dense_steps, bool):
            raise ValueError(f"cache_dense_steps must be True or False, got {self.cache_dense_steps!r}")
        budget = self.cache_budget
        if not (budget == "unbounded" or (isinstance(budget, float) and 0 < budget <= 1)
                or (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0)):
            raise ValueError(
                f"cache_budget must be a fraction of the available memory in (0, 1] (a float), a number of bytes "
                f"(an int >= 0) or 'unbounded'; got {budget!r}"
            )

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """`cache_dtype` as a torch dtype (None: keep the computed dtype)."""
        return getattr(torch, self.cache_dtype) if self.cache_dtype else None


@dataclasses.dataclass(frozen=True)
class DebugConfig:
    """What the compiler writes out for inspection."""

    dump_dir: str | None = None
    """A folder to write graph dumps into (every variant of every compiled input signature, before and after each
    pass; docs/dumps.md). None: no dumps, unless the environment variable FISEDIT_DUMP_DIR names a folder."""
    dump_svg: bool = True
    """Whether dumps render SVG with Graphviz where it is installed (FISEDIT_DUMP_SVG=0 also turns it off)."""


GROUPS: dict[str, type] = {"sparsity": SparsityConfig, "edit": EditConfig, "cache": CacheConfig,
                           "debug": DebugConfig}
"""The groups of a `Policy`: its field name -> the group's class."""

FLAT_FIELDS: dict[str, str] = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
"""Every field of every group -> the group that holds it (the names of the flat constructor and flat reads)."""


class _FlatField:
    """``policy.<name>`` reads ``policy.<group>.<name>``; on the class, the field's default."""

    def __init__(self, group: str, name: str):
        self.group, self.name = group, name
        self.default = next(f.default for f in dataclasses.fields(GROUPS[group]) if f.name == name)
        self.__doc__ = f"`{GROUPS[group].__name__}.{name}` (read flat; see the group)."

    def __get__(self, policy: Policy | None, owner: type | None = None) -> Any:
        if policy is None:
            return self.default
        return getattr(getattr(policy, self.group), self.name)


@dataclasses.dataclass(frozen=True, init=False)
class Policy:
    """How a compiled U-Net runs its sparse calls: four groups (see the module docstring and docs/policy.md).

    ``Policy(sparsity=..., edit=..., cache=..., debug=...)``; a group left out has its defaults. Flat keywords
    (``Policy(block_size=4)``, kept for one release) replace single fields of their groups, after the groups given.
    Every field can be read flat: ``policy.block_size`` is ``policy.sparsity.block_size``.
    """

    sparsity: SparsityConfig
    """Which layers run sparse, and how."""
    edit: EditConfig
    """Which steps of an edit run dense, sparse or refreshed."""
    cache: CacheConfig
    """The record cache and its memory."""
    debug: DebugConfig
    """Graph dumps."""

    def __init__(self, *, sparsity: SparsityConfig | None = None, edit: EditConfig | None = None,
                 cache: CacheConfig | None = None, debug: DebugConfig | None = None, **flat: Any) -> None:
        given = {"sparsity": sparsity, "edit": edit, "cache": cache, "debug": debug}
        unknown = sorted(set(flat) - set(FLAT_FIELDS))
        if unknown:
            raise TypeError(f"Policy() got unexpected keyword arguments {unknown}; its groups are {list(GROUPS)}, its "
                            f"fields {list(FLAT_FIELDS)}")
        for name, cls in GROUPS.items():
            group = given[name]
            if group is None:
                group = cls()
            elif not isinstance(group, cls):
                raise TypeError(f"Policy({name}=...) takes a {cls.__name__}, got {type(group).__name__}")
            changes = {field: value for field, value in flat.items() if FLAT_FIELDS[field] == name}
            object.__setattr__(self, name, dataclasses.replace(group, **changes) if changes else group)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """The policy `dataclasses.asdict` or `flat_dict` made `data` from (JSON read back): one dict per group, the
        flat form older versions saved, or both mixed. Fields missing have their defaults; unknown keys are a
        TypeError."""
        groups = {name: GROUPS[name](**value) for name, value in data.items() if name in GROUPS}
        return cls(**groups, **{name: value for name, value in data.items() if name not in GROUPS})

    def flat_dict(self) -> dict[str, Any]:
        """Every field by its flat name, in the groups' order (the form of `Policy(**flat)` and older saved files)."""
        return {name: getattr(self, name) for name in FLAT_FIELDS}

    # --- schedules that need more than one group ----------------------------------------------------------------

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """`cache_dtype` as a torch dtype (None: keep the computed dtype)."""
        return self.cache.storage_dtype

    def edit_schedule(self, num_steps: int) -> tuple[int, int, int]:
        """(dense steps k, first and last detection step t1..t2, 1-based) for an edit of `num_steps` steps."""
        return self.edit.edit_schedule(num_steps)

    def user_mask_schedule(self, num_steps: int) -> int:
        """Dense steps of an edit with a user mask: `user_mask_dense_steps`, and at least the detected edits'
        `dense_steps` when the cache keeps only their maps (`cache_dense_steps=False`)."""
        k = round(self.edit.user_mask_dense_steps * num_steps)
        return k if self.cache.cache_dense_steps else max(k, self.edit_schedule(num_steps)[0])

    def hold_layout_schedule(self, num_steps: int) -> int:
        """The first steps of a word-swap edit that take the source run's layout features."""
        return self.edit.hold_layout_schedule(num_steps)

    def maps_schedule(self, num_steps: int) -> int:
        """The first steps whose cross-attention maps and layout features a source run records."""
        return self.edit.maps_schedule(num_steps)

    def recorded_activations_from(self, num_steps: int) -> int:
        """The first step whose activations a record run keeps (0, or `dense_steps` with `cache_dense_steps=False`)."""
        return 0 if self.cache.cache_dense_steps else self.edit_schedule(num_steps)[0]

    def is_sparse_resolution(self, resolution: tuple[int, int], latent: tuple[int, int]) -> bool:
        """Whether a feature map of `resolution` runs sparse for latents of size `latent`."""
        return self.sparsity.is_sparse_resolution(resolution, latent)


for _name, _group in FLAT_FIELDS.items():  # policy.block_size -> policy.sparsity.block_size
    setattr(Policy, _name, _FlatField(_group, _name))
del _name, _group


def _torch_compile_backends() -> list[str]:
    return torch._dynamo.list_backends(exclude_tags=())
