"""Freed memory kept for reuse (`runtime.memory`): what it changes, and when a compiled model turns it on."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from fisedit_compiler.runtime import memory

pytestmark = pytest.mark.skipif(memory._mallopt() is None, reason="glibc's malloc only (Linux)")


def _run(script: str) -> str:
    """`script` in a fresh interpreter (the setting is process-wide): its last line of output."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


PAGE_FAULTS = """
    import resource, torch
    from fisedit_compiler.runtime import memory
    {setup}
    for _ in range(3):  # 64 MiB, written and freed: above any mmap threshold of glibc
        torch.ones(2 ** 24)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        torch.ones(2 ** 24)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_retained_memory_is_reused_without_the_system_handing_out_fresh_pages():
    fresh = int(_run(PAGE_FAULTS.format(setup="")))
    retained = int(_run(PAGE_FAULTS.format(setup="assert memory.retain_freed_memory()")))
    assert fresh >= 5 * 16  # every tensor mapped anew: at least one fault per 2 MiB huge page
    assert retained < fresh / 10


@pytest.mark.slow  # a process compiling and running two U-Nets: fifteen seconds
def test_a_compiled_models_first_run_on_the_cpu_retains_freed_memory_unless_its_policy_says_not():
    """One process: a model compiled with retain_freed_memory=False runs without turning it on, then one compiled
    with True turns it on at its first run."""
    script = """
        import torch
        import fisedit_compiler as fisedit
        from fisedit_compiler.runtime import memory
        from fisedit_compiler.models import example_unet_inputs, random_unet
        unet = random_unet("sd2", "tiny", seed=0)
        inputs = example_unet_inputs(unet, batch=1, size=16)
        assert not memory.retains_freed_memory()
        seen = []
        for flag in (False, True):
            kept = fisedit.compile(unet, fisedit.Policy(retain_freed_memory=flag))
            with torch.no_grad(), kept.record():
                kept(**inputs)
            seen.append(memory.retains_freed_memory())
        print(*seen)
    """
    assert _run(script).split() == ["False", "True"]


def test_retaining_can_be_undone():
    assert _run("""
        from fisedit_compiler.runtime import memory
        print(memory.retain_freed_memory() and not memory.retain_freed_memory(False)
              and not memory.retains_freed_memory())
    """) == "True"


def test_a_cache_budget_counts_the_memory_the_process_kept_for_reuse():
    """A fraction of the memory available sizes a session's cache: what the process freed and kept (invisible to the
    system as available) goes back first, so that a session made after dense generations gets the same budget."""
    assert _run("""
        import torch
        import fisedit_compiler as fisedit
        from fisedit_compiler.runtime import memory
        from fisedit_compiler.runtime.tiered_store import make_store

        def resident():
            return int(open("/proc/self/statm").read().split()[1]) * 4096

        memory.retain_freed_memory()
        x = torch.ones(2 ** 28)
        del x  # 1 GiB freed, kept by the process
        kept = resident()
        make_store(fisedit.Policy(cache_budget=0.5))
        print(kept - resident() > 2 ** 29)
    """) == "True"


def test_freezing_long_lived_objects_leaves_them_out_of_collections():
    """After `freeze_long_lived_objects` every object alive is in the permanent generation (a full collection no
    longer scans it), and garbage made later is still collected."""
    import gc

    from fisedit_compiler.runtime.collector import freeze_long_lived_objects

    class Cycle:
        pass

    try:
        freeze_long_lived_objects()
        assert gc.get_freeze_count() > 1000
        cycle = Cycle()
        cycle.me = cycle
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()  # (the rest of this test process collects as before)
