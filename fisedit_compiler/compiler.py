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
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .capture import InputSignature, capture
from .passes.annotate_spatial_layout import annotate_spatial_layout
from .passes.broadcast_over_blocks import broadcast_over_blocks
from .passes.cached_group_norm import cached_group_norm
from .passes.find_sparse_regions import find_sparse_regions
from .passes.insert_record_taps import cache_refs, insert_record_taps
from .passes.insert_region_boundaries import insert_region_boundaries
from .passes.manager import FxPass, PassManager, PassRecord
from .passes.relayout_gathered import relayout_gathered
from .passes.sparse_attention import sparse_attention
from .passes.sparse_conv import sparse_conv
from .passes.sparse_upsample import sparse_upsample
from .policy import Policy
from .runtime import context
from .runtime.cache import RecordCache, StepKey
from .runtime.mask_plan import MaskPlan


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Drop nodes whose values no longer reach the output (e.g. originals replaced by window versions)."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    return before - len(gm.graph.nodes)


def sparse_passes(policy: Policy) -> list[FxPass]:
    """The pass pipeline that turns a captured U-Net into its sparse variant, in order."""
    return [
        FxPass("annotate_spatial_layout", annotate_spatial_layout),
        FxPass("find_sparse_regions", functools.partial(find_sparse_regions, policy=policy),
               ("annotate_spatial_layout",)),
        FxPass("insert_region_boundaries", insert_region_boundaries, ("find_sparse_regions",)),
        FxPass("cached_group_norm", cached_group_norm, ("insert_region_boundaries",)),
        # after cached_group_norm: conv windows are pulled back through the rewritten GroupNorms
        FxPass("sparse_conv", sparse_conv, ("cached_group_norm",)),
        FxPass("sparse_upsample", sparse_upsample, ("sparse_conv",)),
        FxPass("relayout_gathered", relayout_gathered, ("insert_region_boundaries",)),
        # after sparse_conv: the window chains it builds need their operands repeated too
        FxPass("broadcast_over_blocks", broadcast_over_blocks, ("sparse_conv",)),
        FxPass("sparse_attention", sparse_attention, ("insert_region_boundaries",)),
        FxPass("eliminate_dead_code", eliminate_dead_code),
    ]


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy with its own graph (node names and meta dicts copied) that shares `gm`'s parameters."""
    graph = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        values[node] = graph.node_copy(node, lambda n: values[n])
    graph._codegen = gm.graph._codegen  # pytree in/out handling; never mutated, so shared
    return fx.GraphModule(gm, graph)


@dataclasses.dataclass
class Variants:
    """The graph variants of one input signature, and what each pass did to make them."""

    captured: fx.GraphModule
    record: fx.GraphModule
    sparse: fx.GraphModule
    passes: dict[str, list[PassRecord]]


def build_variants(unet: nn.Module, inputs: dict[str, Any], policy: Policy, observers=()) -> Variants:
    """Capture `unet` for `inputs` and run the sparse and record pipelines."""
    captured = capture(unet, inputs)
    sparse, sparse_log = PassManager(sparse_passes(policy), observers)(copy_graph_module(captured))
    refs = cache_refs(sparse)
    record_pass = FxPass("insert_record_taps", functools.partial(insert_record_taps, refs=refs))
    record, record_log = PassManager([record_pass], observers)(copy_graph_module(captured))
    return Variants(captured, record, sparse, {"sparse": sparse_log, "record": record_log})


class MaskError(ValueError):
    """A mask of the wrong shape, dtype or values."""


class CompiledUNet(nn.Module):
    """A drop-in replacement for a `UNet2DConditionModel` with `record()` and `sparse(mask)` modes.

    Attributes the pipelines read (`config`, `dtype`, `device`, `add_embedding`, ...) are the wrapped U-Net's.
    `cache` holds the recorded source run: `cache.steps`, `cache.nbytes`, `cache.clear()`.
    """

    def __init__(self, unet: nn.Module, policy: Policy | None = None):
        super().__init__()
        self.unet = unet
        self.policy = policy or Policy()
        self.cache = RecordCache()
        self._variants: dict[InputSignature, Variants] = {}
        self._mode: str | None = None
        self._mask: torch.Tensor | None = None
        self._plan: MaskPlan | None = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    # --- modes ----------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def record(self) -> Iterator[CompiledUNet]:
        """Calls inside record the source run: dense, equal to the eager U-Net, saving per step key what sparse
        calls read. A new latent shape clears the cache."""
        with self._in_mode("record"):
            yield self

    @contextlib.contextmanager
    def sparse(self, mask: torch.Tensor) -> Iterator[CompiledUNet]:
        """Calls inside compute only the region of `mask` and take the rest from the recorded step.

        `mask`: bool (or 0/1) tensor at latent resolution, `(H, W)` for every batch item or `(B, 1, H, W)`.
        """
        if not len(self.cache):
            raise RuntimeError(
                "sparse() needs a recorded source run, and nothing is recorded: run the source generation inside "
                "`with unet.record():` first"
            )
        self._mask = self._check_mask(mask)
        try:
            with self._in_mode("sparse"):
                yield self
        finally:
            self._mask = self._plan = None

    @contextlib.contextmanager
    def _in_mode(self, mode: str) -> Iterator[None]:
        if self._mode is not None:
            raise RuntimeError(f"already inside {self._mode}(); record() and sparse() do not nest")
        self._mode = mode
        try:
            yield
        finally:
            self._mode = None

    def _check_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise MaskError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            if mask.dtype.is_complex or not ((mask == 0) | (mask == 1)).all():
                raise MaskError(f"mask must be bool or hold only 0 and 1, got dtype {mask.dtype} with other values")
            mask = mask != 0
        latent = self.cache.latent_shape
        h, w = latent[-2:]
        if mask.dim() == 2:
            ok = tuple(mask.shape) == (h, w)
        elif mask.dim() == 4:
            ok = mask.shape[1] == 1 and tuple(mask.shape[2:]) == (h, w) and mask.shape[0] in (1, latent[0])
        else:
            ok = False
        if not ok:
            raise MaskError(
                f"mask has shape {tuple(mask.shape)} but the latents are {h}x{w} (batch {latent[0]}): "
                f"pass a ({h}, {w}) mask or a ({latent[0]}, 1, {h}, {w}) one"
            )
        return mask

    def active_pixels(self) -> torch.Tensor:
        """Inside `sparse()`: the (H, W) bool map of latent pixels that a sparse call recomputes (the active blocks
        of the output layer). Everywhere else its output is the recorded one, bit for bit."""
        if self._mask is None:
            raise RuntimeError("active_pixels() is only defined inside sparse(mask)")
        plan = self._plan or MaskPlan(self._mask, self.policy)
        return plan.active_pixels(plan.latent_res)

    # --- calls ----------------------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        down_block_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: tuple[torch.Tensor, ...] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        arguments = {k: v for k, v in locals().items() if k not in ("self", "return_dict")}
        if self._mode is None:
            return self.unet(**arguments, return_dict=return_dict)
        if cross_attention_kwargs:
            raise NotImplementedError(
                f"cross_attention_kwargs {sorted(cross_attention_kwargs)} are not supported in record() or "
                "sparse() calls; fuse LoRA scales into the weights first"
            )
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep, device=sample.device)
        inputs = {k: v for k, v in arguments.items() if v is not None and k != "cross_attention_kwargs"}
        inputs["timestep"] = timestep
        key = StepKey.of(timestep, sample.shape[0])
        variants = self.variants(inputs)
        if self._mode == "record":
            step = self.cache.new_step(key, tuple(sample.shape))
            with context.use(context.CallContext(step)):
                output = variants.record(inputs)
        else:
            if self.cache.latent_shape != tuple(sample.shape):
                raise ValueError(
                    f"the latents have shape {tuple(sample.shape)} but the source run was recorded with "
                    f"{self.cache.latent_shape}: a sparse call must use the batch size and latent size of the "
                    "record run"
                )
            if self._plan is None or self._plan.device != sample.device:  # index plans: once per mask
                self._plan = MaskPlan(self._mask.to(sample.device), self.policy)
            with context.use(context.CallContext(self.cache.step(key), self._plan)):
                output = variants.sparse(inputs)
        sample_out = output[0]
        if not return_dict:
            return (sample_out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=sample_out)

    def variants(self, inputs: dict[str, Any]) -> Variants:
        """The graph variants for these inputs, capturing and compiling them on first use."""
        signature = InputSignature.of(inputs)
        if signature not in self._variants:
            self._variants[signature] = build_variants(self.unet, inputs, self.policy)
        return self._variants[signature]


def compile(unet: nn.Module, policy: Policy | None = None) -> CompiledUNet:  # noqa: A001 - the public name
    """Compile a diffusers `UNet2DConditionModel` for FISEdit editing; see `CompiledUNet`."""
    if isinstance(unet, CompiledUNet):
        return unet if policy is None or policy == unet.policy else CompiledUNet(unet.unet, policy)
    return CompiledUNet(unet, policy)
