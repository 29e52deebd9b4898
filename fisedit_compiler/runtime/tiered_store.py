"""A `CacheStore` with bounded memory: complete step records beyond a byte budget live in a folder on disk.

Recording writes a finished step to disk in the background when the resident steps pass the budget; a replay, which
reads the steps in the recorded order, loads step s+1 in the background while step s computes (`prefetch`, called by
`RecordCache.step`). Files are safetensors (no pickle; a file names its tensors' cache references in its metadata).
A background read or write that fails raises `CacheIOError` in the call that needs the step, never a hang.

Budget accounting: `resident_nbytes` counts every step record the store holds in memory: the ones in use or kept,
the ones being written (a record stays until its file is complete) and the one being read. It never exceeds
`budget_bytes`, unless the step in use is larger than the budget on its own. A record call first makes room for a
record of the size of the largest so far; a replay reads the next step ahead only if it fits. To overlap, writes
start ahead of need: after a call, dirty records beyond what the budget can keep beside two more steps (the next
one, and one still being written) start being written, and are let go once written. So a budget of at least two
steps overlaps writing and reading with compute, and a smaller one still works, waiting for the disk (a step of
SD 2 at 768x768 is 0.87 GiB in fp32). Records go in the order that runs will need them last: every run uses the
steps in the recorded order, so the step just used is needed again last (`_by_next_use`), and a replay reads from
disk only the steps that the budget cannot hold.

Memory the process keeps: records are large and outlive the call that made them, so that once freed they would
leave holes in the C allocator's heap that the process keeps (measured on SD 2 at 96x96 latents: 4 GiB above what
the cache and the U-Net hold). The store compacts a new record into one allocation (`StepRecord.compact`) when
its call settles it, returns free heap pages to the system whenever it lets records go and at a run's end, and
maps a step file into memory (`map_safetensors`: one allocation of its own, no copy).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch

from ..policy import Policy
from .cache import MemoryStore, StepKey, StepRecord, return_free_heap
from .safetensors_io import map_safetensors, write_safetensors


class CacheIOError(RuntimeError):
    """A step record could not be written to or read from the disk tier."""


class CacheBudgetError(MemoryError):
    """The memory budget of the record cache cannot be kept: one step's record is larger than the whole budget."""


@dataclasses.dataclass(frozen=True)
class MemoryBound:
    """What a session may hold in memory, in bytes, derived from the memory available when its budget was made
    (`available`, Linux's MemAvailable) on top of what the process held then (`base`: anonymous memory, the
    weights and everything else already loaded). The process's anonymous memory stays under `total`:

    - `cache`: step records (`MemoryBudget`: the cache, an edit's pending records, the decoder's record; the
      steps being read ahead and written behind are among them), `Policy.cache_budget` of `available`;
    - `calls`: what one call makes and frees again (its activations; a sparse call's plan also holds its convolution
      kernels flattened for its GEMMs, 2.0 GiB at SD 1.5's size, made once per edit and dropped before the decode;
      the VAE's decode), and the free memory the C allocator keeps for reuse (`Policy.retain_freed_memory`) until
      the run ends: what is left of `available` beside the cache and `headroom`;
    - `headroom`: `HEADROOM` of `available`, for the system (the page cache that spilled steps are read back
      through, other processes).
    """

    base: int
    available: int
    cache: int
    calls: int
    headroom: int

    @property
    def total(self) -> int:
        return self.base + self.cache + self.calls

    def check_calls(self, nbytes: int, what: str) -> None:
        """Refuse, before any run, a session whose calls are known to need more than `calls`: `nbytes` of `what`."""
        if nbytes > self.calls:
            raise CacheBudgetError(
                f"{what} take up to {_gib(nbytes)}, more than the {_gib(self.calls)} that the memory bound leaves "
                f"for a call beside the cache budget ({_gib(self.cache)}) and the system's share "
                f"({_gib(self.headroom)}) of the {_gib(self.available)} available: give a smaller "
                "Policy(cache_budget=...), or free memory")


HEADROOM = 0.1  # of the memory available: what a session's bound leaves to the system
DISK_RESERVE = 0.02  # of the disk tier's file system (at least 1 GiB): what spilled steps never take


class MemoryBudget:
    """Bytes of step records that the stores sharing it (an edit session's cache, its edit runs' pending records
    and its decoder's record) may hold in memory together: a store that needs room lets its own records go first,
    then the other stores' (those needed last by each). Stores sharing a budget are used from one thread.
    `bound`: the process's memory bound it is part of (`MemoryBound`), where the memory available was known."""

    def __init__(self, nbytes: int, bound: MemoryBound | None = None):
        if nbytes < 0:
            raise ValueError(f"the cache budget must be >= 0 bytes, got {nbytes}")
        self.nbytes = nbytes
        self.bound = bound
        self.stores: weakref.WeakSet[TieredStore] = weakref.WeakSet()
        self.peak = 0  # the most bytes held at once, as measured after every change of what is held

    def held(self) -> int:
        """Bytes of records the stores hold in memory now (kept, in use, being written or being read)."""
        return sum(store.resident_nbytes for store in self.stores)

    def note(self) -> None:
        self.peak = max(self.peak, self.held())


def anonymous_memory() -> int | None:
    """This process's anonymous resident bytes (Linux `RssAnon`: what the kernel cannot drop and would kill the
    process for), or None where unknown."""
    return _proc_bytes("/proc/self/status", "RssAnon")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux `MemAvailable`), or None where unknown."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def _proc_bytes(path: str, field: str) -> int | None:
    """A "<field>: <n> kB" line of a Linux /proc file, in bytes; None where the file or the field is missing."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class TieredStore:
    """Step records in memory up to a budget (bytes, or a `MemoryBudget` shared with other stores), the rest on
    disk: in `folder` if given (kept), else in a spill folder of its own made in `parent` (default: the system's
    temporary folder) and removed with the store (`spill_folder`). See the module docstring."""

    def __init__(self, budget_bytes: int | MemoryBudget, folder: str | Path | None = None,
                 parent: str | Path | None = None):
        self.budget = budget_bytes if isinstance(budget_bytes, MemoryBudget) else MemoryBudget(budget_bytes)
        self.budget.stores.add(self)
        self._folder = Path(folder) if folder is not None else None
        self._own_folder = folder is None
        self._parent = Path(parent) if parent is not None else None
        self._order: list[StepKey] = []
        self._resident: collections.OrderedDict[StepKey, StepRecord] = collections.OrderedDict()  # LRU order
        self._on_disk: dict[StepKey, tuple[Path, int]] = {}
        self._writing: dict[StepKey, concurrent.futures.Future] = {}  # a record stays resident while written
        self._stale: set[StepKey] = set()  # keys modified while being written: their new file is already stale
        self._loading: dict[StepKey, concurrent.futures.Future] = {}
        self._clean: set[StepKey] = set()  # resident records equal to their file (read back, not modified since)
        self._pool_instance: concurrent.futures.ThreadPoolExecutor | None = None  # made at the first spill
        self._files_made = 0
        self._filled = self._room = 0  # bytes set in the record being made, and the room made for it
        self._in_use: StepKey | None = None  # the step a call made or read and has not settled yet
        self._step_bytes = 0  # the largest record settled: what a record being made may need (a maps-only step
        # of `Policy.cache_dense_steps=False` is small, the next full one is not)
        self.wait_seconds = 0.0  # time `get` spent waiting for the disk tier
        self.spilled = 0  # steps written to disk so far
        self.loaded = 0  # steps read back from disk so far (ahead of a call, or by it)
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
    def budget_bytes(self) -> int:
        return self.budget.nbytes

    @property
    def resident_nbytes(self) -> int:
        """Bytes of the step records held in memory: kept, in use, being written or being read."""
        return sum(r.nbytes for r in self._resident.values()) + sum(self._on_disk[k][1] for k in self._loading)

    def put(self, key: StepKey, record: StepRecord) -> None:
        """Take `record` (at a record call's start, still empty: room is made for a step of the size of the
        largest one so far, so that the budget holds when it is filled)."""
        future = self._loading.pop(key, None)
        if future is not None:
            future.cancel()
        if key in self._writing:
            self._stale.add(key)  # the file being written is the old record's
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
        self._make_room(max(0, self._step_bytes - record.nbytes), wait=True, keep=key, position=key)
        self._in_use = key
        self._filled, self._room = record.nbytes, max(record.nbytes, self._step_bytes)
        record.on_grow = functools.partial(self._grew, key)

    def _grew(self, key: StepKey, nbytes: int) -> None:
        """A tensor of `nbytes` was set in the record of `key` being made: past the room made for it (its first
        record of a kind, larger than those before), make more, waiting for writes if need be, so that the
        budget holds while the record grows."""
        self._filled += nbytes
        if self._filled <= self._room:
            return
        self._make_room(0, wait=True, keep=key, position=key)
        self._room = self._filled + max(0, self.budget.nbytes - self.budget.held())

    def get(self, key: StepKey) -> StepRecord:
        if key not in self._order:
            raise KeyError(key)
        if key not in self._resident:
            start = time.perf_counter()
            try:
                future = self._loading.get(key)
                if future is not None:
                    record = future.result()
                else:
                    self._make_room(self._on_disk[key][1], wait=True, keep=None, position=key)  # none in use now
                    record = self._load(key)
            except CacheIOError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of the background read surfaces here
                raise CacheIOError(f"reading the recorded {key.describe()} from {self._on_disk[key][0]} failed: {e}"
                                   ) from e
            finally:
                self._loading.pop(key, None)
                self.wait_seconds += time.perf_counter() - start
            self._resident[key] = record
            self._clean.add(key)
            self.loaded += 1
            self.budget.note()
        self._resident.move_to_end(key)
        self._in_use = key
        return self._resident[key]

    def evict(self, key: StepKey) -> None:
        if key in self._writing:  # let its write finish first: it would record a file for a forgotten key
            self._collect_writes(wait_for=[key])
        self._resident.pop(key, None)
        self._clean.discard(key)
        future = self._loading.pop(key, None)
        if future is not None:
            future.cancel()
        self._forget_file(key)
        self._order.remove(key)

    # --- the disk tier ----------------------------------------------------------------------------------------

    def prefetch(self, key: StepKey) -> None:
        """Start loading `key` in the background if it is on disk only (a replay's next step) and fits the budget
        beside the step in use."""
        if key in self._resident or key in self._loading or key not in self._on_disk:
            return
        in_use = next(reversed(self._resident), None)  # the step just read (`RecordCache.step`)
        if self._make_room(self._on_disk[key][1], wait=False, keep=in_use, position=in_use):
            self._loading[key] = self._pool.submit(self._load, key)
            self.budget.note()

    def settle(self, key: StepKey) -> None:
        """The call using `key` is done: keep `key` resident (the next call may be the same step, e.g. CFG batches
        or a second sampler call), start writing what the next calls will need to let go, and let go of what is
        written and no longer fits. A record just made is compacted first (`StepRecord.compact`)."""
        self._resident[key].on_grow = None
        self._in_use = None
        self._resident[key].compact()
        nbytes = self._resident[key].nbytes
        if nbytes > self.budget.nbytes:
            raise CacheBudgetError(
                f"the recorded {key.describe()} takes {_gib(nbytes)} in memory, more than the whole cache budget "
                f"({_gib(self.budget.nbytes)}): a step in use must fit it. Give a larger Policy(cache_budget=...), "
                "or halve the records with Policy(cache_dtype='float16')")
        self._step_bytes = max(self._step_bytes, nbytes)
        self.budget.note()
        self._collect_writes()
        self._write_beyond_budget(position=key)
        following = self._order.index(key) + 1
        if following == len(self._order) or self._order[following] not in self._resident:  # to record or to read
            self._make_room(self._step_bytes, wait=False, keep=key, position=key)

    def flush(self) -> None:
        """A run has ended: start writing the records that the next run will have to let go (`settle`'s rule), so
        that it can let them go without writing them first; the heap the run's calls freed goes back to the
        system. A cache that fits the budget stays in memory, unwritten: writing it all after every run cost a
        disk's worth of copies beside the next run's compute (8.4 GiB after an SD 1.5 source run at 64x64
        latents), for files nothing reads."""
        self._collect_writes()
        self._write_beyond_budget(position=next(reversed(self._resident), None))
        return_free_heap()

    def _write_beyond_budget(self, position: StepKey | None) -> None:
        """Start writing dirty records, those needed last first (`_by_next_use`), until those left fit the budget
        beside two more steps (the next one being made, and one still being written)."""
        dirty = [k for k in self._by_next_use(position) if self._needs_write(k)]
        others = self.budget.held() - self.resident_nbytes  # what the stores sharing the budget hold
        excess = sum(self._resident[k].nbytes for k in dirty) + others + 2 * self._step_bytes - self.budget.nbytes
        for victim in dirty:
            if excess <= 0:
                break
            self._start_write(victim)
            excess -= self._resident[victim].nbytes

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
            self._folder = spill_folder(self._parent)
            # removed with the store, or at the latest when the interpreter exits (a store alive until then is
            # never garbage collected, and its step files would stay on disk)
            weakref.finalize(self, shutil.rmtree, str(self._folder), True)
        self._folder.mkdir(parents=True, exist_ok=True)
        return self._folder

    def _current(self, key: StepKey) -> bool:
        """Whether `key`'s resident record equals its file (so it can be let go at once)."""
        return key in self._clean and key in self._on_disk and key not in self._writing

    def _needs_write(self, key: StepKey) -> bool:
        """Whether `key`'s resident record has no current file and none is being written."""
        return key not in self._writing and not self._current(key)

    def _start_write(self, key: StepKey) -> None:
        # a new file per write: a name from the key's position would be shared once keys before it are evicted,
        # and a rewrite must not replace a file that a read or a mapped record may still use
        folder = self._folder_path()
        nbytes = self._resident[key].nbytes
        usage = shutil.disk_usage(folder)
        reserve = max(int(DISK_RESERVE * usage.total), 1 << 30)
        free = usage.free - reserve - sum(self._resident[k].nbytes for k in self._writing)
        if nbytes > free:
            raise CacheIOError(
                f"the disk tier has no room for the recorded {key.describe()} ({_gib(nbytes)}): {folder} has "
                f"{_gib(max(free, 0))} free beyond the {_gib(reserve)} left to the system. Free space there, point "
                "Policy(cache_dir=...) at a larger disk, or give the cache more memory (Policy(cache_budget=...)) or "
                "smaller records (cache_dtype='float16')")
        path = folder / f"step-{self._files_made:06d}.safetensors"
        self._files_made += 1
        self._writing[key] = self._pool.submit(self._spill, key, self._resident[key], path)

    def _by_next_use(self, position: StepKey | None) -> list[StepKey]:
        """The resident steps in the order to let them go: the one whose next use comes last first, for a run at
        `position` (the step in use, or about to be). Runs use the steps in the recorded order, one run after
        another (a record run makes them in it, a replay reads them in it), so after `position` the next use of
        the step before it comes last, then of the one before that, and so on (Belady's rule for a cyclic scan).
        Least recently used first, the rule of a scan that does not repeat, let go of each step just before the
        next run read it: a cache a little over the budget read every step from disk on every run. Without a
        position: least recently used first."""
        resident = list(self._resident)
        if position not in self._order:
            return resident
        at = {key: i for i, key in enumerate(self._order)}
        here, steps = at[position], len(self._order)
        return sorted(resident, key=lambda k: (at[k] - here) % steps, reverse=True)

    def _make_room(self, reserve: int, wait: bool, keep: StepKey | None, position: StepKey | None) -> bool:
        """Let records go until what the stores sharing the budget hold and `reserve` more fit it: this store's
        other than `keep` (the step in use) first, those needed last first for a run at `position`
        (`_by_next_use`), then the other stores' (`_victims`). A record equal to its file goes at once, others are
        written first (in the background). With `wait`, wait for those writes; without, only start them. Whether
        the room is there. The memory of records let go is returned to the system (`cache.return_free_heap`)."""
        dropped = False
        try:
            while True:
                for store in list(self.budget.stores):
                    store._collect_writes()
                excess = self.budget.held() + reserve - self.budget.nbytes
                if excess <= 0:
                    return True
                pending = []
                for store, victim in self._victims(keep, position):
                    if excess <= 0:
                        break
                    nbytes = store._resident[victim].nbytes
                    if store._current(victim):
                        del store._resident[victim]
                        store._clean.discard(victim)
                        dropped = True
                    else:
                        if store._needs_write(victim):
                            store._start_write(victim)
                        pending.append((store, victim))
                    excess -= nbytes
                if self.budget.held() + reserve <= self.budget.nbytes:
                    return True
                if not (wait and pending):
                    return False
                store, victim = pending[0]
                store._collect_writes(wait_for=[victim])  # then let it go in the next round
        finally:
            if dropped:
                return_free_heap()

    def _victims(self, keep: StepKey | None, position: StepKey | None) -> list[tuple[TieredStore, StepKey]]:
        """The records that may go to make room, in order: this store's but `keep`, then each other store's but the
        one a call of it is using (made or read, not settled yet), those needed last first for a run at the step
        it used last."""
        victims = [(self, k) for k in self._by_next_use(position) if k != keep]
        for store in list(self.budget.stores):
            if store is not self and store._resident:
                last = next(reversed(store._resident))
                victims += [(store, k) for k in store._by_next_use(last) if k != store._in_use]
        return victims

    def _collect_writes(self, wait_for: list[StepKey] = ()) -> None:
        """Take note of the finished writes (waiting for those of `wait_for`): their records are now equal to their
        files, unless modified meanwhile (they are then written again when they have to go)."""
        for key, future in list(self._writing.items()):
            if not (key in wait_for or future.done()):
                continue
            del self._writing[key]
            written = future.result()  # a failed write raises here (CacheIOError)
            self._forget_file(key)  # the key's previous file, if any
            self._on_disk[key] = written
            self.spilled += 1
            if key in self._stale:
                self._stale.discard(key)
            else:
                self._clean.add(key)

    def _spill(self, key: StepKey, record: StepRecord, path: Path) -> tuple[Path, int]:
        """(Background thread: file I/O only.) Write `record` to `path`."""
        try:
            tensors, names = record.to_tensors(contiguous=False)
            write_safetensors(path, tensors, {"refs": json.dumps(names)})
        except Exception as e:  # noqa: BLE001
            raise CacheIOError(f"writing the recorded {key.describe()} to {path} failed: {e}") from e
        return path, record.nbytes

    def _load(self, key: StepKey) -> StepRecord:
        """(Background thread.) The record of `key` read back from its file: on the CPU, views of the file mapped
        into memory (one allocation, like a compacted record, `StepRecord.compact`, and no copy: the pages of a
        file just written come from the page cache; a write-back modifies the mapping, copy-on-write, not the file)."""
        path, _ = self._on_disk[key]
        try:
            slab, tensors, metadata = map_safetensors(path)
            names = json.loads(metadata["refs"])
            if self.device is not None and self.device.type != "cpu":
                tensors = {name: t.to(self.device, non_blocking=True) for name, t in tensors.items()}
                slab = None
            record = StepRecord.from_tensors(tensors, names, self.dtype)
            record.slabs = None if slab is None else [slab]
            return record
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            raise CacheIOError(f"reading the recorded {key.describe()} from {path} failed: {e}") from e

    def _forget_file(self, key: StepKey) -> None:
        entry = self._on_disk.pop(key, None)
        if entry is not None:
            entry[0].unlink(missing_ok=True)


SPILL_PREFIX = "fisedit-cache-"
_OWNER = "owner.json"


def _gib(nbytes: int) -> str:
    """A byte count for an error message."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} bytes"


def _process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat's field 22): a pid reused by a later
    process has another; None if no such process runs (or this is not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def spill_folder(parent: str | Path | None = None) -> Path:
    """A new spill folder in `parent` (default: the system's temporary folder), named `fisedit-cache-<pid>-...`,
    with an owner file naming this process; the folders there that belonged to processes that are gone (killed,
    crashed: nothing removed them) are removed first (`reclaim_spill_folders`)."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    reclaim_spill_folders(parent)
    folder = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=parent))
    (folder / _OWNER).write_text(json.dumps({"pid": os.getpid(), "started": _process_start(os.getpid())}))
    return folder


def reclaim_spill_folders(parent: str | Path) -> list[Path]:
    """Remove the spill folders in `parent` whose owner process is gone: its pid runs no process, or one that
    started at another time (a reused pid). A live process's folders, folders without an owner file (of another
    version, or being made) and anything not named like a spill folder are left alone. The folders removed."""
    removed = []
    for folder in Path(parent).glob(f"{SPILL_PREFIX}*"):
        try:
            owner = json.loads((folder / _OWNER).read_text())
            pid, started = int(owner["pid"]), owner["started"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if started is None or _process_start(pid) == started:
            continue  # alive (or unknown: not Linux)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def make_budget(policy: Policy) -> MemoryBudget | None:
    """The memory budget `policy.cache_budget` asks for: that many bytes, or that fraction of the memory available
    now; None for "unbounded". Where the memory available is known, the budget carries the process's bound
    (`MemoryBound`)."""
    budget = policy.cache_budget
    if budget == "unbounded":
        return None
    # memory freed before (kept for reuse where `Policy.retain_freed_memory` is on) is available too
    return_free_heap()
    available = available_memory()
    if isinstance(budget, float):
        if available is None:
            raise RuntimeError(
                "cannot tell how much memory is available on this system to size the record cache: give "
                "Policy(cache_budget=<bytes>) or Policy(cache_budget='unbounded')"
            )
        budget = int(budget * available)
    base = anonymous_memory()
    if available is None or base is None:
        return MemoryBudget(budget)
    headroom = int(HEADROOM * available)
    calls = max(0, available - budget - headroom)
    return MemoryBudget(budget, MemoryBound(base, available, budget, calls, headroom))


def make_store(policy: Policy, budget: MemoryBudget | None = None) -> MemoryStore | TieredStore:
    """The store `policy.cache_budget` asks for: a `TieredStore` whose budget is `budget` (shared with the other
    stores given it) or, without one, that many bytes or that fraction of the memory available now; "unbounded":
    a `MemoryStore`. Its spill folder is made in `policy.cache_dir` (default: the temporary folder)."""
    if policy.cache_budget == "unbounded":
        return MemoryStore()
    return TieredStore(budget if budget is not None else make_budget(policy), parent=policy.cache_dir)
