"""The executor: runs a call of a compiled model in its run's mode, on the program its graph variant binds to.

    executor = Executor(build, policy, channels)      # build(inputs, graph) -> Variants: capture, pass pipelines
    with executor.run(mode, cache) as run:            # the caller owns `run`; a driver may `run.switch(mode)`
        key = run.next_key(timestep, batch)
        outputs = executor.call(run, key, inputs)     # the model's outputs, a tuple

An executor owns the graph variants of each input signature (built on first use by the `build` it is given, which
lives above the runtime: `fisedit_compiler.build`), the programs bound from them (`runtime.program`), and the cost
constants of the model's device (loaded once). `CompiledUNet` holds one for its model; the torch.compile backend
one per compiled module, whose variants are kept per dynamo graph too (`graph`: a key `build` is handed). What a call records or replays, it finds in `run.cache`; the run's mode state (calls, mask
plan, temporal reuse) is the run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from fractions import Fraction
from typing import Any

import torch
import torch.fx as fx
from torch.utils._python_dispatch import _disable_current_modes, any_torch_dispatch_mode_on_stack

from ..cost_model import CostConstants, load_constants
from ..ir import CacheRef
from ..ir.signature import InputSignature, Settings
from ..policy import Policy
from .cache import RecordCache, StepKey, StepNotRecordedError, StepRecord
from .mask_plan import MaskPlan
from .memory import retain_freed_memory
from .program import Program, bind
from .run import ControlMode, Mode, RecordMode, Run, SparseMode

SPARSE_PROGRAMS_KEPT = 8  # per write-back flag: programs of recent plan structures (masks), most recent first


@dataclasses.dataclass
class Variants:
    """The graph variants of one input signature (IR graphs, `ir.ops`), what each pass did to make them (the pass
    manager's records, by pipeline) and the programs bound from them: one per flag combination for record and
    control calls, and for sparse calls one per plan structure, the most recent `SPARSE_PROGRAMS_KEPT` kept."""

    captured: fx.GraphModule
    record: fx.GraphModule
    control: fx.GraphModule
    sparse: fx.GraphModule
    passes: dict[str, list]
    reuse: fx.GraphModule | None = None  # the reuse calls' sparse variant (`Policy.deep_reuse_interval` > 1)
    programs: dict[tuple[str, bool, bool], Program] = dataclasses.field(default_factory=dict)
    sparse_programs: dict[tuple[bool, bool, bool], list[Program]] = dataclasses.field(default_factory=dict)
    backend: str | None = None  # `Policy.program_backend`: the torch.compile backend programs run with
    constants: CostConstants | None = None  # what dense programs choose libraries with (None: the device's)

    def program(self, variant: str, record_attention_maps: bool = False, hold_layout: bool = False) -> Program:
        """The record or control variant bound for calls that do (not) record cross-attention maps, and (control)
        do (not) take the source run's layout features."""
        key = (variant, record_attention_maps, hold_layout)
        if key not in self.programs:
            self.programs[key] = bind(getattr(self, variant), record_attention_maps=record_attention_maps,
                                      inline_kernels=self.backend is not None, hold_layout=hold_layout,
                                      constants=self.constants, control_maps=variant == "control")
        return self.programs[key]

    def sparse_program(self, plan: MaskPlan, write_back: bool = False, reuse_call: bool = False,
                       control: bool = False) -> Program:
        """The sparse variant (the reuse calls' with `reuse_call`) bound for `plan`'s structure (a program bound for
        another mask is reused when the structures agree), under cross-attention control or not."""
        kept = self.sparse_programs.setdefault((write_back, reuse_call, control), [])
        program = next((p for p in kept if p.fits(plan)), None)
        if program is None:
            variant = self.reuse if reuse_call else self.sparse
            program = bind(variant, plan, write_back=write_back, inline_kernels=self.backend is not None,
                           control_maps=control)
        else:
            kept.remove(program)
        kept.insert(0, program)
        del kept[SPARSE_PROGRAMS_KEPT:]
        return program

    def runner(self, program: Program):
        """What runs `program`: its `torch.compile` with the programs' backend, or the eager program calling its
        kernels directly (`Program.direct`), which a call watched by a dispatch mode (a MAC counter,
        `macs.count_macs`) runs too: dynamo does not trace under such a mode, and the eager program runs the same
        ops (up to the compiler's fusions and rounding)."""
        if self.backend is None or any_torch_dispatch_mode_on_stack():
            return program.direct()
        return program.compiled(self.backend)

    def run_record(self, inputs: dict[str, Any], step: StepRecord, attention_maps: bool = False) -> tuple:
        program = self.program("record", attention_maps)
        return program(inputs, step, runner=self.runner(program))

    def run_control(self, inputs: dict[str, Any], step: StepRecord, source: StepRecord,
                    token_alignment: torch.Tensor, attention_maps: bool = True, hold_layout: bool = False) -> tuple:
        program = self.program("control", attention_maps, hold_layout)
        return program(inputs, step, source=source, token_alignment=token_alignment, runner=self.runner(program))

    def run_sparse(self, inputs: dict[str, Any], step: StepRecord, plan: MaskPlan, write_back: bool = False,
                   reused: dict[CacheRef, torch.Tensor] | None = None, reuse_call: bool = False,
                   token_alignment: torch.Tensor | None = None) -> tuple:
        """A sparse call; with temporal reuse, `reused` holds the deep levels' outputs that a full call stores and
        a reuse call (`reuse_call`) reads. With `token_alignment` its cross-attentions are under control, taking
        the step's recorded maps (the source run's) for the tokens it aligns."""
        control = token_alignment is not None
        program = self.sparse_program(plan, write_back, reuse_call, control)
        source = step if control else None
        if reused is not None:
            step = _WithReused(step, reused)
        return program(inputs, step, plan, source=source, token_alignment=token_alignment,
                       runner=self.runner(program))


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


class Executor:
    """Runs calls for one model: see the module docstring. `build(inputs, graph)` makes the variants of an input
    signature (of `graph`, one of the dynamo graphs of a model compiled with the backend; None otherwise).
    `channels` (the model's channels per downscale factor) and the policy size the mask plans' blocks; `device()`
    says where the model computes now (None if unknown): mask plans are built there."""

    def __init__(self, build: Callable[[dict[str, Any], Any], Variants], policy: Policy,
                 channels: Mapping[Fraction, int] | None = None,
                 device: Callable[[], torch.device | None] = lambda: None, output_downscale: int = 1):
        self.policy = policy
        self.channels = dict(channels or {})
        self.output_downscale = output_downscale
        self.device = device
        self._build = build
        self._variants: dict[tuple[Any, InputSignature, Settings], Variants] = {}
        self._constants: dict[torch.device, CostConstants] = {}

    def constants(self, device: torch.device) -> CostConstants:
        """The cost constants of `device`, loaded once per executor."""
        if device not in self._constants:
            self._constants[device] = load_constants(device)
        return self._constants[device]

    def mask_plan(self, mask: torch.Tensor, extent: tuple[int, int] | None = None) -> MaskPlan:
        """The index plan of `mask` (active blocks per resolution, gather indices) over `extent` (default: the
        mask's size) on the model's device, with block sizes chosen for the model's channel widths."""
        device = self.device()
        mask = mask.to(device) if device is not None else mask
        return MaskPlan(mask, self.policy, self.constants(mask.device), self.channels, self.output_downscale, extent)

    def prepare(self, mask: torch.Tensor | None = None, control: bool = True) -> None:
        """Bind now, with their code generated, the programs that the first calls of an edit would bind: for every
        input signature built so far the control programs (the layout held and not) with `control`, and with `mask`
        the sparse programs of its plan's structure (writing back and not), which later masks of that structure run
        (`Program.fits`). For time when nothing waits (the user looking at the source)."""
        plan = None if mask is None else self.mask_plan(mask)
        for variants in list(self._variants.values()):
            programs = [variants.program("control", True, hold) for hold in (False, True)] if control else []
            if plan is not None:
                programs += [variants.sparse_program(plan, write_back) for write_back in (False, True)]
            for program in programs:
                variants.runner(program)  # (an eager program's code; a compiler's compiles at its first call)

    def variants(self, inputs: dict[str, Any], graph: Any = None, settings: Settings = Settings()) -> Variants:
        """The graph variants for these inputs (of `graph`) under the model's `settings` (which the graphs bake in),
        built on first use of their signature."""
        signature = graph, InputSignature.of(inputs), settings
        if signature not in self._variants:
            # Compiling is not the call's work: a MAC counter (a dispatch mode) watching the call must not see it.
            with _disable_current_modes():
                variants = self._build(inputs, graph)
            tensor = next((t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)), None)
            if tensor is not None:  # the device the programs compute on
                variants.constants = self.constants(tensor.device)
            self._variants[signature] = variants
        return self._variants[signature]

    @contextlib.contextmanager
    def run(self, mode: Mode | None, cache: RecordCache) -> Iterator[Run]:
        """A run of calls in `mode` (switchable), recording into and replaying `cache`, which no other run may use
        meanwhile."""
        if cache.in_use:
            raise RuntimeError(
                "this record cache is in use by another run (another thread, or a run that has not ended): give "
                "each concurrent session its own cache (`run(mode, cache=RecordCache())`, as EditSession does)"
            )
        device = self.device()
        if self.policy.retain_freed_memory and (device is None or device.type == "cpu"):
            retain_freed_memory()  # process-wide: sparse calls reuse their large temporaries' memory
        run = Run(mode, cache, self.mask_plan, self.policy.deep_reuse_interval)
        cache.in_use = True
        try:
            yield run
        finally:
            cache.in_use = False
            cache.run_done()

    def call(self, run: Run, key: StepKey, inputs: dict[str, Any], latents: str = "sample", graph: Any = None,
             shape: tuple[int, ...] | None = None, settings: Settings = Settings(),
             extent: tuple[int, int] | None = None) -> tuple:
        """One call (of `graph`) at step `key` in the run's mode; `inputs[latents]` is the latents, `shape` the
        latents' shape as masks see them (default: their own; an adapter's `latent_shape`), `extent` what the pixel
        layouts span (an adapter's `mask_extent`) and `settings` what the call's graph bakes in (an adapter's
        `settings`: a record is replayed only under its own). Returns the model's outputs."""
        mode = run.mode
        sample = inputs[latents]
        shape = tuple(sample.shape) if shape is None else tuple(shape)
        extent = tuple(shape[-2:]) if extent is None else tuple(extent)
        if not isinstance(mode, RecordMode):
            run.cache.check_settings(settings)
        variants = self.variants(inputs, graph, settings)
        if isinstance(mode, RecordMode):
            output = self._record(run, mode, key, variants, inputs, shape, settings, extent)
        elif isinstance(mode, ControlMode):
            output = variants.run_control(
                inputs, mode.pending.new_step(key, shape, settings, extent), run.cache.step(key),
                mode.token_alignment.to(sample.device), attention_maps=mode.attention_maps,
                hold_layout=run.state.calls < mode.hold_layout)
        else:
            output = self._sparse(run, mode, key, variants, inputs, shape, extent, sample.device)
        run.state.calls += 1
        run.cache.step_done(key)
        return tuple(output)

    @staticmethod
    def _record(run: Run, mode: RecordMode, key: StepKey, variants: Variants, inputs: dict[str, Any],
                shape: tuple[int, ...], settings: Settings, extent: tuple[int, int]) -> tuple:
        step = run.cache.new_step(key, shape, settings, extent)
        output = variants.run_record(inputs, step, attention_maps=run.state.calls < mode.attention_maps)
        if run.state.calls < mode.maps_only:
            step.keep_maps_only()
        return output

    def _sparse(self, run: Run, mode: SparseMode, key: StepKey, variants: Variants, inputs: dict[str, Any],
                shape: tuple[int, ...], extent: tuple[int, int], device: torch.device) -> tuple:
        cache, state = run.cache, run.state
        if cache.latent_shape != shape:
            raise ValueError(
                f"the latents have shape {shape} but the source run was recorded with {cache.latent_shape}: a sparse "
                "call must use the batch size and latent size of the record run"
            )
        if cache.extent != extent:
            raise ValueError(
                f"the call's pixels span {extent} at latent resolution, the record run's {cache.extent} (a "
                "reference image of another size?): a sparse call must take the record run's reference image size")
        step = cache.step(key)
        if step.maps_only:
            raise StepNotRecordedError(
                f"{key.describe()} was recorded without its activations (Policy(cache_dense_steps=False) keeps "
                "only the cross-attention maps of the first dense_steps steps): run those steps dense")
        temporal = run.reuse_interval > 1
        reuse_call = run.next_call_reuses()
        if temporal and not reuse_call:
            state.reused = {}  # filled by this full call
        control = run.next_call_controls()
        output = variants.run_sparse(inputs, step, state.plan, write_back=mode.write_back,
                                     reused=state.reused if temporal else None, reuse_call=reuse_call,
                                     token_alignment=mode.token_alignment.to(device) if control else None)
        if mode.write_back:
            cache.mark_dirty(key)
        return output
