"""Launch configurations of the Triton kernels: autotuned on a GPU, one fixed small shape under the interpreter.

Importing this module imports triton; only the Triton kernel modules do, and `kernels` imports those lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import triton

# Triton decides at decoration time whether `@triton.jit` functions run in its CPU interpreter (TRITON_INTERPRET=1).
INTERPRETED: bool = triton.knobs.runtime.interpret


def autotune(cuda_configs: Sequence[triton.Config], interpreter_config: triton.Config, key: list[str]) -> Callable:
    """`triton.autotune` over `cuda_configs` on a GPU: the first call per `key` value (and argument dtypes)
    benchmarks them, later calls reuse the choice (also cached on disk across processes). Under the interpreter,
    `interpreter_config` alone: with one config nothing is benchmarked, since interpreter timings mean nothing, and
    tests stay fast."""
    configs = [interpreter_config] if INTERPRETED else list(cuda_configs)
    return triton.autotune(configs=configs, key=key, cache_results=True)
