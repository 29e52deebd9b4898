"""The state of the U-Net call in progress, read by the runtime ops that the passes put into graphs.

Graph variants are specialised per input signature but not per step or mask: what changes between calls (the
recorded tensors of this step, the mask's index plan) reaches the graph through this context.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

import torch

from .cache import StepRecord
from .mask_plan import MaskPlan


@dataclasses.dataclass
class CallContext:
    """One U-Net call.

    Attributes:
        step: the step's record: written by record taps, read by sparse ops.
        plan: the mask's index plan (sparse calls).
        source: the source run's record of this step, read by cross-attention control (control calls).
        token_alignment: (B, tokens) long, for each token of the edited prompt the source token it shares, or -1.
        record_attention_maps: whether cross-attention saves its maps into `step` in this call.
        write_back: whether sparse calls store their fresh active pixels into `step` (continuous editing).
    """

    step: StepRecord
    plan: MaskPlan | None = None
    source: StepRecord | None = None
    token_alignment: torch.Tensor | None = None
    record_attention_maps: bool = False
    write_back: bool = False


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("fisedit_call", default=None)


def current() -> CallContext:
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError(
            "a fisedit graph variant was called outside a compiled U-Net call; call the module returned by "
            "fisedit_compiler.compile instead"
        )
    return ctx


@contextlib.contextmanager
def use(ctx: CallContext) -> Iterator[CallContext]:
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
