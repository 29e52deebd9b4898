"""Incremental decoding: an edit's image decoded only around the latents that changed.

An edit changes the latents inside its region and leaves every other latent pixel the source's, bit for bit, yet the
pipeline decodes the whole image again (15 s of a 512x512 edit on a CPU). The VAE decoder is compiled like the U-Net
(`adapters.vae_decoder`); the decode of the current image is recorded, and the next one runs sparse on the latent
pixels where its input differs from the recorded one, writing its fresh blocks back (so that the record is always
the current image's decode, for continuous edits):

    decoder = SparseDecoder(pipe.vae, policy)
    with decoder.steering():
        pipe(...)          # its vae.decode: recorded, or sparse around what changed since the last decode

Outside the recomputed region (the changed latents dilated by the policy's halo and rounded up to blocks, at every
resolution of the decoder, up to the image's) the image is the recorded one, bit for bit; inside it the policy's
approximations are those of a sparse U-Net call (recorded GroupNorm statistics, context from the recorded decode).
A decode whose region would cover the whole image, or of latents of another shape, runs dense and records. A record
larger than the whole memory budget (SDXL's at 1024² is about 7 GiB in fp32) is not kept: that decode and every
later one run the eager decoder, with a warning that says why (`SparseDecoder.refused`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ..compiler import RecordMode, SparseMode, compile
from ..policy import Policy
from ..runtime.cache import RecordCache
from ..runtime.tiered_store import CacheBudgetError, MemoryBudget, make_store


@dataclasses.dataclass
class DecodeStats:
    """The last decode: "record" (dense, recorded), "dense" (not recorded) or "sparse", its seconds, and the share of the image's pixels
    it recomputed (1.0 for a dense one); `region`: for a sparse one, the (H, W) bool map of the image's pixels it
    recomputed (every other pixel is the recorded decode's, bit for bit)."""

    mode: str
    seconds: float
    recomputed: float
    region: torch.Tensor | None = dataclasses.field(default=None, repr=False)


def decoder_policy(policy: Policy) -> Policy:
    """The session's policy as the VAE decoder runs it. One call per image: no step to reuse from. The decoder's
    maps are as fine as the latents or finer (up to 8x): a halo of one cell of each map is the seam its 3x3
    convolutions need, where one latent pixel would recompute 8 image pixels around the region at full resolution
    (SD's VAE at 512², 15% mask: 19.5% of the pixels recomputed with cells; `benchmarks/vae_decode.py`)."""
    return dataclasses.replace(policy, deep_reuse_interval=1, halo_unit="cells")


class SparseDecoder:
    """Compiles `vae.decoder` in place (`vae.decode` calls the compiled one; outside `steering()` it runs the eager
    decoder) and keeps its record cache (within `memory_budget`, shared with a session's other records) and the
    input of the recorded decode."""

    def __init__(self, vae: torch.nn.Module, policy: Policy, memory_budget: MemoryBudget | None = None):
        policy = decoder_policy(policy)
        self.decoder = compile(vae.decoder, policy)
        vae.decoder = self.decoder
        self.cache = RecordCache(policy.storage_dtype, make_store(policy, memory_budget))
        self._recorded_input: torch.Tensor | None = None  # the decoder input whose decode the cache holds
        self._started = 0.0
        self._keep = True
        self.last: DecodeStats | None = None
        self.refused: str | None = None  # why decodes run eager: the record did not fit the memory budget
        compiled_forward = self.decoder.forward

        def forward(*args, **kwargs):
            try:
                return compiled_forward(*args, **kwargs)
            except CacheBudgetError as error:  # the record, complete, is larger than the whole budget
                self._refuse(error)
                return compiled_forward(*args, **kwargs)  # the run's mode is now None: the eager decoder

        self.decoder.forward = forward

    def _refuse(self, error: CacheBudgetError) -> None:
        """Stop recording decodes: drop the record that did not fit, and run this decode and the next ones eager."""
        self.refused = str(error)
        self.cache.clear()
        self._recorded_input = None
        self.decoder.current_run.switch(None)
        warnings.warn(f"decoding densely from now on: the VAE decoder's record does not fit the memory budget "
                      f"({error})", stacklevel=2)

    def close(self) -> None:
        """Let go of the recorded decode (the next decode records again)."""
        self.cache.close()
        self._recorded_input = None

    @contextlib.contextmanager
    def steering(self, keep: bool = True) -> Iterator[None]:
        """Decodes inside record, or run sparse around the latents that changed since the recorded one; with
        `keep=False` they leave the record as it is (a sparse decode writes nothing back, a dense one runs eager)."""
        self.last = None
        self._keep = keep
        hooks = (self.decoder.register_forward_pre_hook(self._before, with_kwargs=True),
                 self.decoder.register_forward_hook(self._after, with_kwargs=True))
        try:
            with self.decoder.run(None, cache=self.cache):
                yield
        finally:
            for hook in hooks:
                hook.remove()

    def _before(self, module, args: tuple, kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        run = self.decoder.current_run
        recorded = self._recorded_input
        dense = RecordMode() if self._keep and self.refused is None else None  # None: the eager decoder
        if recorded is None or recorded.shape != sample.shape:
            run.switch(dense)
        else:
            changed = (sample != recorded.to(sample.device, sample.dtype)).any(dim=1).any(dim=0)
            run.switch(SparseMode(changed, write_back=self._keep))
            if run.plan.recomputed_pixels().all():
                run.switch(dense)
        if self._keep:  # the record changes: until this decode completes, no input is known to match it
            self._recorded_input = None
        if isinstance(run.mode, RecordMode):  # a new record replaces the old, which nothing reads meanwhile: let it
            self.cache.clear()  # go first (at 768² both at once would be 8.4 GiB)
        _synchronize(sample)
        self._started = time.perf_counter()

    def _after(self, module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> None:
        sample = args[0] if args else kwargs["sample"]
        _synchronize(output)
        seconds = time.perf_counter() - self._started
        run = self.decoder.current_run
        mode = run.mode
        if mode is None:
            self.last = DecodeStats("dense", seconds, 1.0)
            return
        if isinstance(mode, RecordMode):
            self.last = DecodeStats("record", seconds, 1.0)
        else:  # the output layer's active blocks, at the image's resolution
            region = run.plan.active_pixels(tuple(output.shape[-2:])).cpu()
            self.last = DecodeStats("sparse", seconds, region.float().mean().item(), region)
        if self._keep:
            self._recorded_input = sample.detach().clone()


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)
