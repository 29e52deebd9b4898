"""The environment variables the package reads, read in this one place, once.

    from fisedit_compiler import environment
    environment.current().kernels          # "" (unset), "reference" or "triton"

`current()` is the `Environment` read when this module was first imported (which importing `fisedit_compiler`
does). Setting a variable later changes nothing until `reread()` reads them again: a test that sets one calls
``monkeypatch.setenv(...)`` and then ``environment.reread()`` (tests/conftest.py re-reads after every test, so that
nothing a test set carries over). `read(environ)` builds an `Environment` from any mapping without changing
`current()`. Nothing is validated here: the module that uses a value says what is wrong with it, when it uses it.

This module imports nothing of the package (it is the bottom room, tests/test_layering.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path

KERNELS = "FISEDIT_KERNELS"
DUMP_DIR = "FISEDIT_DUMP_DIR"
DUMP_SVG = "FISEDIT_DUMP_SVG"
CACHE_DIR = "FISEDIT_CACHE_DIR"
OMP_WAIT_POLICY = "OMP_WAIT_POLICY"
VARIABLES = (KERNELS, DUMP_DIR, DUMP_SVG, CACHE_DIR, OMP_WAIT_POLICY)
"""Every variable the package reads (docs/policy.md, "Environment variables")."""


@dataclasses.dataclass(frozen=True)
class Environment:
    """The package's environment variables, as read."""

    kernels: str = ""
    """FISEDIT_KERNELS: "reference" or "triton" forces the kernels' implementation; "" (unset): by device and dtype
    (`kernels.select_backend`, which rejects other values)."""
    dump_dir: str | None = None
    """FISEDIT_DUMP_DIR: a folder for graph dumps when `Policy.dump_dir` is None (None: unset or empty)."""
    dump_svg: bool = True
    """FISEDIT_DUMP_SVG: False when it is "0" (dumps write DOT and JSON only)."""
    cache_dir: Path = dataclasses.field(default_factory=lambda: Path.home() / ".cache" / "fisedit")
    """FISEDIT_CACHE_DIR: where calibrated cost constants are kept (default ~/.cache/fisedit)."""
    omp_wait_policy: str | None = None
    """OMP_WAIT_POLICY as set (None: unset). The OpenMP runtime reads it itself; the package only reports it."""


def read(environ: Mapping[str, str] | None = None) -> Environment:
    """The `Environment` of `environ` (default: `os.environ`, now); changes nothing."""
    env = os.environ if environ is None else environ
    cache_dir = env.get(CACHE_DIR)
    return Environment(
        kernels=env.get(KERNELS, ""),
        dump_dir=env.get(DUMP_DIR) or None,
        dump_svg=env.get(DUMP_SVG, "1") != "0",
        cache_dir=Path(cache_dir) if cache_dir else Path.home() / ".cache" / "fisedit",
        omp_wait_policy=env.get(OMP_WAIT_POLICY),
    )


_current = read()


def current() -> Environment:
    """The environment the package runs with: read at import, or by the last `reread()`."""
    return _current


def reread() -> Environment:
    """Read the variables from `os.environ` again and make that `current()`; returns it."""
    global _current
    _current = read()
    return _current


def default_for_libraries(**variables: str) -> None:
    """Set other libraries' environment variables that are not set yet (the editing app's for Gradio: its upload
    folder, no analytics), before those libraries are imported; variables already set are the user's and stay."""
    for name, value in variables.items():
        os.environ.setdefault(name, value)
