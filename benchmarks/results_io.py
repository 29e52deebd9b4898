"""What every benchmark's result file says about where it was measured, and how it is written.

The scripts in this folder import it as a sibling module (`python benchmarks/<name>.py` puts the folder on the
import path).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent


def git_revision() -> str | None:
    """The short revision of HEAD, with "+dirty" when tracked files differ from it; None outside a checkout."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> dict[str, Any]:
    """Date (UTC), git revision, CPU model, torch and Python versions, torch threads, threading settings, and
    whether the process keeps freed memory (`Policy.retain_freed_memory`: every run of a benchmark that turns it on
    at its start, dense and alternatives included)."""
    import torch  # here: cache_tiers.py's parent process measures children and never loads torch

    from fisedit_compiler.runtime.memory import retains_freed_memory

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": git_revision(), "cpu": cpu_model(),
            "torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "threading_env": threading_env(), "retains_freed_memory": retains_freed_memory()}


def set_up_allocator() -> None:
    """The allocator a compiled model's first run sets up (`Policy.retain_freed_memory`), for every run a benchmark
    times from here on: its dense and alternative runs as well as its compiled ones."""
    import fisedit_compiler as fisedit
    from fisedit_compiler.runtime.memory import retain_freed_memory

    retain_freed_memory(fisedit.Policy().retain_freed_memory)


def allocator_note(m: dict[str, Any]) -> str:
    """A results header's words on the allocator: whether freed memory was kept for reuse (`machine()`)."""
    return ", freed memory kept for reuse (`Policy.retain_freed_memory`)" if m.get("retains_freed_memory") else ""


# OpenMP settings that move timings: OMP_WAIT_POLICY=PASSIVE puts idle threads to sleep between parallel regions,
# and waking them costs every small op (a tiny U-Net's dense and sparse calls ran 2-3x slower with it, the sparse,
# with more small ops, more).
THREADING_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "KMP_BLOCKTIME", "GOMP_SPINCOUNT")


def threading_env() -> dict[str, str]:
    """The `THREADING_ENV` variables set for this run."""
    return {k: os.environ[k] for k in THREADING_ENV if k in os.environ}


def cpu_model() -> str:
    """The CPU's model name (Linux `/proc/cpuinfo`; elsewhere `platform.processor()` or the architecture). The
    project's 2-core machine has been an Intel Xeon and an AMD EPYC virtual machine: their wall-clock ratios differ
    (README, "Speed")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_results(out: str | Path, stem: str, data: dict[str, Any], text: str) -> None:
    """`<out>/<stem>.json` (the data) and `<out>/<stem>.md` (its text, also printed)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)
