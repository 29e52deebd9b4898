"""`compile(unet, policy)`: a drop-in `UNet2DConditionModel` that records source runs and replays edits sparsely.

    sparse_unet = fisedit.compile(pipe.unet, fisedit.Policy())
    pipe.unet = sparse_unet
    with sparse_unet.record():        # source run: dense, saves what sparse calls need, per step key
        pipe(prompt_embeds=e, latents=z, num_inference_steps=20)
    with sparse_unet.sparse(mask):    # edit run: recomputes only the active region
        pipe(prompt_embeds=e2, latents=z, num_inference_steps=20)

Outside `record()` and `sparse()` a call runs the eager U-Net. The first recorded call of an input signature
captures the U-Net and runs both pass pipelines; the variants are cached per signature.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections import Counter
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from .adapters import ModelAdapter, adapter_for
from .capture import InputSignature, capture
from .dump import GraphDump
from .inputs import MaskError, as_mask  # MaskError: re-exported here
from .passes.annotate_spatial_layout import annotate_spatial_layout, every_node_annotated
from .passes.broadcast_over_blocks import broadcast_over_blocks, per_item_operands_repeated
from .ir import CacheRef
from .passes.cached_group_norm import cached_group_norm, no_sparse_group_norm
from .passes.control_cross_attention import control_cross_attention
from .passes.find_sparse_regions import every_sparse_node_in_a_region, find_sparse_regions
from .passes.fuse_gather_norm_silu import fuse_gather_norm_silu
from .passes import ops as pass_ops
from .passes.insert_cache_write_back import insert_cache_write_back
from .passes.insert_record_taps import cache_refs, insert_record_taps
from .passes.insert_region_boundaries import insert_region_boundaries, regions_entered_and_left_through_boundaries
from .passes.insert_reuse_taps import insert_reuse_taps
from .passes.manager import FxPass, PassManager, PassRecord
from .passes.record_cross_attention_maps import record_cross_attention_maps
from .passes.relayout_gathered import no_dense_reshape_of_blocks, relayout_gathered
from .passes.reuse_deep_levels import reuse_deep_levels, reuse_taps_and_reads
from .passes.select_linear_library import no_aten_linear, select_linear_library
from .passes.sparse_attention import sparse_attention
from .passes.sparse_conv import no_padded_conv_on_blocks, sparse_conv
from .passes.sparse_upsample import no_dense_upsample_of_blocks, sparse_upsample
from .passes.tap_layout_features import layout_features_tapped, tap_layout_features
from .policy import Policy
from .runtime.cache import Direction, RecordCache, StepKey, StepNotRecordedError, StepRecord
from .runtime.mask_plan import MaskPlan
from .runtime.memory import retain_freed_memory
from .runtime.program import Program, bind
from .runtime.tiered_store import make_store


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Drop nodes whose values no longer reach the output (e.g. originals replaced by window versions)."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code(is_impure_node=pass_ops.is_impure)
    return before - len(gm.graph.nodes)


ANNOTATE = FxPass("annotate_spatial_layout", annotate_spatial_layout, postcondition=every_node_annotated)
# dense variants: their linear layers take the library the cost constants name, as the sparse variant's do
DENSE_LINEAR_LIBRARY = FxPass("select_linear_library", select_linear_library, ("annotate_spatial_layout",),
                              no_aten_linear)


def sparse_passes(policy: Policy, reuse_call: bool = False) -> list[FxPass]:
    """The pass pipeline that turns a captured U-Net into its sparse variant, in order. With temporal reuse
    (`Policy.deep_reuse_interval` > 1) the sparse variant is the full calls' (handing their deep levels' outputs
    on), and `reuse_call` gives the reuse calls' (taking them)."""
    temporal = []
    if reuse_call:
        temporal = [FxPass("reuse_deep_levels", functools.partial(reuse_deep_levels, policy=policy),
                           ("annotate_spatial_layout",), reuse_taps_and_reads)]
    elif policy.deep_reuse_interval > 1:
        temporal = [FxPass("insert_reuse_taps", functools.partial(insert_reuse_taps, policy=policy),
                           ("annotate_spatial_layout",), reuse_taps_and_reads)]
    return [
        ANNOTATE,
        *temporal,
        FxPass("find_sparse_regions", functools.partial(find_sparse_regions, policy=policy),
               ("annotate_spatial_layout",), every_sparse_node_in_a_region),
        FxPass("insert_region_boundaries", insert_region_boundaries, ("find_sparse_regions",),
               regions_entered_and_left_through_boundaries),
        FxPass("cached_group_norm", cached_group_norm, ("insert_region_boundaries",), no_sparse_group_norm),
        # after cached_group_norm: conv windows are pulled back through the rewritten GroupNorms
        FxPass("sparse_conv", sparse_conv, ("cached_group_norm",), no_padded_conv_on_blocks),
        FxPass("sparse_upsample", sparse_upsample, ("sparse_conv",), no_dense_upsample_of_blocks),
        FxPass("relayout_gathered", relayout_gathered, ("insert_region_boundaries",), no_dense_reshape_of_blocks),
        # after sparse_conv: the window chains it builds need their operands repeated too
        FxPass("broadcast_over_blocks", broadcast_over_blocks, ("sparse_conv",), per_item_operands_repeated),
        FxPass("sparse_attention", sparse_attention, ("insert_region_boundaries",)),
        FxPass("select_linear_library", select_linear_library, ("insert_region_boundaries",), no_aten_linear),
        # after broadcast_over_blocks: it may have repeated the GroupNorm's operands
        FxPass("fuse_gather_norm_silu", fuse_gather_norm_silu, ("sparse_conv", "broadcast_over_blocks")),
        FxPass("eliminate_dead_code", eliminate_dead_code),
        # last: its nodes have no users, and only calls that ask for it write
        FxPass("insert_cache_write_back", insert_cache_write_back, ("eliminate_dead_code",)),
    ]


def _layout_tap(layout_module: str | None) -> list[FxPass]:
    if layout_module is None:  # a model without layout features: control calls cannot hold its layout
        return []
    return [FxPass("tap_layout_features", functools.partial(tap_layout_features, module=layout_module),
                   ("annotate_spatial_layout",), layout_features_tapped)]


def record_passes(refs: set[CacheRef], layout_module: str | None = None) -> list[FxPass]:
    """The record variant: the captured graph, saving what the sparse variant reads, and what control calls read
    (cross-attention maps, the output of the adapter's `layout_module`)."""
    return [
        ANNOTATE,
        FxPass("record_cross_attention_maps", record_cross_attention_maps, ("annotate_spatial_layout",)),
        *_layout_tap(layout_module),
        DENSE_LINEAR_LIBRARY,
        FxPass("insert_record_taps", functools.partial(insert_record_taps, refs=refs)),
    ]


def control_passes(refs: set[CacheRef], layout_module: str | None = None) -> list[FxPass]:
    """The control variant: dense, with Prompt-to-Prompt cross-attention control and (for its first calls) the
    source run's layout features, recording like `record` so that an edit run can become the source of the next
    edit."""
    return [
        ANNOTATE,
        FxPass("control_cross_attention", control_cross_attention, ("annotate_spatial_layout",)),
        *_layout_tap(layout_module),
        DENSE_LINEAR_LIBRARY,
        FxPass("insert_record_taps", functools.partial(insert_record_taps, refs=refs)),
    ]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with its own graph (node names and meta dicts copied) that shares `gm`'s parameters."""
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        values[node] = graph.node_copy(node, lambda n: values[n])
    graph._codegen = gm.graph._codegen  # pytree in/out handling; never mutated, so shared
    return fx.GraphModule(gm, graph)


SPARSE_PROGRAMS_KEPT = 8  # per write-back flag: programs of recent plan structures (masks), most recent first


@dataclasses.dataclass
class Variants:
    """The graph variants of one input signature (IR graphs, `runtime.ops`), what each pass did to make them, and
    the programs bound from them (`runtime.program`): one per flag combination for record and control calls, and
    for sparse calls one per plan structure, the most recent `SPARSE_PROGRAMS_KEPT` kept."""

    captured: fx.GraphModule
    record: fx.GraphModule
    control: fx.GraphModule
    sparse: fx.GraphModule
    passes: dict[str, list[PassRecord]]
    reuse: fx.GraphModule | None = None  # the reuse calls' sparse variant (`Policy.deep_reuse_interval` > 1)
    programs: dict[tuple[str, bool, bool], Program] = dataclasses.field(default_factory=dict)
    sparse_programs: dict[tuple[bool, bool], list[Program]] = dataclasses.field(default_factory=dict)
    backend: str | None = None  # `Policy.program_backend`: the torch.compile backend programs run with

    def program(self, variant: str, record_attention_maps: bool = False, hold_layout: bool = False) -> Program:
        """The record or control variant bound for calls that do (not) record cross-attention maps, and (control)
        do (not) take the source run's layout features."""
        key = (variant, record_attention_maps, hold_layout)
        if key not in self.programs:
            self.programs[key] = bind(getattr(self, variant), record_attention_maps=record_attention_maps,
                                      inline_kernels=self.backend is not None, hold_layout=hold_layout)
        return self.programs[key]

    def sparse_program(self, plan: MaskPlan, write_back: bool = False, reuse_call: bool = False) -> Program:
        """The sparse variant (the reuse calls' with `reuse_call`) bound for `plan`'s structure (a program bound for
        another mask is reused when the structures agree)."""
        kept = self.sparse_programs.setdefault((write_back, reuse_call), [])
        program = next((p for p in kept if p.fits(plan)), None)
        if program is None:
            variant = self.reuse if reuse_call else self.sparse
            program = bind(variant, plan, write_back=write_back, inline_kernels=self.backend is not None)
        else:
            kept.remove(program)
        kept.insert(0, program)
        del kept[SPARSE_PROGRAMS_KEPT:]
        return program

    def run_record(self, inputs: dict[str, Any], step: StepRecord, attention_maps: bool = False) -> tuple:
        program = self.program("record", attention_maps)
        return program(inputs, step, runner=program.compiled(self.backend))

    def run_control(self, inputs: dict[str, Any], step: StepRecord, source: StepRecord,
                    token_alignment: torch.Tensor, attention_maps: bool = True, hold_layout: bool = False) -> tuple:
        program = self.program("control", attention_maps, hold_layout)
        return program(inputs, step, source=source, token_alignment=token_alignment,
                       runner=program.compiled(self.backend))

    def run_sparse(self, inputs: dict[str, Any], step: StepRecord, plan: MaskPlan, write_back: bool = False,
                   reused: dict[CacheRef, torch.Tensor] | None = None, reuse_call: bool = False) -> tuple:
        """A sparse call; with temporal reuse, `reused` holds the deep levels' outputs that a full call stores and
        a reuse call (`reuse_call`) reads."""
        program = self.sparse_program(plan, write_back, reuse_call)
        if reused is not None:
            step = _WithReused(step, reused)
        return program(inputs, step, plan, runner=program.compiled(self.backend))


class _WithReused:
    """A step record as a sparse program of temporal reuse sees it: the "reused" tensors in the run's own dict,
    everything else in the record."""

    def __init__(self, step: StepRecord, reused: dict[CacheRef, torch.Tensor]):
        self.step, self.reused = step, reused

    def _holder(self, ref: CacheRef):
        return self.reused if ref.kind == "reused" else self.step

    def __contains__(self, ref: CacheRef) -> bool:
        return ref in self._holder(ref)

    def __getitem__(self, ref: CacheRef):
        return self._holder(ref)[ref]

    def __setitem__(self, ref: CacheRef, value) -> None:
        self._holder(ref)[ref] = value


def build_variants(adapter: ModelAdapter, inputs: dict[str, Any], policy: Policy, observers=()) -> Variants:
    """Capture the adapter's model for `inputs` and run the variants' pass pipelines. The sparse variant is built
    first: the others record exactly what it reads."""
    captured = capture(adapter, inputs)
    dump = GraphDump.for_inputs(policy, inputs)  # None unless Policy.dump_dir or $FISEDIT_DUMP_DIR is set
    if dump is not None:
        dump.captured(captured)
        observers = [*observers, dump]
    sparse, sparse_log = PassManager("sparse", sparse_passes(policy), observers)(copy_graph_module(captured))
    logs = {"sparse": sparse_log}
    refs = cache_refs(sparse)
    reuse = None
    if policy.deep_reuse_interval > 1:
        reuse, logs["reuse"] = PassManager("reuse", sparse_passes(policy, reuse_call=True), observers)(
            copy_graph_module(captured))
        refs |= cache_refs(reuse)
    refs = {ref for ref in refs if ref.kind != "reused"}  # handed from call to call, never recorded
    layout = adapter.layout_module
    record, logs["record"] = PassManager("record", record_passes(refs, layout), observers)(
        copy_graph_module(captured))
    control, logs["control"] = PassManager("control", control_passes(refs, layout), observers)(
        copy_graph_module(captured))
    if dump is not None:
        dump.finish()
    return Variants(captured, record, control, sparse, logs, reuse=reuse, backend=policy.program_backend)


@dataclasses.dataclass
class RecordMode:
    """Calls record the source run; the first `attention_maps` calls also save their cross-attention maps, and the
    first `maps_only` calls keep nothing else (`Policy.cache_dense_steps`). `direction`: the run's, part of its step
    keys (an inversion's calls never replace a generation's)."""

    attention_maps: int = 0
    calls: int = 0
    direction: Direction = "generation"
    maps_only: int = 0


@dataclasses.dataclass
class ControlMode:
    """Dense calls with cross-attention control (`token_alignment`: (B, tokens) long, for each token of the edited
    prompt the source token whose map it takes, or -1); they record into `pending`, and save their maps when
    `attention_maps` is set. The first `hold_layout` calls take the source run's layout features (the adapter's
    `layout_module`, a U-Net's mid block: `passes/tap_layout_features.py`), so that the objects stay where they
    were while the finer levels follow the edited prompt."""

    token_alignment: torch.Tensor
    pending: RecordCache
    attention_maps: bool = True
    direction: Direction = "generation"
    hold_layout: int = 0
    calls: int = 0


@dataclasses.dataclass
class SparseMode:
    """Calls compute only the active blocks of `mask`; with `write_back`, they store them into the cache."""

    mask: torch.Tensor
    write_back: bool = False
    plan: MaskPlan | None = None
    direction: Direction = "generation"  # of the recorded run the calls replay
    calls: int = 0  # sparse calls so far (temporal reuse: which are full)
    reused: dict[CacheRef, torch.Tensor] | None = None  # the last full call's deep outputs (temporal reuse)

    def next_call_reuses(self, interval: int) -> bool:
        """Whether the next call reuses deep levels (`Policy.deep_reuse_interval` = `interval`): not the first of
        each `interval` calls, and only after a full call."""
        return interval > 1 and self.calls % interval != 0 and bool(self.reused)


Mode = RecordMode | ControlMode | SparseMode


@dataclasses.dataclass
class Run:
    """One run of a compiled model (a source generation, an edit): its mode, which its driver may switch between
    calls, the cache it records into and replays, and its calls per timestep (for step keys). The code that enters
    `CompiledUNet.run` owns it; nothing of it is shared with other runs."""

    mode: Mode | None
    cache: RecordCache
    calls_per_timestep: Counter = dataclasses.field(default_factory=Counter)


# Per thread / asyncio task: the run each compiled model (by id) is inside.
_runs: contextvars.ContextVar[dict[int, Run]] = contextvars.ContextVar("fisedit_runs", default={})


def make_adapter(model: nn.Module, adapter: type[ModelAdapter] | ModelAdapter | None) -> ModelAdapter:
    """`model`'s adapter: the one given (a class is instantiated for `model`), else the registered one for its
    class (`adapters.adapter_for`, which names the class if there is none)."""
    if adapter is None:
        return adapter_for(model)
    if isinstance(adapter, type):
        return adapter(model)
    if adapter.model is not model:
        raise ValueError(f"the adapter given wraps a {type(adapter.model).__name__}, not this model")
    return adapter


class CompiledUNet(nn.Module):
    """A drop-in replacement for a model with an adapter (a `UNet2DConditionModel`) with `record()` and
    `sparse(mask)` modes; its calls take the model's arguments and return what the model returns.

    Attributes the pipelines read (`config`, `dtype`, `device`, `add_embedding`, ...) are the wrapped U-Net's.
    `cache` holds the recorded source run: `cache.steps`, `cache.nbytes`, `cache.clear()`.
    """

    def __init__(self, unet: nn.Module, policy: Policy | None = None,
                 adapter: type[ModelAdapter] | ModelAdapter | None = None):
        super().__init__()
        self.unet = unet
        self.adapter = make_adapter(unet, adapter)
        self.policy = policy or Policy()
        self.cache = RecordCache(self.policy.storage_dtype, make_store(self.policy))  # of record() and sparse()
        self._variants: dict[InputSignature, Variants] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    # --- runs and modes -------------------------------------------------------------------------------------

    @property
    def current_run(self) -> Run | None:
        """The run this thread (or task) is inside, if any."""
        return _runs.get().get(id(self))

    @property
    def mode(self) -> Mode | None:
        """The mode of the current run (None outside runs: calls run the eager model)."""
        run = self.current_run
        return None if run is None else run.mode

    @contextlib.contextmanager
    def run(self, mode: Mode | None, cache: RecordCache | None = None) -> Iterator[Run]:
        """Enter a run: the calls of this thread (or asyncio task) inside go through `run.mode`, which a driver may
        switch between calls (`EditSession` does, from a pipeline callback), record into or replay `cache` (default:
        `self.cache`), and count their step keys afresh. Runs do not nest; two runs at once (other threads) each
        need their own cache: a cache in use by another run is refused."""
        if self.current_run is not None:
            raise RuntimeError(
                f"already inside a {type(self.current_run.mode).__name__} run of this model: record(), sparse() and "
                "run() do not nest"
            )
        cache = self.cache if cache is None else cache
        if cache.in_use:
            raise RuntimeError(
                "this record cache is in use by another run (another thread, or a run that has not ended): give "
                "each concurrent session its own cache (`run(mode, cache=RecordCache())`, as EditSession does)"
            )
        parameter = next(self.unet.parameters(), None)
        if self.policy.retain_freed_memory and (parameter is None or parameter.device.type == "cpu"):
            retain_freed_memory()  # process-wide: sparse calls reuse their large temporaries' memory
        run = Run(mode, cache)
        token = _runs.set({**_runs.get(), id(self): run})
        cache.in_use = True
        try:
            yield run
        finally:
            cache.in_use = False
            _runs.reset(token)
            cache.run_done()

    @contextlib.contextmanager
    def record(self, attention_maps: int = 0) -> Iterator[CompiledUNet]:
        """Calls inside record the source run: dense, equal to the eager U-Net (up to float rounding where the
        cost constants give linear layers another library: `passes/select_linear_library.py`), saving per step key
        what sparse calls read, and for the first `attention_maps` calls the cross-attention maps that control calls
        inject. A new latent shape clears the cache."""
        with self.run(RecordMode(attention_maps)):
            yield self

    @contextlib.contextmanager
    def sparse(self, mask: torch.Tensor, write_back: bool = False) -> Iterator[CompiledUNet]:
        """Calls inside compute only the region of `mask` and take the rest from the recorded step.

        `mask`: bool (or 0/1) tensor at latent resolution, `(H, W)` for every batch item or `(B, 1, H, W)`.
        `write_back`: store the fresh active blocks into the cache, which then holds this run (continuous edits).
        """
        with self.run(self.sparse_mode(mask, write_back)):
            yield self

    def sparse_mode(self, mask: torch.Tensor, write_back: bool = False, cache: RecordCache | None = None,
                    ) -> SparseMode:
        """The mode `sparse()` enters, for drivers that switch modes inside a run (`EditSession`); `cache`: the one
        the run replays (default `self.cache`)."""
        cache = self.cache if cache is None else cache
        if not len(cache):
            raise RuntimeError(
                "sparse() needs a recorded source run, and nothing is recorded: run the source generation inside "
                "`with unet.record():` first"
            )
        latent = cache.latent_shape
        return SparseMode(as_mask(mask, tuple(latent[-2:]), batch=latent[0]), write_back)

    def active_pixels(self) -> torch.Tensor:
        """Inside `sparse()`: the (H, W) bool map of latent pixels that a sparse call recomputes (the active blocks
        of the output layer). Everywhere else its output is the recorded one, bit for bit."""
        if not isinstance(self.mode, SparseMode):
            raise RuntimeError("active_pixels() is only defined inside sparse(mask)")
        plan = self.mode.plan or self.mask_plan(self.mode.mask)
        return plan.active_pixels(plan.latent_res)

    def mask_plan(self, mask: torch.Tensor) -> MaskPlan:
        """The index plan of `mask` (active blocks per resolution, gather indices), with block sizes chosen for
        this U-Net's channel widths."""
        return MaskPlan(mask, self.policy, channels=self.adapter.channels())

    # --- calls ----------------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's call (same arguments, same output); inside a mode, through its graph variant."""
        run = self.current_run
        if run is None or run.mode is None:
            return self.unet(*args, **kwargs)
        mode, cache = run.mode, run.cache
        inputs, return_dict = self.adapter.bind(args, kwargs)
        sample = inputs[self.adapter.latents]
        timestep = self.adapter.step_timestep(inputs)
        timestep_key = StepKey.of(timestep, sample.shape[0], direction=mode.direction)
        occurrence = run.calls_per_timestep[timestep_key]
        run.calls_per_timestep[timestep_key] += 1
        if not isinstance(mode, RecordMode):  # replays cycle through the recorded calls at this timestep
            occurrence %= max(1, cache.occurrences(timestep_key))
        key = dataclasses.replace(timestep_key, occurrence=occurrence)
        variants = self.variants(inputs)
        if isinstance(mode, RecordMode):
            step = cache.new_step(key, tuple(sample.shape))
            output = variants.run_record(inputs, step, attention_maps=mode.calls < mode.attention_maps)
            if mode.calls < mode.maps_only:
                step.keep_maps_only()
            mode.calls += 1
        elif isinstance(mode, ControlMode):
            output = variants.run_control(
                inputs, mode.pending.new_step(key, tuple(sample.shape)), cache.step(key),
                mode.token_alignment.to(sample.device), attention_maps=mode.attention_maps,
                hold_layout=mode.calls < mode.hold_layout,
            )
            mode.calls += 1
        else:
            if cache.latent_shape != tuple(sample.shape):
                raise ValueError(
                    f"the latents have shape {tuple(sample.shape)} but the source run was recorded with "
                    f"{cache.latent_shape}: a sparse call must use the batch size and latent size of the "
                    "record run"
                )
            if mode.plan is None or mode.plan.device != sample.device:  # index plans: once per mask
                mode.plan = self.mask_plan(mode.mask.to(sample.device))
            step = cache.step(key)
            if step.maps_only:
                raise StepNotRecordedError(
                    f"{key.describe()} was recorded without its activations (Policy(cache_dense_steps=False) keeps "
                    "only the cross-attention maps of the first dense_steps steps): run those steps dense")
            interval = self.policy.deep_reuse_interval
            reuse_call = mode.next_call_reuses(interval)
            if interval > 1 and not reuse_call:
                mode.reused = {}  # filled by this full call
            output = variants.run_sparse(inputs, step, mode.plan, write_back=mode.write_back,
                                         reused=mode.reused if interval > 1 else None, reuse_call=reuse_call)
            mode.calls += 1
            if mode.write_back:
                cache.mark_dirty(key)
        cache.step_done(key)
        return self.adapter.wrap_output(tuple(output), return_dict)

    def variants(self, inputs: dict[str, Any]) -> Variants:
        """The graph variants for these inputs, capturing and compiling them on first use."""
        signature = InputSignature.of(inputs)
        if signature not in self._variants:
            # Compiling is not the call's work: a MAC counter (a dispatch mode) watching the call must not see it.
            with _disable_current_modes():
                self._variants[signature] = build_variants(self.adapter, inputs, self.policy)
        return self._variants[signature]


def compile(  # noqa: A001 - the public name
    unet: nn.Module, policy: Policy | None = None, adapter: type[ModelAdapter] | ModelAdapter | None = None,
) -> CompiledUNet:
    """Compile a model for FISEdit editing; see `CompiledUNet`. The model's family must have an adapter
    (`fisedit_compiler.adapters`: `UNet2DConditionModel` today), or one is given as `adapter`; a model without one
    is refused here, by class name."""
    if isinstance(unet, CompiledUNet):
        if (policy is None or policy == unet.policy) and adapter is None:
            return unet
        return CompiledUNet(unet.unet, policy or unet.policy, adapter or type(unet.adapter))
    return CompiledUNet(unet, policy, adapter)
