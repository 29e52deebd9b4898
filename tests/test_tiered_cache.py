"""The record cache with bounded memory (`runtime.tiered_store`): spilled steps give the same results, the resident
bytes stay within the budget, failures of the disk tier surface as clear errors."""

from __future__ import annotations

import dataclasses
import functools
import threading
import weakref

import pytest
import torch

import fisedit_compiler as fisedit
from conftest import tiny_unet, unet_inputs
from fisedit_compiler.runtime.cache import MemoryStore, StepRecord
from fisedit_compiler.runtime.tiered_store import CacheIOError, TieredStore, make_store

SIZE = 16
TIMESTEPS = (900, 700, 500, 300, 100)


def mask() -> torch.Tensor:
    m = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    m[3:8, 6:12] = True
    return m


@torch.no_grad()
def run_session(policy: fisedit.Policy, check=lambda compiled: None):
    """Record 5 steps, replay them sparsely, then twice with write-back (continuous edits); the outputs of every
    call, and the cache's final tensors."""
    torch.manual_seed(0)
    unet = tiny_unet("sd2")
    inputs = unet_inputs(unet, size=SIZE)
    compiled = fisedit.compile(unet, policy)
    outputs = []
    with compiled.record():
        for t in TIMESTEPS:
            outputs.append(compiled(**{**inputs, "timestep": torch.tensor(t)}).sample)
            check(compiled)
    noise = torch.randn(inputs["sample"].shape, generator=torch.Generator().manual_seed(1))
    edited = {**inputs, "sample": inputs["sample"] + 0.1 * noise}
    for write_back in (False, True, True):
        with compiled.sparse(mask(), write_back=write_back):
            for t in TIMESTEPS:
                outputs.append(compiled(**{**edited, "timestep": torch.tensor(t)}).sample)
                check(compiled)
    final = {(key, ref): compiled.cache.step(key)[ref] for key in compiled.cache.steps
             for ref in compiled.cache.step(key)}
    return compiled, outputs, final


@functools.cache
def in_memory_session():
    """`run_session` with everything in memory (once per test run: it is the reference of several tests)."""
    return run_session(fisedit.Policy(cache_budget="unbounded"))


@pytest.mark.parametrize("steps_in_budget", [1.5, 2.5])
def test_a_spilling_cache_computes_what_an_in_memory_one_does(tmp_path, monkeypatch, steps_in_budget):
    """With room for one step and a half (no overlap: every step waits for the disk) or two and a half (a step is
    written or read while another computes), results are bit-identical, and the bytes held in memory, counting the
    records being written and read, are within the budget after every operation of the store."""
    reference, want, want_cache = in_memory_session()
    budget = int(steps_in_budget * reference.cache.nbytes / len(TIMESTEPS))
    made = []  # weak references to every record made from now on, whoever holds it (the store, a writer, a reader)
    loading = threading.local()  # the key a reader thread is loading, if any
    init, load = StepRecord.__init__, TieredStore._load

    def tracked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.loaded_for = getattr(loading, "key", None)
        made.append(weakref.ref(self))

    def tracked_load(self, key):
        loading.key = key
        try:
            return load(self, key)
        finally:
            loading.key = None

    monkeypatch.setattr(StepRecord, "__init__", tracked_init)
    monkeypatch.setattr(TieredStore, "_load", tracked_load)
    for name in ("put", "get", "prefetch", "settle", "flush"):
        def checked(self, *args, _method=getattr(TieredStore, name)):
            result = _method(self, *args)
            records = [r for r in (ref() for ref in made) if r is not None]
            held = sum(r.nbytes for r in records)
            held += sum(self._on_disk[k][1] for k in list(self._loading)  # being read, no record yet
                        if not any(r.loaded_for == k for r in records))
            assert held <= budget, (name, held, budget)
            return result
        monkeypatch.setattr(TieredStore, name, checked)

    compiled, got, got_cache = run_session(fisedit.Policy(cache_budget=budget, cache_dir=str(tmp_path)))
    store = compiled.cache.store
    assert isinstance(store, TieredStore) and store.spilled >= len(TIMESTEPS)
    assert list(tmp_path.rglob("*.safetensors"))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got_cache.keys() == want_cache.keys()
    for k in want_cache:  # write-back reached the spilled steps too
        a, b = got_cache[k], want_cache[k]
        assert all(torch.equal(x, y) for x, y in zip(a if isinstance(a, tuple) else (a,),
                                                      b if isinstance(b, tuple) else (b,)))


@torch.no_grad()
def test_a_failed_background_read_raises_in_the_sparse_call(tmp_path):
    reference, _, _ = in_memory_session()
    one_step = reference.cache.nbytes // len(TIMESTEPS)
    unet = tiny_unet("sd2")
    inputs = unet_inputs(unet, size=SIZE)
    compiled = fisedit.compile(unet, fisedit.Policy(cache_budget=one_step, cache_dir=str(tmp_path)))
    with compiled.record():
        for t in TIMESTEPS[:3]:
            compiled(**{**inputs, "timestep": torch.tensor(t)})
    compiled.cache.store._collect_writes(wait_for=list(compiled.cache.store._writing))  # let every write finish
    for file in tmp_path.rglob("step-*.safetensors"):
        file.write_bytes(b"not a safetensors file")
    with compiled.sparse(mask()), pytest.raises(CacheIOError, match="reading the recorded timestep 900"):
        compiled(**{**inputs, "timestep": torch.tensor(900)})


def test_the_cache_budget_is_validated_and_sized():
    with pytest.raises(ValueError, match="cache_budget"):
        fisedit.Policy(cache_budget=1.5)
    with pytest.raises(ValueError, match="cache_budget"):
        fisedit.Policy(cache_budget="all")
    assert isinstance(make_store(fisedit.Policy(cache_budget="unbounded")), MemoryStore)
    store = make_store(fisedit.Policy(cache_budget=0.25))
    assert isinstance(store, TieredStore) and store.budget_bytes > 0
    assert make_store(dataclasses.replace(fisedit.Policy(), cache_budget=1234)).budget_bytes == 1234


@torch.no_grad()
def test_write_back_never_changes_an_output_a_caller_holds():
    """The last layer's output is recorded (a scatter target) and returned: write-back updates the recorded copy,
    not the tensor the record call returned."""
    _, outputs, _ = in_memory_session()
    unet = tiny_unet("sd2")
    inputs = unet_inputs(unet, size=SIZE)
    for t, recorded in zip(TIMESTEPS, outputs):
        torch.testing.assert_close(recorded, unet(**{**inputs, "timestep": torch.tensor(t)}).sample)


def test_a_records_byte_count_follows_every_change_and_its_storage_dtype():
    """`StepRecord.nbytes` is kept between changes (stores sum it over every step after each call): whichever way
    the record changes, the count is the bytes of what it holds, in its storage dtype."""
    from fisedit_compiler.ir import CacheRef

    a, b, c, d = (CacheRef(k, "output") for k in "abcd")
    record = StepRecord(torch.float16)
    record[a] = torch.zeros(10)  # stored as float16: 20 bytes
    assert record.nbytes == 20
    record[a] = torch.zeros(20)
    assert record.nbytes == 40
    record.update({b: torch.zeros(5)})
    record |= {c: (torch.zeros(2), torch.zeros(3))}
    assert record.nbytes == 40 + 10 + 20  # a GroupNorm's statistics (a pair) stay as computed
    assert record.setdefault(d, torch.zeros(1)).dtype == torch.float16 and record.nbytes == 72
    del record[d]
    assert record.nbytes == 70
    record.pop(c)
    assert record.nbytes == 50
    record.popitem()
    assert record.nbytes == 40
    record.compact()
    assert record.nbytes == 40
    record.clear()
    assert record.nbytes == 0


def test_a_record_is_compacted_into_one_allocation_and_read_back_into_one():
    """After its call a record's tensors are views of one allocation of their own (so that records outliving
    their call do not fragment the heap); a spilled record is read back the same way, with one read of its
    file; a file cut short is refused."""
    from fisedit_compiler.ir import CacheRef
    from fisedit_compiler.runtime.cache import StepRecord
    from fisedit_compiler.runtime.safetensors_io import map_safetensors, read_safetensors, write_safetensors

    record = StepRecord()
    values = {CacheRef("a", "output"): torch.randn(2, 3, 5),
              CacheRef("b", "group_norm_stats"): (torch.randn(2, 4), torch.rand(2, 4)),
              CacheRef("c", "output"): torch.rand(3, 7) > 0.5,
              CacheRef("d", "attention_kv"): torch.randn(4, 6).half().t()}  # not contiguous
    for ref, value in values.items():
        record[ref] = value
    record.compact()
    slab, = record.slabs  # smaller than a piece (`SLAB_PIECE`)
    assert record.nbytes <= slab.numel()
    for ref, value in values.items():
        got = record[ref]
        for g, v in zip(got if isinstance(got, tuple) else (got,), value if isinstance(value, tuple) else (value,)):
            assert torch.equal(g, v) and g.dtype == v.dtype
            assert g.untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()
    record.compact()  # idempotent
    assert len(record.slabs) == 1 and record.slabs[0] is slab

    def roundtrip(path):
        from safetensors import safe_open

        tensors, names = record.to_tensors(contiguous=False)
        tensors["e"] = torch.randn(3, 5).t()  # written contiguous, one tensor at a time
        write_safetensors(path, tensors, {"n": str(len(names))})
        slab, read, metadata = read_safetensors(path)
        assert metadata == {"n": str(len(names))} and read.keys() == tensors.keys()
        with safe_open(str(path), framework="pt") as f:  # a standard safetensors file
            assert f.metadata() == metadata
            for name, t in tensors.items():
                assert torch.equal(read[name], t) and read[name].untyped_storage().data_ptr() == slab.data_ptr()
                assert torch.equal(f.get_tensor(name), t)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "step.safetensors"
        roundtrip(path)
        path.write_bytes(path.read_bytes()[:-3])
        with pytest.raises(ValueError, match="truncated"):
            read_safetensors(path)
        with pytest.raises(ValueError, match="truncated"):
            map_safetensors(path)


def test_a_large_record_is_compacted_piece_by_piece(monkeypatch):
    """A record larger than `SLAB_PIECE` goes into several allocations, in its order, and each piece's original
    tensors are let go as soon as it is copied (one allocation for all had the record twice in memory at once: 8.4
    GiB for the VAE decoder's at 768²)."""
    import weakref

    from fisedit_compiler.ir import CacheRef
    from fisedit_compiler.runtime import cache
    from fisedit_compiler.runtime.cache import StepRecord

    monkeypatch.setattr(cache, "SLAB_PIECE", 1024)
    record = StepRecord()
    originals = [torch.randn(100) for _ in range(6)]  # 448 bytes each in a slab: 3 reach a piece (1344 bytes)
    expected = [t.clone() for t in originals]
    for i, t in enumerate(originals):
        record[CacheRef(f"n{i}", "output")] = t
    record[CacheRef("gn", "group_norm_stats")] = (torch.zeros(2), torch.ones(2))
    alive = [weakref.ref(t) for t in originals]
    copied = []
    real_into_slab = cache._into_slab

    def into_slab(tensors):  # how many originals are still alive when each piece is made
        copied.append(sum(ref() is not None for ref in alive))
        return real_into_slab(tensors)

    monkeypatch.setattr(cache, "_into_slab", into_slab)
    del originals, t
    record.compact()
    assert copied == [6, 3, 0]
    assert all(ref() is None for ref in alive)
    assert len(record.slabs) == 3
    for i, t in enumerate(expected):
        got = record[CacheRef(f"n{i}", "output")]
        assert torch.equal(got, t) and got.untyped_storage().data_ptr() == record.slabs[i // 3].data_ptr()
    assert torch.equal(record[CacheRef("gn", "group_norm_stats")][1], torch.ones(2))


def test_a_mapped_step_file_is_copy_on_write_and_survives_its_file_being_replaced(tmp_path):
    """The disk tier maps step files instead of copying them (`map_safetensors`): a write-back modifies the mapped
    tensors, not the file, and rewriting the step to the same path (a dirty record written again) leaves a mapped
    record intact."""
    from safetensors.torch import load_file

    from fisedit_compiler.runtime.safetensors_io import map_safetensors, write_safetensors

    path = tmp_path / "step.safetensors"
    first = {"a": torch.randn(64, 1024), "b": torch.randn(3, 5).half()}
    write_safetensors(path, first, {})
    slab, mapped, _ = map_safetensors(path)
    assert all(torch.equal(mapped[k], first[k]) for k in first)
    assert mapped["a"].untyped_storage().data_ptr() == slab.untyped_storage().data_ptr()
    mapped["a"][0] += 1  # a write-back
    assert torch.equal(load_file(path)["a"], first["a"])  # the file is not modified
    write_safetensors(path, {"a": torch.zeros(1, 1)}, {})  # the same step written again, smaller
    assert torch.equal(mapped["a"][1:], first["a"][1:]) and torch.equal(mapped["a"][0], first["a"][0] + 1)
    assert torch.equal(mapped["b"], first["b"])
    assert [p.name for p in tmp_path.iterdir()] == ["step.safetensors"]  # no partial file left


def test_writes_keep_records_resident_and_a_record_modified_while_written_is_written_again(tmp_path):
    """Records written because the budget cannot keep them beside two more steps stay resident and clean until
    room is needed, so that they can go without writing; a record modified in place (write-back) while its write
    is in flight keeps its modification: it stays resident and is written again before it is let go."""
    import threading

    from fisedit_compiler.ir import CacheRef
    from fisedit_compiler.runtime.cache import StepKey, StepRecord

    store = TieredStore(budget_bytes=2 * 64, folder=tmp_path)  # room for two 64-byte steps: each one written
    gate = threading.Event()
    spill = store._spill

    def gated_spill(key, record, path):
        gate.wait(timeout=10)
        return spill(key, record, path)

    store._spill = gated_spill
    keys = [StepKey((float(t),), 2) for t in (900, 500)]
    ref = CacheRef("conv", "output")
    for key in keys:
        record = StepRecord()
        record[ref] = torch.zeros(4, 4)
        store.put(key, record)
        store.settle(key)
    store.flush()
    assert set(store._writing) == set(keys)  # both being written in the background (held at the gate)
    store.get(keys[0])[ref] += 1  # a write-back while its write is in flight
    store.mark_dirty(keys[0])
    gate.set()
    store.close()  # every write done
    store._collect_writes()
    assert set(store._resident) == set(keys) and keys[0] not in store._clean and keys[1] in store._clean
    store.budget.nbytes = 0  # let everything go that can go
    store._spill = spill
    store._make_room(0, wait=True, keep=keys[1], position=keys[1])
    assert keys[0] not in store._resident
    assert torch.equal(store.get(keys[0])[ref], torch.ones(4, 4))  # read back with its modification


def test_a_run_end_writes_only_what_the_budget_cannot_keep(tmp_path):
    """`flush` (a run's end) writes the records that the next run would have to let go, and nothing while the
    cache fits the budget beside two more steps: writing a whole SD source run's cache after every run competed
    with the next run's compute, for files nothing read."""
    from fisedit_compiler.ir import CacheRef
    from fisedit_compiler.runtime.cache import StepKey, StepRecord

    ref = CacheRef("conv", "output")
    keys = [StepKey((float(t),), 2) for t in (900, 700, 500, 300)]

    def run(budget: int) -> TieredStore:
        store = TieredStore(budget_bytes=budget, folder=tmp_path / str(budget))
        for key in keys:  # four 64-byte steps
            record = StepRecord()
            record[ref] = torch.zeros(4, 4)
            store.put(key, record)
            store.settle(key)
        store.flush()
        store.close()
        store._collect_writes()
        return store

    assert run(6 * 64).spilled == 0 and not list((tmp_path / str(6 * 64)).glob("*.safetensors"))
    store = run(5 * 64)  # the next run needs two steps more: one record goes to disk, the one a replay needs last
    assert store.spilled == 1 and set(store._on_disk) == {keys[2]}  # (but for the one in use)
    assert all(torch.equal(store.get(key)[ref], torch.zeros(4, 4)) for key in keys)


@pytest.mark.parametrize("budget_steps", [7, 5])
def test_replays_read_from_disk_only_the_steps_the_budget_cannot_hold(tmp_path, budget_steps):
    """Runs use the steps in the recorded order, one after another: the store lets go of the step needed last. Least
    recently used first let go of each step just before the next replay read it, so that a cache a little over its
    budget read every step from disk on every edit (SD 1.5 at 64x64 latents, 20 steps, a 9.0 GiB budget for 8.4 GiB:
    all 20 steps read and written again per edit, the edit 40% slower)."""
    from fisedit_compiler.ir import CacheRef
    from fisedit_compiler.runtime.cache import StepKey, StepRecord

    ref, steps = CacheRef("conv", "output"), 8
    keys = [StepKey((float(1000 - 100 * i),), 2) for i in range(steps)]
    store = TieredStore(budget_bytes=budget_steps * 64, folder=tmp_path)  # 64-byte steps
    loads = []
    load = store._load
    store._load = lambda key: loads.append(key) or load(key)
    for i, key in enumerate(keys):  # the record run
        record = StepRecord()
        record[ref] = torch.full((4, 4), float(i))
        store.put(key, record)
        store.settle(key)
    store.flush()
    for _ in range(3):  # replays, as RecordCache.step drives them: read a step, read the next one ahead, settle
        loads.clear()
        loaded = store.loaded
        for i, key in enumerate(keys):
            assert torch.equal(store.get(key)[ref], torch.full((4, 4), float(i)))
            if i + 1 < steps:
                store.prefetch(keys[i + 1])
            store.settle(key)
        store.flush()
        # what does not fit beside the step in use and the one read ahead, and one more for the budget's margin
        assert len(loads) <= steps - budget_steps + 3, loads
        assert store.loaded - loaded == len(loads)  # the count the benchmarks report
        assert store.resident_nbytes <= store.budget_bytes
    store.close()


def test_a_step_evicted_before_others_does_not_make_two_steps_share_a_file(tmp_path):
    """Files are named per write, not by a key's position among the keys (which shifts when one is evicted: the
    next step written then took the file of a step still on disk, and reading that step gave the other's tensors)."""
    from fisedit_compiler.ir import CacheRef
    from fisedit_compiler.runtime.cache import StepKey, StepRecord

    store = TieredStore(budget_bytes=64, folder=tmp_path)  # one 64-byte step: every step but the last goes to disk
    ref = CacheRef("conv", "output")
    keys = [StepKey((float(t),), 2) for t in (900, 700, 500, 300)]

    def record(key, value):
        step = StepRecord()
        step[ref] = torch.full((4, 4), value)
        store.put(key, step)
        store.settle(key)

    for value, key in enumerate(keys[:3]):
        record(key, float(value))
    store.evict(keys[0])
    record(keys[3], 3.0)
    store.flush()
    for value, key in enumerate(keys[1:], start=1):
        assert torch.equal(store.get(key)[ref], torch.full((4, 4), float(value))), key
    store.close()


def test_the_tiered_store_compacts_a_settled_record_and_a_maps_only_step_keeps_only_its_maps(tmp_path):
    """A record kept by the default store is compacted when its call settles it (a source run's records must not
    leave the next call only fresh memory); dropping all but its attention maps leaves an allocation of the maps'
    size, not the whole record's."""
    from fisedit_compiler.ir import CacheRef
    from fisedit_compiler.runtime.cache import StepKey, StepRecord
    from fisedit_compiler.runtime.tiered_store import TieredStore

    store = TieredStore(2**30, tmp_path)
    key = StepKey((999.0,), 2)
    record = StepRecord()
    store.put(key, record)
    output, attention_map = torch.randn(64, 64), torch.randn(4, 8)
    record[CacheRef("a", "output")] = output
    record[CacheRef("m", "attention_map")] = attention_map
    store.settle(key)
    settled = store.get(key)
    slab, = settled.slabs
    assert settled[CacheRef("a", "output")].untyped_storage().data_ptr() == slab.data_ptr()
    settled.keep_maps_only()
    assert settled.maps_only and torch.equal(settled[CacheRef("m", "attention_map")], attention_map)
    slab, = settled.slabs
    assert slab.numel() < output.numel() * 4
    assert settled[CacheRef("m", "attention_map")].untyped_storage().data_ptr() == slab.data_ptr()
    store.close()


def test_a_replay_through_the_record_cache_reads_each_spilled_step_ahead_in_the_background(tmp_path):
    """`RecordCache.step(s)` asks the store to start loading step s+1, so that a spilled step is read while step s
    computes: a replay of 8 steps on a budget of 3 asks for each next step as it reads one. (Prefetching the step
    being read instead, a no-op, passed every other test.) Whether the store finds room to start a load at once
    depends on its writes in flight, i.e. on the machine's load: not checked here."""
    from fisedit_compiler.ir import CacheRef
    from fisedit_compiler.runtime.cache import RecordCache, StepKey

    ref, steps = CacheRef("conv", "output"), 8
    keys = [StepKey((float(1000 - 100 * i),), 2) for i in range(steps)]
    store = TieredStore(budget_bytes=3 * 64, folder=tmp_path)  # 64-byte steps
    cache = RecordCache(store=store)
    for i, key in enumerate(keys):
        cache.new_step(key, (2, 4, 4, 4))[ref] = torch.full((4, 4), float(i))
        cache.step_done(key)
    cache.run_done()
    store._collect_writes(wait_for=list(store._writing))
    asked = []
    prefetch = store.prefetch
    store.prefetch = lambda key: asked.append(key) or prefetch(key)
    assert sum(key not in store._resident for key in keys) >= steps - 3, "the budget should send steps to disk"
    for i, key in enumerate(keys):
        assert torch.equal(cache.step(key)[ref], torch.full((4, 4), float(i)))
        cache.step_done(key)
    assert asked == keys[1:]
    store.close()


def test_a_safetensors_file_whose_tensors_are_not_aligned_is_read_correctly(tmp_path):
    """Other writers need not pad the header: a float tensor may then start at an odd byte of a mapped file, and is
    copied rather than viewed there (a view of unaligned bytes as floats is refused)."""
    import json
    import struct

    from fisedit_compiler.runtime.safetensors_io import map_safetensors, read_safetensors

    values = torch.arange(6, dtype=torch.float32) / 3
    header = json.dumps({"x": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}).encode()
    header += b" " * (1 - len(header) % 4 + 4) if len(header) % 4 != 1 else b""  # 8 + len(header): odd
    assert (8 + len(header)) % 4
    path = tmp_path / "unaligned.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + values.numpy().tobytes())
    for read in (map_safetensors, read_safetensors):
        _, tensors, _ = read(path)
        assert torch.equal(tensors["x"], values.reshape(2, 3)), read.__name__
