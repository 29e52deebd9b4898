"""The edit schedule: which steps of an edit run dense, when the mask is decided, which steps refresh the cache.

An edit of `steps` denoising steps runs in phases:

- **control** (steps `0 .. dense_steps - 1`): dense, under prompt control (the source run's cross-attention maps
  for shared words; for a word swap the first `hold_layout` of them also take the source's layout features, and a
  word swap's control phase lasts at least those). Their records go to a pending cache.
- at the end of step `dense_steps - 1` the mask is decided: a user's is known; otherwise it is detected from the
  latents' drift over steps `detect[0] .. detect[1]` (1-based). An empty mask ends the edit (nothing changes).
- **sparse** (the remaining steps): only the mask's region is computed; the rest is the source's. Those below
  `controlled` stay under the control (the source's maps at the region's pixels).
- **refresh**: with `refresh_every` = r, every r-th step after the switch (none whose cross-attention maps a later
  edit reads: steps below `maps_steps`) runs dense instead and records, refreshing what sparse steps reuse.

`EditSchedule.plan(policy, steps, ...)` makes one from a `Policy`; the object itself needs no pipeline or model.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..policy import Policy

Phase = Literal["control", "sparse", "refresh"]


@dataclasses.dataclass(frozen=True)
class EditSchedule:
    """The steps of one edit; see the module docstring."""

    steps: int
    dense_steps: int  # k: the control phase's steps, after which the mask is decided
    detect: tuple[int, int] | None  # (t1, t2), 1-based, the steps the mask is detected from; None: a user's mask
    maps_steps: int  # the first steps whose cross-attention maps later (detected) edits read
    maps_only: int  # the first steps a record keeps only the maps of (`Policy.cache_dense_steps=False`)
    hold_layout: int = 0  # the first control steps that take the source's layout features
    refresh_every: int | None = None
    controlled: int = 0  # the first steps whose cross-attention is under control, dense or sparse

    @staticmethod
    def plan(policy: Policy, steps: int, user_mask: bool, swaps_words: bool) -> EditSchedule:
        """The schedule `policy` gives an edit of `steps` steps, with or without a user's mask; `swaps_words`: the
        edited prompt swaps words of the source's only (then its first steps hold the source's layout)."""
        hold = policy.hold_layout_schedule(steps) if swaps_words else 0
        if user_mask:
            dense, detect = max(hold, policy.user_mask_schedule(steps)), None
        else:
            dense, t1, t2 = policy.edit_schedule(steps)
            dense, detect = max(hold, dense), (t1, t2)
        maps_steps = policy.maps_schedule(steps)
        return EditSchedule(steps, dense, detect, maps_steps, policy.recorded_activations_from(steps), hold,
                            policy.refresh_every, policy.edit.controlled_schedule(steps))

    def decides_mask_after(self, step: int) -> bool:
        """Whether the mask is decided at the end of `step` (0-based): the last control step."""
        return step == self.dense_steps - 1

    def phase(self, step: int) -> Phase:
        """What `step` (0-based) runs as, if the edit's region leaves something to reuse (else every step after the
        switch runs dense and records: `after_switch_when_all_recomputed`)."""
        if step < self.dense_steps:
            return "control"
        if self.refresh_every is not None and step >= self.maps_steps \
                and (step - self.dense_steps + 1) % self.refresh_every == 0:
            return "refresh"
        return "sparse"

    def controlled_sparse_steps(self) -> int:
        """How many of the steps after the switch are under control (the first ones)."""
        return max(0, self.controlled - self.dense_steps)

    def remaining_maps_steps(self) -> int:
        """Of the steps whose maps later edits read, how many run after the switch."""
        return max(0, self.maps_steps - self.dense_steps)

    def remaining_maps_only(self) -> int:
        """Of the steps a record keeps only the maps of, how many run after the switch."""
        return max(0, self.maps_only - self.dense_steps)

    def records_all_maps(self, region_is_everything: bool) -> bool:
        """Whether the edit run records the cross-attention maps of every step later edits read: its control phase
        covers them, or the region is everything (the steps after the switch then run dense and record)."""
        return self.dense_steps >= self.maps_steps or region_is_everything
