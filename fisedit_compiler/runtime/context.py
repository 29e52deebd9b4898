"""The state of the U-Net call in progress, read by the runtime ops that the passes put into graphs.

Graph variants are specialised per input signature but not per step or mask: what changes between calls (the
recorded tensors of this step, the mask's index plan) reaches the graph through this context.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator

from .cache import StepRecord
from .mask_plan import MaskPlan


@dataclasses.dataclass
class CallContext:
    """One U-Net call: `step` is written by record taps, or read by sparse ops along with `plan`."""

    step: StepRecord
    plan: MaskPlan | None = None


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
