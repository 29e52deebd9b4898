"""Keep Python's cyclic garbage collector off the objects an application holds for its whole life.

A full collection (generation 2) scans every object the collector tracks. With a pipeline loaded and a compiled
model's graph variants built (tens of thousands of FX nodes, their metadata, the bound programs), one took
0.29-0.40 s in the shapes model's demo process (2-core AMD EPYC), and the collector runs one whenever the objects
that survived younger collections grow by a quarter, which building the variants does: it fell inside the
session's first edit, a third of that edit's time to its picture.

`freeze_long_lived_objects()` collects once and moves every surviving object into the permanent generation
(`gc.freeze`): later full collections scan only what was made since (0.01 s in the same process). It is
process-wide, so it is for code that owns its process and knows when its long-lived objects are made: the demo
and the CLI call it once their source run is recorded. An object frozen is still freed by reference counting;
only cyclic garbage among frozen objects stays until `gc.unfreeze()`, which the process does at exit (so that its
final collection sees everything, as native extensions expect).
"""

from __future__ import annotations

import atexit
import functools
import gc


def freeze_long_lived_objects() -> None:
    """Collect the garbage now, then take every object left out of later collections' scans (`gc.freeze`)."""
    gc.collect()
    gc.freeze()
    _unfreeze_at_exit()


@functools.cache
def _unfreeze_at_exit() -> None:
    atexit.register(gc.unfreeze)
