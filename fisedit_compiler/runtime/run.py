"""Runs and their modes: what a call of a compiled model does, and the state of one run, with one owner.

A *mode* is an immutable description of the calls it governs (record the source run, replay it under prompt
control, or compute a mask's region sparsely). A `Run` is one run of a compiled model (a source generation, an
edit): it owns the cache it records into and replays, its call counts per timestep (for step keys) and, per mode it
has been in, that mode's state (`ModeState`: calls so far, the mask plan, temporal reuse's handed-on tensors). The
code that enters a run owns it; a driver switches its mode between calls (`Run.switch`). Nothing here is shared
between runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Callable
from typing import Literal

import torch

from ..ir import CacheRef
from .cache import Direction, RecordCache, StepKey
from .mask_plan import MaskPlan


@dataclasses.dataclass(frozen=True, eq=False)
class RecordMode:
    """Calls record the source run; the first `attention_maps` calls also save their cross-attention maps, and the
    first `maps_only` calls keep nothing else (`Policy.cache_dense_steps`). `direction`: the run's, part of its step
    keys (an inversion's calls never replace a generation's)."""

    attention_maps: int = 0
    direction: Direction = "generation"
    maps_only: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class ControlMode:
    """Dense calls with cross-attention control (`token_alignment`: (B, tokens) long, for each token of the edited
    prompt the source token whose map it takes, or -1); they record into `pending`, and save their maps when
    `attention_maps` is set. The first `hold_layout` calls take the source run's layout features (the adapter's
    `layout_module`, a U-Net's mid block: `passes/tap_layout_features.py`), so that the objects stay where they
    were while the finer levels follow the edited prompt."""

    token_alignment: torch.Tensor
    pending: RecordCache
    attention_maps: bool = True
    direction: Direction = "generation"
    hold_layout: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class SparseMode:
    """Calls compute only the active blocks of `mask` (a bool map at latent resolution, `(H, W)` or
    `(B, 1, H, W)`, already validated); with `write_back`, they store them into the cache. With a
    `token_alignment` (as `ControlMode`'s) the first `control_calls` calls (None: every call) are under
    cross-attention control: their cross-attentions take the recorded step's maps (the source run's, recorded with
    `RecordMode.attention_maps`) at the active pixels for the tokens it aligns."""

    mask: torch.Tensor
    write_back: bool = False
    direction: Direction = "generation"  # of the recorded run the calls replay
    token_alignment: torch.Tensor | None = None
    control_calls: int | None = None


Mode = RecordMode | ControlMode | SparseMode


def require_recorded(cache: RecordCache) -> tuple[int, ...]:
    """The latent shape of the run `cache` holds; raises if it holds none (sparse calls replay a recorded run)."""
    if not len(cache):
        raise RuntimeError(
            "sparse() needs a recorded source run, and nothing is recorded: run the source generation inside "
            "`with unet.record():` first"
        )
    return cache.latent_shape
CallKind = Literal["eager", "record", "record_maps", "control", "sparse", "sparse_control", "sparse_reuse"]


@dataclasses.dataclass
class ModeState:
    """What a run keeps for one mode it has been in: its calls so far, its mask plan (sparse modes: built once, when
    the run first enters the mode) and the last full call's deep-level outputs (temporal reuse)."""

    calls: int = 0
    plan: MaskPlan | None = None
    reused: dict[CacheRef, torch.Tensor] | None = None
    mask_digest: str = ""  # sparse modes: of the mask's shape and bits (`next_call_kind`)


def _digest(mask: torch.Tensor) -> str:
    bits = mask.detach().to("cpu", torch.bool).contiguous()
    return f"{tuple(bits.shape)}:{hashlib.blake2b(bits.numpy().tobytes(), digest_size=16).hexdigest()}"


class Run:
    """One run of a compiled model. `planner` builds a sparse mode's mask plan (the executor's, with the model's
    block sizes and cost constants); `reuse_interval` is `Policy.deep_reuse_interval`."""

    def __init__(self, mode: Mode | None, cache: RecordCache,
                 planner: Callable[[torch.Tensor, tuple[int, int] | None], MaskPlan],
                 reuse_interval: int = 1):
        self.cache = cache
        self.calls_per_timestep: Counter[StepKey] = Counter()
        self._planner = planner
        self.reuse_interval = reuse_interval
        self._states: dict[int, tuple[Mode, ModeState]] = {}  # by id(mode); the mode kept alive with its state
        self._mode: Mode | None = None
        self.switch(mode)

    @property
    def mode(self) -> Mode | None:
        """The current mode (None: calls run the eager model)."""
        return self._mode

    @property
    def state(self) -> ModeState:
        """The current mode's state."""
        if self._mode is None:
            raise RuntimeError("a run without a mode runs the eager model and keeps no mode state")
        return self._states[id(self._mode)][1]

    @property
    def plan(self) -> MaskPlan | None:
        """The current sparse mode's mask plan (None in other modes)."""
        return self.state.plan if isinstance(self._mode, SparseMode) else None

    def switch(self, mode: Mode | None) -> None:
        """Make `mode` the run's mode from the next call on. A mode entered before continues with its state; a
        sparse mode entered for the first time gets its mask plan now."""
        if mode is not None and id(mode) not in self._states:
            state = ModeState()
            if isinstance(mode, SparseMode):
                require_recorded(self.cache)
                state.plan = self._planner(mode.mask, self.cache.extent)
                state.mask_digest = _digest(mode.mask)
            self._states[id(mode)] = (mode, state)
        self._mode = mode

    def release_memory(self) -> None:
        """The run's calls are over for now (its last denoising step has ended): its mask plans drop what they made
        for the programs (`MaskPlan.release_values`) and temporal reuse forgets its deep-level outputs, so that what
        follows (the VAE's decode) reuses that memory. A later call makes them again (a full call first)."""
        for _, state in self._states.values():
            if state.plan is not None:
                state.plan.release_values()
            state.reused = None

    def next_key(self, timestep: torch.Tensor, batch: int) -> StepKey:
        """The step key of the next call at `timestep` with `batch` items: its occurrence counts the run's calls at
        that timestep (a replay cycles through the recorded ones)."""
        key = StepKey.of(timestep, batch, direction=self._mode.direction)
        occurrence = self.calls_per_timestep[key]
        self.calls_per_timestep[key] += 1
        if not isinstance(self._mode, RecordMode):
            occurrence %= max(1, self.cache.occurrences(key))
        return dataclasses.replace(key, occurrence=occurrence)

    def next_call_reuses(self) -> bool:
        """Whether the next sparse call reuses deep levels: not the first of each `reuse_interval` calls, and only
        after a full call."""
        state = self.state
        return self.reuse_interval > 1 and state.calls % self.reuse_interval != 0 and bool(state.reused)

    def next_call_kind(self) -> tuple[CallKind, str]:
        """What the next call does, and over which mask (a digest of a sparse mode's mask; "" otherwise): calls of
        one model with the same kind, mask and input shapes do the same work, in this run or another (a meter
        counts their MACs once)."""
        mode = self._mode
        if mode is None:
            return "eager", ""
        if isinstance(mode, RecordMode):
            return ("record_maps" if self.state.calls < mode.attention_maps else "record"), ""
        if isinstance(mode, ControlMode):
            return "control", ""
        if self.next_call_reuses():
            return "sparse_reuse", self.state.mask_digest
        return ("sparse_control" if self.next_call_controls() else "sparse"), self.state.mask_digest

    def next_call_controls(self) -> bool:
        """Whether the next call of a sparse mode is under cross-attention control (`SparseMode.control_calls`)."""
        mode = self._mode
        return isinstance(mode, SparseMode) and mode.token_alignment is not None \
            and (mode.control_calls is None or self.state.calls < mode.control_calls)
