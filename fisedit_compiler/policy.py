"""`Policy`: every choice the compiler makes that a user may want to change, with the paper's defaults."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

AttentionMode = Literal["active_queries", "masked_only", "dense"]
NormStats = Literal["recorded", "fresh"]
HaloUnit = Literal["cells", "latent_pixels"]
CacheDtype = Literal["float32", "float16", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a compiled U-Net runs its sparse calls.

    Attributes:
        max_sparse_downscale: a layer runs sparse when its feature map is at most this many times smaller than
            the latents. The default 8 makes every level of SD 1.5/2 (latents, 2x, 4x and 8x smaller) sparse; at
            each level and mask the cost model may still keep the map dense (one block) where blocks do not pay.
            The paper keeps the lowest resolution dense (4: SD 2 at 96x96 latents dense at 12x12); with a halo in
            latent pixels a mask pooled down to 12x12 covers little more than at the latents (a 15% mask: 22% of
            it). With both defaults a sparse SD 2 call at a 15% mask costs 1/5.56 of a dense call's MACs
            (`benchmarks/results/cpu-2core.md`), 1/4.07 with the paper's (an earlier run, in that file's history).
        halo: dilation of the mask, in `halo_unit`s. It widens the region that is recomputed so that the seam
            between fresh and recorded activations falls outside the edit.
        halo_unit: "latent_pixels" (the default): the mask is dilated by `halo` latent pixels, then max-pooled to
            every resolution (a cell of a lower resolution is active when any pixel of the dilated mask falls in
            it), so every level gets the same extra context in image terms. "cells": the mask is max-pooled to
            every resolution and dilated there by `halo` cells of that resolution (at a map 8x smaller than the
            latents, 8 latent pixels a cell), which blows small masks up at low resolutions: at SD 2's 24x24 a 15%
            mask covered 27% of the map, 19% with the halo in latent pixels. On the shapes model (10 edits, every
            step sparse) an edit took 30% of a dense regeneration's MACs instead of 40%, 2.7 dB further from the
            dense edit in the mask (23.9 vs 26.6 dB PSNR; `benchmarks/results/edit-settings.md`; on the previous,
            SD-layout model 17% instead of 24% at the same PSNR).
        block_size: the side of the square blocks that sparse layers compute. None (the default): the cost model
            (`cost_model`, the paper's APSC) picks it per resolution and mask from {1, 2, 4, 8, 16, 32} or dense
            (1: pixel-wise, each convolution one matrix product).
            A number fixes it: at each resolution the largest divisor of the map size not above it.
        attention: self-attention at sparse resolutions. "active_queries": queries from active tokens, keys and
            values from all tokens (fresh for active ones, recorded for the rest); exact wherever the inactive
            tokens' inputs equal the recorded ones. "masked_only": the paper's variant, active tokens attend to
            active tokens only. "dense": self-attention layers are not made sparse; their inputs are
            materialised at full size and every query is computed.
        norm_stats: GroupNorm statistics in sparse calls. "recorded" (the paper's approximation) reuses the
            source run's mean and variance so that GroupNorm becomes a per-channel affine map on active blocks;
            "fresh" materialises the GroupNorm input and computes the statistics of the current call.
        dense_steps: the fraction of an edit's denoising steps that run dense (with cross-attention control)
            before the switch to sparse, when the mask is detected (paper: 10 of 50).
        detect_from, detect_to: the steps whose latent differences make the mask, as fractions of the steps
            (paper: steps 5 to 10 of 50). Rounded to whole steps, at least step 1, at most the dense steps.
        mask_dilation: pixels by which a detected mask is dilated at latent resolution.
        user_mask_dense_steps: the fraction of steps that run dense before sparse when the user gives the mask
            (default 0: sparse from the first step; a word swap runs its `hold_layout_steps` dense).
        hold_layout_steps: the fraction of an edit's first steps whose layout features (a U-Net's mid block
            output) are the source run's, when the edit only swaps words ("a red circle" -> "a blue circle"):
            objects stay where they were while the finer levels follow the new words
            (`passes/tap_layout_features.py`). These steps run dense under control, with a detected or a user
            mask; at most `dense_steps`. Edits that insert or delete words never hold the layout. 0: never.
        inversion_skip: `EditSession.load_image` inverts a real image with DDIM, calling the U-Net at every
            `inversion_skip`-th step only and reusing its predicted noise in between (EEdit's inversion step
            skipping; 1, the default: plain DDIM inversion). On the shapes model m = 2 saved 9% of `load_image`'s
            time and cost 2.6 dB of inversion fidelity (`benchmarks/results/inversion.md`).
        refresh_every: EEdit's periodic refresh: every `refresh_every`-th step after an edit switches to sparse
            runs dense and records what it computed (steps whose cross-attention maps a later edit reads excepted),
            so that the activations sparse steps reuse outside the region are at most that many steps old. None (the
            default): every step after the switch is sparse. On the shapes model every 4 steps bought 0.5 dB of PSNR
            against the dense edit for 1.5x the MACs of an edit without refresh (44% of a dense regeneration's
            instead of 30%; `benchmarks/results/edit-settings.md`).
        deep_reuse_interval: temporal reuse stacked on the spatial one (DeepCache's observation that deep,
            low-resolution features change little between steps; EEdit's temporal redundancy): of every
            `deep_reuse_interval` sparse calls of a run, the first computes every level and the others take the
            output of the levels at least `deep_reuse_downscale` times smaller than the latents from it, computing
            only the finer levels' active blocks (`passes.reuse_deep_levels`). 1 (the default): off. An
            approximation of its own: those calls see deep features one or more steps old, and with write-back the
            deep levels' recorded activations of those steps stay the previous run's.
        deep_reuse_downscale: the levels a reuse call takes from the last full call: maps at least this many times
            smaller than the latents (default 2: for SD, all but the first down block and the last up block).
        cache_dtype: the dtype the record cache stores activations in. None (the default): the dtype they are
            computed in, so that a sparse call on the recorded input returns the recorded output exactly.
            "float16" or "bfloat16" halve an fp32 U-Net's cache (DESIGN, "The cache"); sparse calls then read
            recorded activations rounded to that dtype, an approximation of its own (outside the active blocks
            a sparse call returns the recorded output as stored, i.e. rounded).
        cache_dense_steps: whether the record cache keeps the activations of a run's first `dense_steps` steps
            (True, the default). Only edits with a user mask read them (sparse from the first step): an edit that
            detects its mask runs those steps dense, reading their cross-attention maps alone. False keeps the maps
            only, which saves that share of the cache (`dense_steps`, 20% by default), and user-mask edits then run
            those steps dense too (`user_mask_dense_steps` at least `dense_steps`).
        dump_dir: a folder to write graph dumps into (every variant of every compiled input signature, before
            and after each pass: DOT, SVG where Graphviz is installed, JSON, an HTML index; see docs/dumps.md).
            None: no dumps, unless the environment variable FISEDIT_DUMP_DIR names a folder.
        dump_svg: whether dumps render SVG with Graphviz (where installed; FISEDIT_DUMP_SVG=0 also turns it off).
        cache_budget: how many bytes of recorded steps stay in memory; the rest live on disk, in a spill folder
            in `cache_dir` (`runtime.tiered_store`; written in the background, read ahead during replays). A float
            in (0, 1]: that fraction of the memory available when the session (or compiled model) is made (default
            0.5); an int: bytes; "unbounded": everything in memory. An `EditSession` shares one budget among its
            cache, its edit runs' pending records and its decoder's record. A step larger than the whole budget
            is an error (`CacheBudgetError`), as is a disk without room for a step (`CacheIOError`).
        cache_dir: where spill folders are made (None: the system's temporary folder). A spill folder belongs to
            its store and is removed with it; folders left by processes that died are removed by the next store
            made in the same place.
        program_backend: a `torch.compile` backend that record, control and sparse calls run their programs with
            (`runtime.program`), e.g. "inductor": each program is compiled once (a sparse one per mask structure)
            and traced as one graph. None (the default): programs run eagerly, the reference.
        retain_freed_memory: on a CPU, the first run (record, sparse, control) makes this process keep the memory
            it frees for reuse instead of returning it to the system (glibc's malloc; `runtime.memory`): a sparse
            call allocates and frees tens of MB of gathered windows per layer, which the system would zero anew
            every call. SD 1.5's sparse calls at 64x64 latents ran 10-15% faster. Process-wide and for the
            process's lifetime; the record cache hands the free heap back to the system at the end of each run,
            memory freed by other code between runs stays with the process. False: the allocator is left as it is.
    """

    max_sparse_downscale: int = 8
    halo: int = 1
    halo_unit: HaloUnit = "latent_pixels"
    block_size: int | None = None
    attention: AttentionMode = "active_queries"
    norm_stats: NormStats = "recorded"
    dense_steps: float = 0.2
    detect_from: float = 0.1
    detect_to: float = 0.2
    mask_dilation: int = 1
    user_mask_dense_steps: float = 0.0
    hold_layout_steps: float = 0.2
    inversion_skip: int = 1
    refresh_every: int | None = None
    deep_reuse_interval: int = 1
    deep_reuse_downscale: int = 2
    cache_dtype: CacheDtype | None = None
    cache_dense_steps: bool = True
    dump_dir: str | None = None
    dump_svg: bool = True
    cache_budget: float | int | Literal["unbounded"] = 0.5
    cache_dir: str | None = None
    program_backend: str | None = None
    retain_freed_memory: bool = True

    def __post_init__(self) -> None:
        if self.max_sparse_downscale < 1:
            raise ValueError(f"max_sparse_downscale must be >= 1, got {self.max_sparse_downscale}")
        if self.halo < 0:
            raise ValueError(f"halo must be >= 0, got {self.halo}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.attention not in ("active_queries", "masked_only", "dense"):
            raise ValueError(
                f"attention must be 'active_queries', 'masked_only' or 'dense', got {self.attention!r}"
            )
        if self.halo_unit not in ("cells", "latent_pixels"):
            raise ValueError(f"halo_unit must be 'cells' or 'latent_pixels', got {self.halo_unit!r}")
        if self.norm_stats not in ("recorded", "fresh"):
            raise ValueError(f"norm_stats must be 'recorded' or 'fresh', got {self.norm_stats!r}")
        fractions = {"dense_steps": self.dense_steps, "detect_from": self.detect_from, "detect_to": self.detect_to,
                     "user_mask_dense_steps": self.user_mask_dense_steps, "hold_layout_steps": self.hold_layout_steps}
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} is a fraction of the denoising steps, in [0, 1]; got {value}")
        if self.hold_layout_steps > self.dense_steps:
            raise ValueError(f"hold_layout_steps ({self.hold_layout_steps}) must not exceed dense_steps "
                             f"({self.dense_steps}): only dense control steps hold the layout")
        if self.detect_from > self.detect_to:
            raise ValueError(f"detect_from ({self.detect_from}) must not exceed detect_to ({self.detect_to})")
        if self.cache_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(
                f"cache_dtype must be None, 'float32', 'float16' or 'bfloat16', got {self.cache_dtype!r}"
            )
        if not isinstance(self.cache_dense_steps, bool):
            raise ValueError(f"cache_dense_steps must be True or False, got {self.cache_dense_steps!r}")
        if self.program_backend is not None and self.program_backend not in _torch_compile_backends():
            raise ValueError(
                f"program_backend {self.program_backend!r} is not a torch.compile backend; choose one of "
                f"{_torch_compile_backends()}, or None to run programs eagerly"
            )
        budget = self.cache_budget
        if not (budget == "unbounded" or (isinstance(budget, float) and 0 < budget <= 1)
                or (isinstance(budget, int) and not isinstance(budget, bool) and budget >= 0)):
            raise ValueError(
                f"cache_budget must be a fraction of the available memory in (0, 1] (a float), a number of bytes "
                f"(an int >= 0) or 'unbounded'; got {budget!r}"
            )
        if self.mask_dilation < 0:
            raise ValueError(f"mask_dilation must be >= 0, got {self.mask_dilation}")
        if self.refresh_every is not None and (isinstance(self.refresh_every, bool)
                                               or not isinstance(self.refresh_every, int) or self.refresh_every < 1):
            raise ValueError(f"refresh_every must be None or an int >= 1 (every that many steps one dense step), got "
                             f"{self.refresh_every!r}")
        for name in ("deep_reuse_interval", "deep_reuse_downscale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.deep_reuse_downscale < 2:
            raise ValueError("deep_reuse_downscale must be >= 2: the levels at the latents' own resolution are always "
                             f"computed; got {self.deep_reuse_downscale}")
        if isinstance(self.inversion_skip, bool) or not isinstance(self.inversion_skip, int) or self.inversion_skip < 1:
            raise ValueError(f"inversion_skip must be an int >= 1 (1: every inversion step calls the U-Net), got "
                             f"{self.inversion_skip!r}")

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """`cache_dtype` as a torch dtype (None: keep the computed dtype)."""
        return getattr(torch, self.cache_dtype) if self.cache_dtype else None

    def edit_schedule(self, num_steps: int) -> tuple[int, int, int]:
        """(dense steps k, first and last detection step t1..t2, 1-based) for an edit of `num_steps` steps."""
        k = min(num_steps, max(1, round(self.dense_steps * num_steps)))
        t2 = min(k, max(1, round(self.detect_to * num_steps)))
        t1 = min(t2, max(1, round(self.detect_from * num_steps)))
        return k, t1, t2

    def user_mask_schedule(self, num_steps: int) -> int:
        """Dense steps of an edit with a user mask: `user_mask_dense_steps`, and at least the detected edits'
        `dense_steps` when the cache keeps only their maps (`cache_dense_steps=False`)."""
        k = round(self.user_mask_dense_steps * num_steps)
        return k if self.cache_dense_steps else max(k, self.edit_schedule(num_steps)[0])

    def hold_layout_schedule(self, num_steps: int) -> int:
        """The first steps of a word-swap edit that take the source run's layout features (at most the dense
        steps `edit_schedule` gives)."""
        if self.hold_layout_steps == 0:
            return 0
        return min(self.edit_schedule(num_steps)[0], max(1, round(self.hold_layout_steps * num_steps)))

    def recorded_activations_from(self, num_steps: int) -> int:
        """The first step whose activations a record run keeps (0, or `dense_steps` with `cache_dense_steps=False`)."""
        return 0 if self.cache_dense_steps else self.edit_schedule(num_steps)[0]

    def is_sparse_resolution(self, resolution: tuple[int, int], latent: tuple[int, int]) -> bool:
        """Whether a feature map of `resolution` runs sparse for latents of size `latent`."""
        return all(r * self.max_sparse_downscale >= l for r, l in zip(resolution, latent))


def _torch_compile_backends() -> list[str]:
    return torch._dynamo.list_backends(exclude_tags=())
