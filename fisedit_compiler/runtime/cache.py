"""The record cache: per step key, the tensors of the source run that sparse calls read.

`RecordCache` is the session-facing view (latent shape, storage dtype, step keys in recording order, merging an
edit's steps); where the step records live is a `CacheStore`'s business (get, put, evict, keys, nbytes). Today's
store keeps them in memory; a tiered store (device, host, disk) is another implementation of the same interface.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import functools
from typing import Literal, Protocol

import torch

from ..ir import CONTROL_KINDS, CacheRef
from ..ir.signature import Settings


Direction = Literal["generation", "inversion"]


@dataclasses.dataclass(frozen=True, order=True)
class StepKey:
    """What identifies one U-Net call inside a run: the run's direction (a generation denoises; an inversion of a
    real image runs the timesteps the other way, and its calls must never be taken for a generation's at the same
    timestep), its timestep value(s), batch size (e.g. CFG's 2), and how many calls of the run came before at the
    same timestep (PNDM and Heun call the U-Net twice at some timesteps)."""

    timesteps: tuple[float, ...]
    batch: int
    occurrence: int = 0
    direction: Direction = "generation"

    @staticmethod
    def of(timestep: torch.Tensor, batch: int, occurrence: int = 0, direction: Direction = "generation") -> StepKey:
        values = timestep.detach().reshape(-1).float().cpu().tolist()
        # A timestep broadcast over the batch identifies the same step as a scalar one.
        if len(set(values)) == 1:
            values = values[:1]
        return StepKey(tuple(values), batch, occurrence, direction)

    def describe(self) -> str:
        t = f"{self.timesteps[0]:g}" if len(self.timesteps) == 1 else str([f"{v:g}" for v in self.timesteps])
        again = f", call {self.occurrence + 1} at this timestep" if self.occurrence else ""
        run = "" if self.direction == "generation" else f"{self.direction} "
        return f"{run}timestep {t} (batch {self.batch}{again})"


class StepRecord(dict):
    """The recorded tensors of one step, keyed by `CacheRef`. With a storage `dtype` (`Policy.cache_dtype`),
    floating-point tensors are stored in it; readers convert back to the dtype they compute in."""

    def __init__(self, dtype: torch.dtype | None = None):
        super().__init__()
        self.dtype = dtype
        self.slabs: list[torch.Tensor] | None = None  # the allocations the tensors are views of, once compacted
        self._nbytes: int | None = None  # `nbytes`, until the record changes
        self.on_grow = None  # called with the bytes of each tensor set, while a store with a budget fills it

    def keep_maps_only(self) -> None:
        """Drop everything but what control calls read (cross-attention maps, layout features): a step no sparse call
        reads (`Policy.cache_dense_steps`)."""
        for ref in [ref for ref in self if ref.kind not in CONTROL_KINDS]:
            del self[ref]
        if self.slabs is not None:  # the maps are views of the whole record's allocations: copy them out of them
            self.slabs = None
            self.compact()

    @property
    def maps_only(self) -> bool:
        """Whether the step holds cross-attention maps and nothing else (`keep_maps_only`)."""
        return bool(self) and all(ref.kind in CONTROL_KINDS for ref in self)

    def __setitem__(self, key, value) -> None:
        if self.dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.to(self.dtype)
        self._nbytes = None
        super().__setitem__(key, value)
        if self.on_grow is not None:
            self.on_grow(sum(t.numel() * t.element_size() for t in _tensors([value])))

    def __delitem__(self, key) -> None:
        self._nbytes = None
        super().__delitem__(key)

    # dict's other mutators bypass __setitem__ (the storage dtype) and __delitem__ (the byte count)
    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def pop(self, *args):
        self._nbytes = None
        return super().pop(*args)

    def popitem(self):
        self._nbytes = None
        return super().popitem()

    def clear(self) -> None:
        self._nbytes = None
        super().clear()

    @property
    def nbytes(self) -> int:
        """Bytes of the record's tensors. Kept until the record changes: a cache store sums it over every step it
        holds after each call (thousands of tensors, milliseconds per call on a small U-Net)."""
        if self._nbytes is None:
            self._nbytes = sum(t.numel() * t.element_size() for t in _tensors(self.values()))
        return self._nbytes

    def compact(self) -> None:
        """Move the record's CPU tensors into allocations of their own (pieces of up to `SLAB_PIECE` bytes, in
        the record's order) and keep views of them. A record outlives the call that computed it, whose short-lived
        tensors share the allocator's heap with it: records freed later leave holes the process keeps (measured on
        SD 2 at 96x96 latents: 4 GiB of resident memory above what the cache and the U-Net hold), and records kept
        leave the next call's tensors only fresh memory (a source run of SD 1.5 at 64x64 latents, 6 steps: record
        calls 72% slower than dense ones uncompacted, 32% compacted, on this project's VM where fresh memory is
        dear). Each piece's originals are let go once it is copied, so the next piece can take the memory they and
        the call's freed tensors leave: one allocation for the whole record had to be new memory, the record twice
        at once (8.4 GiB for the VAE decoder's at 768²). The heap is not trimmed here: trimming it made every call
        fault its working set in again; stores trim at a run's end. Idempotent; records on other devices (whose
        caching allocators reuse blocks) are left as they are."""
        if self.slabs is not None:
            return
        tensors = list(_tensors(self.values()))
        if not tensors or any(t.device.type != "cpu" for t in tensors):
            return
        del tensors  # (kept, it would hold every original until the last piece is copied)
        self.slabs, piece, size = [], [], 0
        for ref in list(self):
            piece.append(ref)
            size += sum(_aligned(t) for t in _tensors([self[ref]]))
            if size >= SLAB_PIECE:
                self.slabs.append(self._move_into_slab(piece))
                piece, size = [], 0
        if piece:
            self.slabs.append(self._move_into_slab(piece))

    def _move_into_slab(self, refs: list[CacheRef]) -> torch.Tensor:
        """Copy the tensors of `refs` into one allocation, set their views in their place (the originals go), and
        return the allocation."""
        slab, views = _into_slab([t for ref in refs for t in _tensors([self[ref]])])
        copies = iter(views)
        for ref in refs:
            value = self[ref]
            dict.__setitem__(self, ref, next(copies) if isinstance(value, torch.Tensor)
                             else tuple(next(copies) for _ in value))
        return slab

    def to_tensors(self, contiguous: bool = True) -> tuple[dict[str, torch.Tensor], list[list[str]]]:
        """The record as flat named CPU tensors (made contiguous unless `contiguous` is False: a writer that
        copies one at a time), and the (key, kind, part) of each name: part "" for a tensor, "mean" and "rstd"
        for a GroupNorm's statistics. What step files (saved sessions, the disk tier) hold."""
        tensors, names = {}, []
        for ref, value in self.items():
            parts = {"": value} if isinstance(value, torch.Tensor) else {"mean": value[0], "rstd": value[1]}
            for part, tensor in parts.items():
                tensor = tensor.detach().cpu()
                tensors[str(len(names))] = tensor.contiguous() if contiguous else tensor
                names.append([ref.key, ref.kind, part])
        return tensors, names

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], names: list[list[str]],
                     dtype: torch.dtype | None = None) -> StepRecord:
        """The inverse of `to_tensors` (KeyError if a named tensor is missing)."""
        parts: dict[CacheRef, dict[str, torch.Tensor]] = {}
        for n, (key, kind, part) in enumerate(names):
            parts.setdefault(CacheRef(key, kind), {})[part] = tensors[str(n)]
        record = cls(dtype)
        for ref, value in parts.items():
            record[ref] = value[""] if "" in value else (value["mean"], value["rstd"])
        return record


_ALIGN = 64  # bytes: each tensor of a compacted record starts at a multiple of this in its slab
SLAB_PIECE = 256 << 20  # bytes: a compacted record's allocations hold this much or one tensor more


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def return_free_heap() -> None:
    """Return the free pages of the C allocator's heap to the system (glibc's `malloc_trim`; elsewhere nothing):
    a freed tensor below glibc's mmap threshold (32 MiB at most) stays in the process otherwise."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _aligned(tensor: torch.Tensor) -> int:
    """The bytes `tensor` takes in a slab: its own, rounded up to a multiple of `_ALIGN`."""
    return -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN


def _into_slab(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One uint8 allocation holding copies of `tensors` (each at a multiple of `_ALIGN` bytes), and the copies."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets = [0]
    for tensor in tensors:
        offsets.append(offsets[-1] + _aligned(tensor))
    slab = torch.empty(offsets[-1], dtype=torch.uint8)
    views = []
    for t, offset, size in zip(tensors, offsets, sizes):
        views.append(slab[offset:offset + size].view(t.dtype).view(t.shape))
        views[-1].copy_(t)
    return slab, views


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        else:
            yield from _tensors(v)


class CacheStore(Protocol):
    """Where step records live. A record handed to `put` belongs to the store (a later `put` of the same key
    replaces it); `keys` are in the order they were first put."""

    def get(self, key: StepKey) -> StepRecord: ...

    def put(self, key: StepKey, record: StepRecord) -> None: ...

    def evict(self, key: StepKey) -> None: ...

    def keys(self) -> list[StepKey]: ...

    @property
    def nbytes(self) -> int: ...

    def settle(self, key: StepKey) -> None:
        """A call has finished reading and writing `key`'s record (which the store may now move or compact)."""

    def flush(self) -> None:
        """A run has ended: a store with a lower tier may start moving records there."""


class MemoryStore:
    """A `CacheStore` that keeps every step record in memory, unbounded."""

    def __init__(self) -> None:
        self._records: dict[StepKey, StepRecord] = {}

    def get(self, key: StepKey) -> StepRecord:
        return self._records[key]

    def put(self, key: StepKey, record: StepRecord) -> None:
        self._records[key] = record

    def evict(self, key: StepKey) -> None:
        del self._records[key]

    def keys(self) -> list[StepKey]:
        return list(self._records)

    def settle(self, key: StepKey) -> None:
        """Records kept for the session's life are compacted (`StepRecord.compact`)."""
        self._records[key].compact()

    def flush(self) -> None:
        """Nothing to move (every record stays in memory); the heap the run's calls freed goes back to the system."""
        return_free_heap()

    @property
    def nbytes(self) -> int:
        return sum(record.nbytes for record in self._records.values())


class RecordCache:
    """Recorded source-run tensors, keyed by step key, then by `CacheRef` (a node's stable key and role), kept
    in a `CacheStore` (default: `MemoryStore`).

    `latent_shape` is the shape of the latents the run was recorded with: sparse calls must match it; `extent` the
    (H, W) at latent resolution that its pixel layouts span, of which masks cover the top-left `latent_shape[-2:]`
    (larger where a model's pixels include another picture's: FLUX Kontext's reference tokens); `settings`
    what its graphs baked in (`adapters.settings`: LoRA state, option values), which sparse and control calls must
    match too (`check_settings`). `dtype`: the storage dtype of recorded activations (None: the dtype they were
    computed in).
    """

    def __init__(self, dtype: torch.dtype | None = None, store: CacheStore | None = None) -> None:
        self.store: CacheStore = store if store is not None else MemoryStore()
        self.latent_shape: tuple[int, ...] | None = None
        self.extent: tuple[int, int] | None = None
        self.settings: Settings = Settings()
        self.dtype = dtype
        self.in_use = False  # inside a run (`CompiledUNet.run`), which owns it meanwhile

    @property
    def steps(self) -> list[StepKey]:
        """The recorded step keys, in recording order."""
        return self.store.keys()

    @property
    def nbytes(self) -> int:
        """Bytes held by all recorded tensors."""
        return self.store.nbytes

    def breakdown(self) -> dict[str, dict[str, int]]:
        """Bytes per step (`StepKey.describe()`) and kind of recorded tensor (`ir.CacheKind`: "output" =
        scatter targets and halo inputs, "attention_kv", "group_norm_stats", "attention_map", "layout"), and
        "total" over the steps."""
        result: dict[str, dict[str, int]] = {}
        total: dict[str, int] = {}
        for key in self.steps:
            per_kind: dict[str, int] = {}
            for ref, value in self.store.get(key).items():
                nbytes = sum(t.numel() * t.element_size() for t in _tensors([value]))
                per_kind[ref.kind] = per_kind.get(ref.kind, 0) + nbytes
                total[ref.kind] = total.get(ref.kind, 0) + nbytes
            result[key.describe()] = per_kind
        result["total"] = total
        return result

    def __len__(self) -> int:
        return len(self.store.keys())

    def __contains__(self, key: StepKey) -> bool:
        return key in self.store.keys()

    def clear(self) -> None:
        for key in self.store.keys():
            self.store.evict(key)
        self.latent_shape = self.extent = None
        self.settings = Settings()

    def close(self) -> None:
        """Let go of every record, and of the store's spill folder (a store with a disk tier); usable again after."""
        self.clear()
        if hasattr(self.store, "close"):
            self.store.close()

    def new_step(self, key: StepKey, latent_shape: tuple[int, ...], settings: Settings = Settings(),
                 extent: tuple[int, int] | None = None) -> StepRecord:
        """Start (or restart) recording `key`. A cache holds one latent shape, extent and `settings`: new ones clear
        it first. `extent` defaults to the latents' own (H, W)."""
        extent = tuple(extent) if extent is not None else tuple(latent_shape[-2:])
        if self.latent_shape is not None and (self.latent_shape, self.extent, self.settings) != (
                latent_shape, extent, settings):
            self.clear()
        self.latent_shape, self.extent, self.settings = latent_shape, extent, settings
        record = StepRecord(self.dtype)
        self.store.put(key, record)
        return record

    def occurrences(self, key: StepKey) -> int:
        """How many calls at `key`'s timestep, batch size and direction were recorded."""
        return sum(dataclasses.replace(k, occurrence=0) == dataclasses.replace(key, occurrence=0)
                   for k in self.store.keys())

    def replace_steps(self, other: RecordCache, keep_attention_maps: bool = False, maps_only: int = 0) -> None:
        """Take over `other`'s steps, replacing the ones recorded here (an edit run's dense steps).

        `keep_attention_maps`: the replaced steps keep what control calls read (cross-attention maps and layout
        features; other's are dropped), so that the maps of all steps stay those of one prompt when `other` does
        not cover every step that has maps.
        `maps_only`: of the steps taken, those among the first `maps_only` recorded here keep their maps only."""
        if not len(other):
            return
        if self.latent_shape not in (None, other.latent_shape) or self.extent not in (None, other.extent):
            raise ValueError(f"cannot merge steps recorded with latents {other.latent_shape} into a cache of "
                             f"{self.latent_shape}")
        if self.latent_shape is not None:
            self.check_settings(other.settings)
        self.latent_shape, self.extent, self.settings = other.latent_shape, other.extent, other.settings
        first = set(self.steps[:maps_only])
        for key in other.steps:
            step = other.store.get(key)
            if key in first:
                step.keep_maps_only()
            if keep_attention_maps:
                old = self.store.get(key) if key in self else {}
                for ref in [ref for ref in step if ref.kind in CONTROL_KINDS]:
                    del step[ref]
                for ref, value in old.items():
                    if ref.kind in CONTROL_KINDS:
                        step[ref] = value
            other.store.evict(key)  # now this cache's: not held twice (a budget shared by both counts it once)
            self.store.put(key, step)
            self.store.settle(key)  # complete: compacted by a store that keeps it, moved by one with a budget

    def check_settings(self, settings: Settings) -> None:
        """Refuse to replay this cache under other settings than it was recorded with (another LoRA scale or set of
        adapters, another option value): outside its region, a sparse call's output would be the recorded model's."""
        if settings != self.settings:
            raise SettingsMismatchError(
                f"the source run was recorded under other settings than this call's ({self.settings.difference(settings)})"
                ": an edit replays the model it recorded. Restore the recorded settings (pipe.set_adapters, the same "
                "cross_attention_kwargs), or record the source again under the new ones (EditSession.generate or "
                "load_image; record())"
            )

    def step(self, key: StepKey) -> StepRecord:
        """The record of `key`. A store with a lower tier (`prefetch`) starts loading the step recorded after it:
        replays read the steps in the recorded order."""
        steps = self.steps
        if key not in steps:
            recorded = ", ".join(k.describe() for k in steps) or "nothing"
            raise StepNotRecordedError(
                f"{key.describe()} was never recorded (recorded: {recorded}). Sparse calls must replay the "
                "timesteps of the source run: use the same scheduler and number of inference steps."
            )
        record = self.store.get(key)
        following = steps.index(key) + 1
        if following < len(steps) and hasattr(self.store, "prefetch"):
            self.store.prefetch(steps[following])
        return record

    def step_done(self, key: StepKey) -> None:
        """A call has finished reading and writing `key`'s record: the store settles it (both stores compact a new
        record; a store with a budget may now move older steps out)."""
        self.store.settle(key)

    def run_done(self) -> None:
        """A run recording into or replaying this cache has ended (`CompiledUNet.run`): the store may write what it
        holds to its lower tier meanwhile (`CacheStore.flush`)."""
        self.store.flush()

    def mark_dirty(self, key: StepKey) -> None:
        """`key`'s record was updated in place (a sparse call's write-back): a store with a lower tier rewrites it
        when it moves it there."""
        if hasattr(self.store, "mark_dirty"):
            self.store.mark_dirty(key)

    def get(self, key: StepKey, ref: CacheRef):
        return self.step(key)[ref]


class SettingsMismatchError(ValueError):
    """A sparse or control call under other settings (LoRA state, option values) than its record was made with."""


class StepNotRecordedError(KeyError):
    """A sparse call at a step key the record run never produced."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0])
