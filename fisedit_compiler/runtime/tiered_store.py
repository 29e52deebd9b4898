"""A `CacheStore` with bounded memory: complete step records beyond a byte budget live in a folder on disk.

Recording writes a finished step to disk in the background when the resident steps pass the budget; a replay, which
reads the steps in the recorded order, loads step s+1 in the background while step s computes (`prefetch`, called by
`RecordCache.step`). Files are safetensors (no pickle; a file names its tensors' cache references in its metadata).
A background read or write that fails raises `CacheIOError` in the call that needs the step, never a hang.

Budget accounting: `resident_nbytes` counts the step records held in memory, except the one being written out (one
at a time, in the background); it is at most `budget_bytes` after every call (`RecordCache.step_done`) unless the
step just used is larger than the budget on its own. A record call starts by making room for a record of the size
of the largest so far. The step being written and the one being prefetched come on top: a budget should leave room for
two more steps (a step of SD 2 at 768x768 in fp32 is about 1.2 GiB).

Memory the process keeps: records are large and outlive the call that made them, so that once freed they would
leave holes in the C allocator's heap that the process keeps (measured on SD 2 at 96x96 latents: 4 GiB above what
the cache and the U-Net hold). The store returns free heap pages to the system whenever it lets records go, and
reads a step file into one allocation of its own (`read_safetensors`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch

from ..policy import Policy
from .cache import MemoryStore, StepKey, StepRecord, return_free_heap
from .safetensors_io import read_safetensors, write_safetensors


class CacheIOError(RuntimeError):
    """A step record could not be written to or read from the disk tier."""


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux `MemAvailable`), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class TieredStore:
    """Step records in memory up to `budget_bytes`, the rest in `folder` (default: a temporary folder, removed with
    the store). See the module docstring."""

    def __init__(self, budget_bytes: int, folder: str | Path | None = None):
        if budget_bytes < 0:
            raise ValueError(f"the cache budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._folder = Path(folder) if folder is not None else None
        self._own_folder = folder is None
        self._order: list[StepKey] = []
        self._resident: collections.OrderedDict[StepKey, StepRecord] = collections.OrderedDict()  # LRU order
        self._on_disk: dict[StepKey, tuple[Path, int]] = {}
        self._writing: dict[StepKey, concurrent.futures.Future] = {}  # one spill at a time (`flush` may queue more)
        self._flushing: set[StepKey] = set()  # keys being written that stay resident (`flush`)
        self._stale: set[StepKey] = set()  # keys modified while being written: their new file is already stale
        self._loading: dict[StepKey, concurrent.futures.Future] = {}
        self._clean: set[StepKey] = set()  # resident records equal to their file (read back, not modified since)
        self._pool_instance: concurrent.futures.ThreadPoolExecutor | None = None  # made at the first spill
        self._step_bytes = 0  # the largest record settled: what a record being made may need (a maps-only step
        # of `Policy.cache_dense_steps=False` is small, the next full one is not)
        self.wait_seconds = 0.0  # time `get` spent waiting for the disk tier
        self.spilled = 0  # steps written to disk so far
        self.device: torch.device | None = None  # where loaded records go (the device of the first record put)
        self.dtype: torch.dtype | None = None  # their storage dtype (`StepRecord.dtype`, the same for all records)

    # --- CacheStore ----------------------------------------------------------------------------------------------

    def keys(self) -> list[StepKey]:
        return list(self._order)

    @property
    def nbytes(self) -> int:
        resident = sum(r.nbytes for k, r in self._resident.items() if k not in self._on_disk)
        return resident + sum(n for _, n in self._on_disk.values())

    @property
    def resident_nbytes(self) -> int:
        """Bytes of the step records held in memory, not counting the one being written to disk (on its way out)."""
        return sum(r.nbytes for k, r in self._resident.items() if k not in self._writing)

    def put(self, key: StepKey, record: StepRecord) -> None:
        """Take `record` (at a record call's start, still empty: room is made for a step of the size of the
        largest one so far, so that the budget holds when it is filled)."""
        self._forget_file(key)
        if key not in self._order:
            self._order.append(key)
        self._resident[key] = record
        self._resident.move_to_end(key)
        self._clean.discard(key)
        self.dtype = record.dtype
        if self.device is None:
            first = next((v for v in record.values() if isinstance(v, torch.Tensor)), None)
            self.device = first.device if first is not None else None
        self._enforce_budget(keep=key, reserve=max(0, self._step_bytes - record.nbytes))

    def get(self, key: StepKey) -> StepRecord:
        if key not in self._order:
            raise KeyError(key)
        if key not in self._resident:
            future = self._loading.pop(key, None)
            start = time.perf_counter()
            try:
                record = future.result() if future is not None else self._load(key)
            except CacheIOError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of the background read surfaces here
                raise CacheIOError(f"reading the recorded {key.describe()} from {self._on_disk[key][0]} failed: {e}"
                                   ) from e
            finally:
                self.wait_seconds += time.perf_counter() - start
            self._resident[key] = record
            self._clean.add(key)
        self._resident.move_to_end(key)
        self._enforce_budget(keep=key)
        return self._resident[key]

    def evict(self, key: StepKey) -> None:
        if key in self._writing:  # let its write finish first: it would record a file for a forgotten key
            self._collect_writes(keep=key, wait=True)
        self._resident.pop(key, None)
        self._clean.discard(key)
        future = self._loading.pop(key, None)
        if future is not None:
            future.cancel()
        self._forget_file(key)
        self._order.remove(key)

    # --- the disk tier ----------------------------------------------------------------------------------------

    def prefetch(self, key: StepKey) -> None:
        """Start loading `key` in the background if it is on disk only (a replay's next step)."""
        if key in self._resident or key in self._loading or key not in self._on_disk:
            return
        self._loading[key] = self._pool.submit(self._load, key)

    def settle(self, key: StepKey) -> None:
        """The call using `key` is done: enforce the budget, keeping `key` resident (the next call may be the same
        step, e.g. CFG batches or a second sampler call)."""
        self._step_bytes = max(self._step_bytes, self._resident[key].nbytes)
        self._enforce_budget(keep=key)

    def flush(self) -> None:
        """A run has ended: start writing the resident records that have no current file (in the background; they
        are resident anyway, so several writes may be queued), so that the next run can let them go without writing
        them first: a replay's first step would otherwise hold the last recorded step while it is written, next to
        the steps it loads."""
        for key in list(self._resident):
            if key in self._writing or (key in self._clean and key in self._on_disk):
                continue
            self._flushing.add(key)
            self._writing[key] = self._pool.submit(self._spill, key, self._resident[key])

    def mark_dirty(self, key: StepKey) -> None:
        """The resident record of `key` was modified in place (write-back): its file is stale (also the one being
        written, if any: the record then stays resident, to be written again)."""
        self._clean.discard(key)
        if key in self._writing:
            self._stale.add(key)

    @property
    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool_instance is None:
            self._pool_instance = concurrent.futures.ThreadPoolExecutor(max_workers=2,
                                                                        thread_name_prefix="fisedit-cache")
        return self._pool_instance

    def close(self) -> None:
        """Wait for background work, then remove a folder this store created (the store stays usable)."""
        if self._pool_instance is not None:
            self._pool_instance.shutdown(wait=True, cancel_futures=True)
            self._pool_instance = None
        if self._own_folder and self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def _folder_path(self) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="fisedit-cache-"))
            # removed with the store, or at the latest when the interpreter exits (a store alive until then is
            # never garbage collected, and its step files would stay on disk)
            weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    def _enforce_budget(self, keep: StepKey, reserve: int = 0) -> None:
        """Move least recently used complete records to disk until the resident ones and `reserve` more bytes fit
        the budget; one write is in flight at a time (it overlaps the next step's compute), `keep` (the step in
        use) stays. The memory of records let go is returned to the system (`cache.return_free_heap`)."""
        dropped = self._collect_writes(keep)
        while self.resident_nbytes + reserve > self.budget_bytes:
            victim = next((k for k in self._resident if k != keep and k not in self._writing), None)
            if victim is None:
                break  # only the step in use is resident: it may exceed the budget on its own
            if victim in self._clean and victim in self._on_disk:
                del self._resident[victim]  # its file is current: nothing to write
                dropped = True
                continue
            if self._writing:
                dropped |= self._collect_writes(keep, wait=True)
                continue
            self._writing[victim] = self._pool.submit(self._spill, victim, self._resident[victim])
        if dropped:
            return_free_heap()

    def _collect_writes(self, keep: StepKey, wait: bool = False) -> bool:
        """Finish the writes that are done (all, with `wait`); whether a record was let go."""
        dropped = False
        for key, future in list(self._writing.items()):
            if not (wait or future.done()):
                continue
            del self._writing[key]
            self._on_disk[key] = future.result()  # a failed write raises here (CacheIOError)
            self.spilled += 1
            stale = key in self._stale
            self._stale.discard(key)
            if key == keep or key in self._flushing or stale:
                self._flushing.discard(key)
                if not stale:
                    self._clean.add(key)  # in use again meanwhile, or flushed: stays resident, equal to its file
            else:
                self._resident.pop(key, None)
                self._clean.discard(key)
                dropped = True
        return dropped

    def _spill(self, key: StepKey, record: StepRecord) -> tuple[Path, int]:
        """(Background thread: file I/O only.) Write `record` to its file."""
        path = self._folder_path() / f"step-{self._order.index(key):05d}.safetensors"
        try:
            tensors, names = record.to_tensors(contiguous=False)
            write_safetensors(path, tensors, {"refs": json.dumps(names)})
        except Exception as e:  # noqa: BLE001
            raise CacheIOError(f"writing the recorded {key.describe()} to {path} failed: {e}") from e
        return path, record.nbytes

    def _load(self, key: StepKey) -> StepRecord:
        """(Background thread.) The record of `key` read back from its file: on the CPU, into one allocation whose
        views its tensors are (a compacted record, `StepRecord.compact`), with one read of the file."""
        path, _ = self._on_disk[key]
        try:
            slab, tensors, metadata = read_safetensors(path)
            names = json.loads(metadata["refs"])
            if self.device is not None and self.device.type != "cpu":
                tensors = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
                slab = None
            record = StepRecord.from_tensors(tensors, names, self.dtype)
            record.slab = slab
            return record
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise CacheIOError(f"reading the recorded {key.describe()} from {path} failed: {e}") from e

    def _forget_file(self, key: StepKey) -> None:
        entry = self._on_disk.pop(key, None)
        if entry is not None:
            entry[0].unlink(missing_ok=True)


def make_store(policy: Policy) -> MemoryStore | TieredStore:
    """The store `policy.cache_budget` asks for: a `TieredStore` whose budget is that many bytes, or that fraction
    of the memory available now; "unbounded": a `MemoryStore`."""
    budget = policy.cache_budget
    if budget == "unbounded":
        return MemoryStore()
    if isinstance(budget, float):
        available = available_memory()
        if available is None:
            raise RuntimeError(
                "cannot tell how much memory is available on this system to size the record cache: give "
                "Policy(cache_budget=<bytes>) or Policy(cache_budget='unbounded')"
            )
        budget = int(budget * available)
    return TieredStore(budget, policy.cache_dir)
