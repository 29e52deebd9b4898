"""The registry of the project's operators, ``torch.ops.fisedit.*``, and of the Python functions behind them."""

from __future__ import annotations

from collections.abc import Callable

import torch

# registered operator (`torch.ops.fisedit.<name>.default`) -> the Python function behind it
DIRECT_CALLS: dict[torch._ops.OpOverload, Callable] = {}


def custom_op(name: str, function: Callable, mutates_args: tuple[str, ...] = ()):
    """Register `function` as the operator ``fisedit::<name>`` and remember it as the operator's direct call.

    Compiled programs hold the operators (one opaque node each for `torch.compile` and `torch.export`,
    `runtime.program.Program.gm`); eager programs call the functions instead (`Program.direct`): the
    registered-operator dispatch costs tens of microseconds a call, which on a small model is a large share of a
    sparse call."""
    op = torch.library.custom_op(f"fisedit::{name}", function, mutates_args=mutates_args)
    DIRECT_CALLS[getattr(torch.ops.fisedit, name).default] = function
    return op
