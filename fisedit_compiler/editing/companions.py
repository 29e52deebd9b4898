"""Models a pipeline calls beside its denoiser at every step, compiled and run in step with it: a ControlNet.

An `EditSession` over a ControlNet pipeline compiles `pipe.controlnet` too (`adapters/controlnet.py`) and gives it a
record cache of its own, in the session's memory budget. Each run of the denoiser is then a `RunGroup`: switching
its mode switches every companion to the matching mode of its own, so the ControlNet computes what the U-Net's calls
read of it as sparsely as the U-Net computes:

- a record run records the companions too (their cross-attention maps for the same steps);
- an edit's dense steps run them under the same cross-attention control, into pending records of their own, which
  replace their cache's steps when the U-Net's do (`replace_steps`);
- its sparse steps run them sparse over the same mask, each with its own mask plan (its own channel widths).

Without this, an edit with a ControlNet would pay a dense ControlNet (about half a U-Net) at every step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from torch import nn

from ..compiler import CompiledUNet, ControlMode, RecordMode, SparseMode
from ..policy import Policy
from ..runtime.cache import RecordCache
from ..runtime.run import Run
from ..runtime.tiered_store import MemoryBudget, make_store

COMPANIONS = ("controlnet",)  # the pipeline attributes compiled beside the denoiser


@dataclasses.dataclass
class Companion:
    """A compiled companion model (`name`: its pipeline attribute), its record cache and the memory budget its
    records (pending ones too) count in."""

    name: str
    model: CompiledUNet
    cache: RecordCache
    budget: MemoryBudget


def compile_companions(pipe, policy: Policy, budget: MemoryBudget) -> list[Companion]:
    """The pipeline's companion models, compiled in place, each with a record cache in `budget`."""
    found = []
    for name in COMPANIONS:
        model = getattr(pipe, name, None)
        if not isinstance(model, nn.Module):
            continue
        if isinstance(model, CompiledUNet):
            model = model.unet
        if not isinstance(model, _compilable()):
            raise ValueError(f"{type(pipe).__name__}.{name} is a {type(model).__name__}: an EditSession compiles a "
                             "single ControlNetModel (a MultiControlNet is not supported yet)")
        compiled = CompiledUNet(model, policy)
        setattr(pipe, name, compiled)
        found.append(Companion(name, compiled, RecordCache(policy.storage_dtype, make_store(policy, budget)), budget))
    return found


def _compilable() -> tuple[type, ...]:
    from diffusers import ControlNetModel

    return (ControlNetModel,)


class RunGroup:
    """A run of the denoiser and runs of its companions, whose modes switch together (see the module docstring).
    It reads like the denoiser's `Run` (`mode`, `plan`, `cache`, `switch`)."""

    def __init__(self, primary: Run, companions: list[Companion]):
        self.primary = primary
        self.companions = companions
        self.runs: list[Run] = []
        # per denoiser mode (by id, the mode kept alive): each companion's matching mode, made once, so that a
        # mode entered again continues its state in the companions' runs too
        self._followers: dict[int, tuple[object, list[object]]] = {}

    @property
    def mode(self):
        return self.primary.mode

    @property
    def plan(self):
        return self.primary.plan

    @property
    def cache(self) -> RecordCache:
        return self.primary.cache

    def followers(self, mode) -> list[object]:
        """The companions' modes matching the denoiser's `mode`."""
        if mode is None:
            return [None] * len(self.companions)
        if id(mode) not in self._followers:
            self._followers[id(mode)] = (mode, [_follow(mode, c) for c in self.companions])
        return self._followers[id(mode)][1]

    def switch(self, mode) -> None:
        self.primary.switch(mode)
        for run, follower in zip(self.runs, self.followers(mode)):
            run.switch(follower)

    def release_memory(self) -> None:
        for run in (self.primary, *self.runs):
            run.release_memory()

    def replace_steps(self, pending: RecordCache, **kwargs) -> None:
        """The companions' counterpart of ``session.cache.replace_steps(pending, ...)``: their pending records of
        the control mode that wrote into `pending` replace their caches' steps."""
        for mode, followers in self._followers.values():
            if isinstance(mode, ControlMode) and mode.pending is pending:
                for companion, follower in zip(self.companions, followers):
                    companion.cache.replace_steps(follower.pending, **kwargs)

    def close(self) -> None:
        """Let go of the companions' pending records."""
        for mode, followers in self._followers.values():
            if isinstance(mode, ControlMode):
                for follower in followers:
                    follower.pending.close()
        self._followers.clear()


def _follow(mode, companion: Companion):
    """A companion's mode matching the denoiser's `mode`."""
    if isinstance(mode, RecordMode):
        return dataclasses.replace(mode)
    if isinstance(mode, ControlMode):  # (the layout is held through the U-Net's mid block alone)
        pending = RecordCache(companion.cache.dtype, make_store(companion.model.policy, companion.budget))
        return dataclasses.replace(mode, pending=pending, hold_layout=0)
    if isinstance(mode, SparseMode):
        return dataclasses.replace(mode)
    raise TypeError(f"no companion mode for {type(mode).__name__}")


@contextlib.contextmanager
def run_group(unet: CompiledUNet, cache: RecordCache, companions: list[Companion], mode) -> Iterator[RunGroup]:
    """Enter a run of `unet` over `cache` in `mode`, and runs of the companions over their caches in theirs. The
    companions' pending records outlive it, until `RunGroup.close` (after `replace_steps`, as the caller's own)."""
    with contextlib.ExitStack() as stack:
        group = RunGroup(stack.enter_context(unet.run(mode, cache=cache)), companions)
        for companion, follower in zip(companions, group.followers(mode)):
            group.runs.append(stack.enter_context(companion.model.run(follower, cache=companion.cache)))
        yield group


def check_control_image(old, new, mask) -> None:
    """An edit's new control image may differ from the source's only inside the edit's `mask` ((h, w) bool at latent
    resolution, scaled to the images' size): outside it the records (the denoiser's, a ControlNet's) are the source's,
    which saw the old image. Both are PIL images of one size (or arrays the pipeline takes, compared as they are)."""
    import numpy as np
    import torch
    from PIL import Image

    as_array = (lambda im: np.asarray(im.convert("RGB"))) if isinstance(old, Image.Image) else np.asarray
    before, after = as_array(old), as_array(new)
    if before.shape != after.shape:
        raise ValueError(f"the edit's control image has shape {after.shape}, the source's {before.shape}: give one of the "
                         "same size that differs from it only inside the mask")
    changed = torch.from_numpy((before != after).reshape(*before.shape[:2], -1).any(-1))
    inside = torch.nn.functional.interpolate(mask[None, None].float(), size=changed.shape, mode="nearest")[0, 0] > 0
    outside = int((changed & ~inside).sum())
    if outside:
        raise ValueError(f"the edit's control image differs from the source's at {outside} pixels outside the mask: the "
                         "records there are the source's, made with the old one, so the edit would not follow it; "
                         "change it inside the mask only, or generate a new source with it")
