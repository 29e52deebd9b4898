"""`compile(unet, policy)`: a drop-in `UNet2DConditionModel` that records source runs and replays edits sparsely.

    sparse_unet = fisedit.compile(pipe.unet, fisedit.Policy())
    pipe.unet = sparse_unet
    with sparse_unet.record():        # source run: dense, saves what sparse calls need, per step key
        pipe(prompt_embeds=e, latents=z, num_inference_steps=20)
    with sparse_unet.sparse(mask):    # edit run: recomputes only the active region
        pipe(prompt_embeds=e2, latents=z, num_inference_steps=20)

Outside `record()` and `sparse()` a call runs the eager U-Net. The first recorded call of an input signature
captures the U-Net and runs the pass pipelines (`passes/pipelines.py`); the model's `Executor`
(`runtime/executor.py`) keeps the variants per signature and runs every call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .adapters import ModelAdapter, adapter_for
from .build import build_variants
from .inputs import MaskError, as_mask  # MaskError: re-exported here
from .policy import Policy
from .runtime.cache import RecordCache
from .runtime.executor import Executor, Variants
from .runtime.mask_plan import MaskPlan
from .runtime.run import ControlMode, Mode, RecordMode, Run, SparseMode, require_recorded
from .runtime.tiered_store import make_store

__all__ = ["CompiledUNet", "compile", "make_adapter", "MaskError", "RecordMode", "ControlMode", "SparseMode", "Run"]


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

    Attributes the pipelines read (`config`, `dtype`, `device`, `add_embedding`, ...) are the wrapped U-Net's, and
    so are its methods (`set_adapters`, `load_lora_adapter`, ...); `isinstance(compiled, UNet2DConditionModel)` is true
    (`type(compiled)` stays this class): pipelines and their LoRA loaders branch on it (`pipe.set_adapters`,
    `pipe.fuse_lora`, a ControlNet pipeline's calls), so the compiled model takes the model's place in a pipeline.
    `cache` holds the recorded source run of `record()` and `sparse()`: `cache.steps`, `cache.nbytes`,
    `cache.clear()`. Its calls run on `executor` (`runtime/executor.py`), which owns the graph variants and programs.
    """

    def __init__(self, unet: nn.Module, policy: Policy | None = None,
                 adapter: type[ModelAdapter] | ModelAdapter | None = None):
        super().__init__()
        self.unet = unet
        self.adapter = make_adapter(unet, adapter)
        self.executor = Executor(self._build, policy or Policy(), self.adapter.channels(),
                                 device=functools.partial(parameter_device, unet),
                                 output_downscale=self.adapter.output_downscale())
        self._cache: RecordCache | None = None  # made when record() or sparse() first needs it
        # The run each thread (or asyncio task) is inside, per compiled model.
        self._runs: contextvars.ContextVar[Run | None] = contextvars.ContextVar(f"fisedit_run_{id(self)}",
                                                                                default=None)

    @property
    def __class__(self):  # isinstance() consults it where type() does not match
        return type(self.unet)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    @property
    def policy(self) -> Policy:
        """The policy the model's calls run with (its executor's). Variants already built keep the policy they
        were built with; the run-time choices (temporal reuse's interval, block sizes of new masks) follow a
        new one."""
        return self.executor.policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self.executor.policy = policy

    def _build(self, inputs: dict[str, Any], graph: None) -> Variants:
        return build_variants(self.adapter, inputs, self.policy)

    @property
    def cache(self) -> RecordCache:
        """The record cache of `record()` and `sparse()` (an `EditSession` brings its own to `run`)."""
        if self._cache is None:
            self._cache = RecordCache(self.policy.storage_dtype, make_store(self.policy))
        return self._cache

    # --- runs and modes -------------------------------------------------------------------------------------

    @property
    def current_run(self) -> Run | None:
        """The run this thread (or task) is inside, if any."""
        return self._runs.get()

    @property
    def mode(self) -> Mode | None:
        """The mode of the current run (None outside runs: calls run the eager model)."""
        run = self.current_run
        return None if run is None else run.mode

    @contextlib.contextmanager
    def run(self, mode: Mode | None, cache: RecordCache | None = None) -> Iterator[Run]:
        """Enter a run: the calls of this thread (or asyncio task) inside go through `run.mode`, which a driver may
        switch between calls (`run.switch(mode)`: `EditSession` does, from a pipeline callback), record into or
        replay `cache` (default: `self.cache`), and count their step keys afresh. Runs do not nest; two runs at once
        (other threads) each need their own cache: a cache in use by another run is refused."""
        if self.current_run is not None:
            raise RuntimeError(
                f"already inside a {type(self.current_run.mode).__name__} run of this model: record(), sparse() and "
                "run() do not nest"
            )
        with self.executor.run(mode, self.cache if cache is None else cache) as run:
            token = self._runs.set(run)
            try:
                yield run
            finally:
                self._runs.reset(token)

    @contextlib.contextmanager
    def record(self, attention_maps: int = 0) -> Iterator[CompiledUNet]:
        """Calls inside record the source run: dense, equal to the eager U-Net (up to float rounding where the
        cost constants give linear layers another library: `passes/select_linear_library.py`), saving per step key
        what sparse calls read, and for the first `attention_maps` calls the cross-attention maps that control calls
        inject. A new latent shape clears the cache."""
        with self.run(RecordMode(attention_maps)):
            yield self

    @contextlib.contextmanager
    def sparse(self, mask: torch.Tensor, write_back: bool = False,
               token_alignment: torch.Tensor | None = None) -> Iterator[CompiledUNet]:
        """Calls inside compute only the region of `mask` and take the rest from the recorded step.

        `mask`: bool (or 0/1) tensor at latent resolution, `(H, W)` for every batch item or `(B, 1, H, W)`.
        `write_back`: store the fresh active blocks into the cache, which then holds this run (continuous edits).
        `token_alignment`: calls under cross-attention control (as `ControlMode`'s; the steps recorded with maps).
        """
        with self.run(sparse_mode(self.cache, mask, write_back, token_alignment)):
            yield self

    def active_pixels(self) -> torch.Tensor:
        """Inside `sparse()`: the (H, W) bool map of latent pixels that a sparse call recomputes (the active blocks
        of the output layer). Everywhere else its output is the recorded one, bit for bit."""
        plan = self.current_run.plan if self.current_run is not None else None
        if plan is None:
            raise RuntimeError("active_pixels() is only defined inside sparse(mask)")
        return plan.recomputed_pixels()

    def mask_plan(self, mask: torch.Tensor) -> MaskPlan:
        """The index plan of `mask` (active blocks per resolution, gather indices), with block sizes chosen for
        this U-Net's channel widths."""
        return self.executor.mask_plan(mask)

    def variants(self, inputs: dict[str, Any]) -> Variants:
        """The graph variants for these inputs, capturing and compiling them on first use."""
        return self.executor.variants(inputs, settings=self.adapter.settings(inputs))

    # --- calls ----------------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The wrapped model's call (same arguments, same output); inside a mode, through its graph variant."""
        run = self.current_run
        if run is None or run.mode is None:
            return self.unet(*args, **kwargs)
        inputs, return_dict = self.adapter.bind(args, kwargs)
        key = run.next_key(self.adapter.step_timestep(inputs), inputs[self.adapter.latents].shape[0])
        output = self.executor.call(run, key, inputs, latents=self.adapter.latents, **self.adapter.call_terms(inputs))
        return self.adapter.wrap_output(output, return_dict)


def sparse_mode(cache: RecordCache, mask: Any, write_back: bool = False,
                token_alignment: torch.Tensor | None = None) -> SparseMode:
    """The mode of sparse calls over a user's `mask` replaying `cache`: the mask checked against the recorded run's
    latent size and batch (`inputs.as_mask`), once, here."""
    latent = require_recorded(cache)
    return SparseMode(as_mask(mask, tuple(latent[-2:]), batch=latent[0]), write_back, token_alignment=token_alignment)


def parameter_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (None for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return None if parameter is None else parameter.device


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
