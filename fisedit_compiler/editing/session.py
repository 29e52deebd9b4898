"""`EditSession`: generate an image, then edit its prompt again and again, each edit recomputing only its region.

    session = fisedit.EditSession(pipe, policy=fisedit.Policy(), num_inference_steps=50, guidance_scale=7.5)
    src = session.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
    res = session.edit("a cabin in the woods with a river")            # mask detected automatically
    res2 = session.edit("a cabin in the woods with a river at night")  # continuous: builds on res
    res3 = session.edit("a red cabin in the woods", mask=user_mask)    # user mask, no detection

An edit without a mask runs its first k steps dense through the `control` variant (the source run's cross-attention
maps injected for shared tokens), detects the mask from the latents' drift, and runs the remaining steps through
the `sparse` variant. After every sparse step the latents outside the edit's mask are the source run's
(`z = m * z_edit + (1 - m) * z_source`, the paper's switch blend, repeated). A detected mask is blended as the
recomputed region (the mask dilated by the halo and rounded up to blocks: outside it the latents would be the
source's anyway for a source whose activations are all recorded). A user's mask is honoured exactly: the halo and
blocks around it are recomputed, as context for the pixels inside, but only the pixels of the mask itself take the
edit's latents.
Everything happens inside one call of the unchanged diffusers pipeline, steered from `callback_on_step_end`.

Continuous editing: an edit's run becomes the source of the next one. Its dense steps record into a fresh cache,
and its sparse steps write their active blocks back into the cache, so no new dense source run is needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any

import torch
from PIL import Image

from ..compiler import ControlMode, RecordMode, SparseMode, compile
from ..macs import MacCounter
from ..policy import Policy
from ..runtime.cache import RecordCache, return_free_heap
from ..runtime.mask_plan import flattened_kernel_bytes
from ..runtime.tiered_store import MemoryBudget, make_budget, make_store
from ..inputs import as_mask, check_prompt
from . import GUIDANCE_SCALE
from .companions import check_control_image, compile_companions, run_group
from .compositing import paste_outside
from .decoding import SparseDecoder
from .inpainting import inpaint_inputs, inversion_condition, is_inpainting
from .inversion import (
    crop_mask_like_image,
    ddim_inversion,
    flow_inversion,
    image_tensor,
    is_flow_matching,
    picture_size,
    require_variance_preserving,
)
from .mask_detection import detect_mask, difference_map
from .masks import centred_disk
from .pipelines import (
    Interrupted,
    control_inputs,
    control_model,
    denoiser,
    denoiser_name,
    has_ip_adapter,
    ip_adapter_inputs,
    latent_packing,
    reference_picture,
    step_callbacks,
)
from .schedule import EditSchedule
from .token_alignment import align_tokens, swaps_words_only, token_ids

# Schedulers whose step is a deterministic function of the model output and their own state.
DETERMINISTIC_SCHEDULERS = {
    "DDIMScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "PNDMScheduler",
    "EulerDiscreteScheduler", "LMSDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler",
    "DEISMultistepScheduler", "KDPM2DiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
}


@dataclasses.dataclass
class PhaseStats:
    """U-Net work in one phase of a run."""

    unet_calls: int = 0
    macs: int = 0
    seconds: float = 0.0


@dataclasses.dataclass
class EditResult:
    """A generated or edited image. `mask` is the (H, W) bool map of latent pixels that may differ from the source's:
    the user's mask, or the recomputed region for a detected one; every other latent pixel is the source's, bit for
    bit. `region` is the (H, W) map of latent pixels the sparse steps recomputed: the mask dilated by the policy's
    halo and rounded up to blocks (both None for `generate`). `detected`: for an edit without a user mask, the
    (H, W) mask detected from the latents' drift (thresholded and dilated by `Policy.mask_dilation`), before the
    halo and blocks make it the region; None otherwise (and in a session loaded with `EditSession.load`).
    `stats` has a `PhaseStats` per phase ("dense", "sparse") and the cache's bytes."""

    prompt: str
    images: list
    latents: torch.Tensor
    mask: torch.Tensor | None
    stats: dict[str, Any]
    region: torch.Tensor | None = None
    detected: torch.Tensor | None = None


@dataclasses.dataclass
class _Run:
    """What the next edit needs of the run it builds on."""

    prompt: str
    maps_prompt: str  # the prompt whose cross-attention maps the cache holds
    trajectory: list[torch.Tensor]  # latents after each step
    result: EditResult
    # What an edit's dense steps are compared with to detect its mask: the latents after each step of a control run
    # with this run's own prompt. For a generation, or an edit of one, that is its trajectory; for a loaded image,
    # whose trajectory is its inversion, a control run of the first steps made when it is loaded; for an edit of
    # that, its own dense steps, then its sparse steps blended with its source's reference.
    reference: list[torch.Tensor] | None = None
    picture: Any = None  # a loaded image's picture (cropped and resized), which edits may paste back

    @property
    def pixels(self):
        """The picture whose pixels `edit(..., paste_back=...)` keeps outside the mask."""
        return self.result.images[0] if self.picture is None else self.picture

    @property
    def detection_reference(self) -> list[torch.Tensor]:
        return self.trajectory if self.reference is None else self.reference


class _Meter:
    """Counts U-Net calls, MACs and seconds into the current phase, via forward hooks on the U-Net.

    A call's MACs depend only on its kind (graph variant), its mask and its input shapes, so they are counted (with
    `macs.MacCounter`, which slows the call it watches a little) on the first call of each and reused for the
    others, of this run and, through `macs` (a session's memo, kept across its runs), of later ones. The counted
    call's seconds are not the U-Net's: the phase gets the mean seconds of its uncounted calls of that kind instead
    (the counted call's own seconds only where it was the only one). On CUDA the clock is read after
    `torch.cuda.synchronize`, so that a call's seconds are its kernels', not their launches'.
    """

    def __init__(self, unet: torch.nn.Module, macs: dict[tuple, int] | None = None):
        self.phases: dict[str, PhaseStats] = {}
        self.phase = "dense"
        self._macs: dict[tuple, int] = {} if macs is None else macs
        self._timed: dict[tuple, list[float]] = {}  # (phase, kind) -> seconds of uncounted calls
        self._counted: dict[tuple, list[float]] = {}  # (phase, kind) -> seconds of counted calls
        self._counter: MacCounter | None = None
        self._kind: tuple = ()
        self._start = 0.0
        device = getattr(unet, "device", None)  # (once: a diffusers model's `device` walks its offloading hooks)
        self._cuda = device if isinstance(device, torch.device) and device.type == "cuda" else None
        self._handles = [unet.register_forward_pre_hook(self._before), unet.register_forward_hook(self._after)]

    @staticmethod
    def _call_kind(module, args) -> tuple:
        run = getattr(module, "current_run", None)
        kind = ("eager", "") if run is None else run.next_call_kind()
        return (*kind, *(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))

    def _synchronize(self) -> None:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)

    def _before(self, module, args):
        self._kind = self._call_kind(module, args)
        self._counter = None
        if self._kind not in self._macs:
            self._counter = MacCounter()
            self._counter.__enter__()
        self._synchronize()
        self._start = time.perf_counter()

    def _after(self, module, args, output):
        self._synchronize()
        seconds = time.perf_counter() - self._start
        key = (self.phase, self._kind)
        if self._counter is not None:
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)
            self._macs[self._kind] = counter.macs
            self._counted.setdefault(key, []).append(seconds)
        else:
            self._timed.setdefault(key, []).append(seconds)
        stats = self.phases.setdefault(self.phase, PhaseStats())
        stats.unet_calls += 1
        stats.macs += self._macs[self._kind]

    def close(self) -> dict[str, PhaseStats]:
        for handle in self._handles:
            handle.remove()
        if self._counter is not None:  # a counted call raised: its counter must not stay on for the process
            self._counter.__exit__(None, None, None)
            self._counter = None
        for key in self._counted.keys() | self._timed.keys():
            timed, counted = self._timed.get(key, []), self._counted.get(key, [])
            mean = sum(timed) / len(timed) if timed else None
            self.phases[key[0]].seconds += sum(timed) + sum(mean if mean is not None else s for s in counted)
        return self.phases


class _EditRun:
    """One edit run, driven through its `EditSchedule` from the pipeline's step callback. It owns what the phases
    share: the mask (given, or detected at the switch), the region the sparse steps recompute, the map its latents
    are blended with the source's by (`blend`: the user's mask, or the region of a detected one), the sparse mode,
    the latents after each step and the meter's phases."""

    def __init__(self, session: EditSession, source: _Run, schedule: EditSchedule, mask: torch.Tensor | None,
                 keep: bool):
        self.session, self.source, self.schedule, self.keep = session, source, schedule, keep
        self.mask, self.blend = mask, mask
        self.region: torch.Tensor | None = None
        self.sparse_mode: SparseMode | None = None
        self.alignment: torch.Tensor | None = None  # of the edited prompt's tokens to the maps' (control)
        self.refresh_mode = RecordMode()  # one mode for every refresh step: the meter counts a mode's MACs once
        self.trajectory: list[torch.Tensor] = []
        self.phases: dict[str, PhaseStats] = {}
        self._run = None
        self._meter: _Meter | None = None

    @property
    def new_maps(self) -> bool:
        """Whether this run recorded the maps of every step a later edit reads (none when the mask was empty)."""
        return self.region is not None and self.schedule.records_all_maps(bool(self.region.all()))

    def execute(self, prompt: str, inputs: dict[str, Any]) -> list:
        """Run the edit; its dense steps' records replace the cache's (if kept). Returns the pipeline's images."""
        session, schedule = self.session, self.schedule
        pending = RecordCache(session.cache.dtype, make_store(session.policy, session.memory_budget))
        self._meter = _Meter(session.unet, session.call_macs)
        try:
            with session._runs(None) as self._run:
                self.alignment = session._alignment(self.source.maps_prompt, prompt)
                if schedule.dense_steps == 0:  # sparse from the first step: the latents are the source's as they are
                    self._switch_to_sparse()
                    self._enter_phase(0)
                else:
                    self._run.switch(ControlMode(self.alignment, pending, hold_layout=schedule.hold_layout))
                images = session._call_pipeline(prompt, self.on_step_end, inputs=inputs, history=True,
                                                keep=self.keep)
            if self.region is not None and self.keep:
                replaced = {"keep_attention_maps": not self.new_maps, "maps_only": schedule.maps_only}
                session.cache.replace_steps(pending, **replaced)
                self._run.replace_steps(pending, **replaced)
        finally:
            self.phases = self._meter.close()
            pending.close()
            if self._run is not None:
                self._run.close()
            return_free_heap()  # the steps the edit replaced, freed after its run's end
        return images

    def on_step_end(self, pipe, i, t, kwargs):
        latents = self.session._unpack(kwargs["latents"])
        self.trajectory.append(latents.clone())
        if i + 1 == getattr(pipe, "num_timesteps", self.session.num_inference_steps):
            self._run.release_memory()  # the denoising is over: the decode reuses what the plan made for it
        if self.schedule.decides_mask_after(i) and not self._decide_mask(pipe):
            return {"latents": self.session._pack(self.source.trajectory[-1].clone())}
        if self.blend is None:  # a detected mask's control steps: their drift is what detects it
            return {}
        # Outside the mask every step keeps the source run's latents (a user's mask: from the first, held or not;
        # a detected one: from the switch on): the switch blend of the paper, and for continuous edits the source's
        # own switch, repeated exactly.
        latents = torch.where(self.blend.to(latents.device), latents, self.source.trajectory[i])
        self.trajectory[-1] = latents.clone()
        self._enter_phase(i + 1)
        return {"latents": self.session._pack(latents)}

    def _decide_mask(self, pipe) -> bool:
        """Decide the mask (detect it if not given) and switch to sparse calls; False if the mask is empty, in which
        case nothing would change and the run stops."""
        if self.mask is None:
            t1, t2 = self.schedule.detect
            diff = difference_map(self.source.detection_reference, self.trajectory, t1, t2)
            self.mask = detect_mask(diff, self.session.policy.mask_dilation)[0, 0]
            self.blend = None  # the recomputed region, once known
        if not self.mask.any():
            pipe._interrupt = True
            return False
        self._switch_to_sparse()
        return True

    def _switch_to_sparse(self) -> None:
        """Sparse calls over the mask; sets the region, the latent pixels they recompute: the mask dilated by the
        policy's halo and rounded up to the output layer's blocks."""
        run, schedule = self._run, self.schedule
        run.switch(SparseMode(self.mask, write_back=self.keep, token_alignment=self.alignment,
                              control_calls=schedule.controlled_sparse_steps()))
        self.region = run.plan.recomputed_pixels().cpu()
        if self.blend is None:
            self.blend = self.region
        if self.region.all():  # nothing left to reuse: the remaining steps run dense and record, exactly as a
            # source run would (cheaper than sparse calls that cover all), maps included
            run.switch(RecordMode(attention_maps=schedule.remaining_maps_steps(),
                                  maps_only=schedule.remaining_maps_only()) if self.keep else None)
        else:
            self.sparse_mode = run.mode
            self._meter.phase = "sparse"

    def _enter_phase(self, step: int) -> None:
        """Before `step` (after the switch): a refresh step runs dense and records, the others run sparse."""
        if self.sparse_mode is None:
            return
        if self.schedule.phase(step) == "refresh":
            self._run.switch(self.refresh_mode)
            self._meter.phase = "dense"
        else:
            self._run.switch(self.sparse_mode)
            self._meter.phase = "sparse"

    def reference(self) -> list[torch.Tensor] | None:
        """What the next edit detects against: for a source with its own reference (a loaded image's), the
        reference blended like the latents were."""
        if self.source.reference is None:
            return None
        blend = self.blend.to(self.trajectory[0].device)
        return [z if i < self.schedule.dense_steps else torch.where(blend, z, self.source.reference[i])
                for i, z in enumerate(self.trajectory[:len(self.source.reference)])]


class EditSession:
    """An editing session over a diffusers text-to-image pipeline (SD 1.x/2.x, SDXL, or any whose `__call__`
    takes `latents` and `callback_on_step_end`). The pipeline's U-Net is compiled with `policy` (a `CompiledUNet`
    is kept when `policy` is None or its own, else the model it wraps is compiled anew with `policy`).

    `noise_seed` makes a stochastic scheduler usable: every run draws its step noise from a generator seeded with
    it, so source and edit runs add the same noise.

    `sparse_decode` (default True): the VAE decoder is compiled in place too (`editing.decoding`), the current
    image's decode is recorded, and an edit's picture is decoded only around the latents that changed; outside that
    region (`res.stats["decode"].region`) it is the previous picture, bit for bit.

    Over an inpainting pipeline (`StableDiffusionInpaintPipeline`, a 9-channel U-Net) a session edits a loaded
    picture with user masks: the mask is the pipeline's mask input too (`editing.inpainting`).
    """

    def __init__(
        self,
        pipe,
        policy: Policy | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = GUIDANCE_SCALE,
        height: int | None = None,
        width: int | None = None,
        noise_seed: int | None = None,
        sparse_decode: bool = True,
        memory_budget: MemoryBudget | None = None,
    ):
        self.pipe = pipe
        self.inpainting = is_inpainting(pipe)
        # the denoiser (a U-Net, or SD3's transformer), compiled in place; a compiled one is kept, or recompiled for
        # another policy
        self.unet = compile(denoiser(pipe), policy)
        setattr(pipe, denoiser_name(pipe), self.unet)
        self.policy = self.unet.policy
        # The session's own record cache: sessions sharing a compiled U-Net (a server's requests) never share one.
        # One memory budget for every record the session holds: its cache, an edit run's pending records, the
        # decoder's record (`memory_budget`: one shared with other sessions, a server's).
        self.memory_budget = memory_budget if memory_budget is not None else make_budget(self.policy)
        self.cache = RecordCache(self.policy.storage_dtype, make_store(self.policy, self.memory_budget))
        # models the pipeline calls beside the denoiser at every step (a ControlNet), compiled and run in step with it
        self.companions = compile_companions(pipe, self.policy, self.memory_budget)
        # "ControlNet", "T2I-Adapter", FLUX Kontext's reference picture, or None: what `control_image` is for
        self.control_model = control_model(pipe)
        self._control_image = None  # the control image (or Kontext's reference picture), given to generate
        self._ip_adapter_image = None  # the image prompt of a pipeline with an IP-Adapter, given to generate
        # The VAE decoder, compiled too: an edit's image is decoded around the latents that changed.
        self.decoding = SparseDecoder(pipe.vae, self.policy, self.memory_budget) if sparse_decode else None
        if self.memory_budget is not None and self.memory_budget.bound is not None:
            models = [self.unet.unet, *([pipe.vae.decoder.unet] if sparse_decode else [])]
            self.memory_budget.bound.check_calls(max(map(flattened_kernel_bytes, models)),
                                                 "the convolution kernels an edit's sparse calls flatten")
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        # the default picture: the model's sample size (FLUX's config has none: its pipeline's default)
        sample_size = (getattr(self.unet.config, "sample_size", None) or pipe.default_sample_size) * pipe.vae_scale_factor
        self.height, self.width = height or sample_size, width or sample_size
        # the pipeline's latents from and to the latent maps the session keeps (FLUX packs them into tokens)
        self._pack, self._unpack = latent_packing(pipe, self.height, self.width)
        self.noise_seed = noise_seed
        name = type(pipe.scheduler).__name__
        stochastic = name not in DETERMINISTIC_SCHEDULERS or "sde" in str(
            getattr(pipe.scheduler.config, "algorithm_type", ""))
        if stochastic and noise_seed is None:
            raise ValueError(
                f"{name} adds random noise at every step, so an edit run could not reproduce the source run "
                "outside the mask: use a deterministic scheduler (DDIM, DPM-Solver++, PNDM, Euler, ...) or pass "
                "noise_seed= to make its noise reproducible"
            )
        self._source: _Run | None = None
        self._latents: torch.Tensor | None = None
        self._loaded_size: tuple[int, int] | None = None  # (w, h) of the picture given to load_image
        self.call_macs: dict[tuple, int] = {}  # MACs per kind of U-Net call, counted once (`_Meter`)

    # --- public API -------------------------------------------------------------------------------------------

    def generate(self, prompt: str, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, control_image: Any = None,
                 ip_adapter_image: Any = None) -> EditResult:
        """The source run: a dense generation whose activations (and first steps' cross-attention maps) are
        recorded. Starts a new session history. `control_image`: a ControlNet or T2I-Adapter pipeline's control image
        (a PIL image or what the pipeline's `image` takes), or the picture a FLUX Kontext pipeline edits by its prompt
        (an instruction; the picture is centre-cropped and resized to the session's size); `ip_adapter_image`: the
        image prompt of a pipeline with an IP-Adapter loaded (a picture, embedded by the pipeline's image encoder, or
        its embeddings: a tensor or a list, as `ip_adapter_image_embeds`). The edits of this history keep both."""
        token_ids(self.pipe.tokenizer, check_prompt(prompt))  # clear errors for a non-str or over-long prompt
        if self.inpainting:
            raise ValueError("an inpainting pipeline edits a picture it is given: call load_image(image, prompt), "
                             "then edit(prompt, mask=...)")
        if (self.control_model is not None) != (control_image is not None):
            raise ValueError(f"{type(self.pipe).__name__} " + (
                f"has a {self.control_model}: pass generate(prompt, control_image=...), the picture it follows"
                if self.control_model else "has no ControlNet or T2I-Adapter: control_image is for their pipelines"))
        self._check_ip_adapter_image(ip_adapter_image, "generate(prompt, ip_adapter_image=...)", required=True)
        self._control_image, self._ip_adapter_image = control_image, ip_adapter_image
        # masks the size of a picture Kontext edits are cropped like it (as a loaded picture's)
        self._loaded_size = picture_size(control_image) if self.edits_its_picture else None
        if latents is None:
            shape = (1, self.pipe.vae.config.latent_channels, self.height // self.pipe.vae_scale_factor,
                     self.width // self.pipe.vae_scale_factor)
            latents = torch.randn(shape, generator=generator, dtype=self.unet.dtype).to(self.unet.device)
        self._latents = latents
        self._clear_caches()
        self._source = None  # until this run completes: a run that fails leaves no source to edit
        maps = self.policy.maps_schedule(self.num_inference_steps)  # the steps whose maps control calls read
        trajectory: list[torch.Tensor] = []

        def on_step_end(pipe, i, t, kwargs):
            trajectory.append(self._unpack(kwargs["latents"]).clone())
            return {}

        maps_only = self.policy.recorded_activations_from(self.num_inference_steps)
        with self._runs(RecordMode(attention_maps=maps, maps_only=maps_only)):
            images, stats = self._run(prompt, on_step_end, self.inputs_for(None, None))
        result = EditResult(prompt, images, trajectory[-1], None, stats)
        self._source = _Run(prompt, prompt, trajectory, result)
        return result

    @torch.no_grad()
    def load_image(self, image: Any, prompt: str) -> EditResult:
        """Start a session history from a real picture described by `prompt`: an RGB PIL image or a float tensor in
        [0, 1], centre-cropped to the session's aspect ratio and resized to its size (`inversion.image_tensor`).

        The image is VAE-encoded and inverted with DDIM (`Policy.inversion_skip`: EEdit's step skipping), and the
        source run is recorded on the inversion trajectory: every step's latents are the inverted ones, so the
        cache holds activations of latents that reproduce the image, and an edit keeps them outside its mask (the
        final latents there are the encoded image's). The result's image is the VAE's reconstruction; its `stats`
        have the "inversion" and "dense" (recording) phases. Pipelines whose U-Net takes the text embedding alone
        (SD 1.x/2.x), with a variance-preserving scheduler making one U-Net call per step (DDIM, DPM-Solver++,
        UniPC), and rectified-flow pipelines (SD3, FLUX: `_invert_flow`). Over an inpainting pipeline the inversion
        and the source run see an empty mask and the whole picture."""
        check_prompt(prompt)
        token_ids(self.pipe.tokenizer, prompt)
        flow = is_flow_matching(self.pipe.scheduler)
        if not flow:
            require_variance_preserving(self.pipe.scheduler)
        if getattr(self.unet.config, "addition_embed_type", None) is not None:
            raise ValueError("load_image supports U-Nets conditioned on the text embedding alone (SD 1.x/2.x); this "
                             f"one also takes {self.unet.config.addition_embed_type!r} embeddings (SDXL-style)")
        if self.control_model and not self.edits_its_picture or has_ip_adapter(self.pipe):
            raise NotImplementedError(f"load_image over a pipeline with a {self.control_model or 'IP-Adapter'} is not "
                                      "supported yet")
        # FLUX Kontext: the photo is also the picture the pipeline reads beside the latents (its reference)
        self._control_image = image if self.edits_its_picture else None
        picture, inputs, inversion, phases = (self._invert_flow if flow else self._invert)(image, prompt)
        # The source run, recorded on the inversion trajectory (each step's latents replaced by the inverted ones).
        trajectory = inversion.latents[1:]
        self._latents = inversion.latents[0]
        self._loaded_size = picture_size(image)
        self._clear_caches()
        self._source = None  # until this run completes: a run that fails leaves no source to edit
        k, _, _ = self.policy.edit_schedule(self.num_inference_steps)

        def on_step_end(pipe, i, t, kwargs):
            return {"latents": self._pack(trajectory[i].clone())}

        maps_only = self.policy.recorded_activations_from(self.num_inference_steps)
        maps = self.policy.maps_schedule(self.num_inference_steps)
        with self._runs(RecordMode(attention_maps=maps, maps_only=maps_only)):
            images, stats = self._run(prompt, on_step_end, inputs)
        result = EditResult(prompt, images, trajectory[-1], None, {**phases, **stats})
        # What an edit's dense steps are compared with: a control run of the first k steps with the same prompt
        # (inpainting edits take user masks only: nothing to detect).
        reference = None if self.inpainting else self._control_steps(prompt, k)
        self._source = _Run(prompt, prompt, trajectory, result, reference=reference, picture=picture)
        return result

    def _encode(self, image: Any) -> tuple[Image.Image, torch.Tensor]:
        """`load_image`'s picture (cropped and resized) and its clean latents: the VAE's mean, shifted (SD3, FLUX)
        and scaled as the pipeline's latents are."""
        pixels = image_tensor(image, self.height, self.width).to(self.unet.device, self.pipe.vae.dtype)
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        clean = ((vae.encode(pixels).latent_dist.mean - shift) * vae.config.scaling_factor).to(self.unet.dtype)
        picture = Image.fromarray(((pixels[0].float().cpu().permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255)
                                  .to(torch.uint8).numpy())
        return picture, clean

    def _invert(self, image: Any, prompt: str) -> tuple[Image.Image, dict[str, Any], Any, dict[str, PhaseStats]]:
        """`load_image`'s picture (cropped and resized), pipeline inputs, DDIM inversion and its metered phase."""
        picture, clean = self._encode(image)
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(self.num_inference_steps, device=self.unet.device)
        timesteps = scheduler.timesteps.clone()
        if len(timesteps) != self.num_inference_steps:
            raise ValueError(f"load_image needs one U-Net call per step; the pipeline's {type(scheduler).__name__} "
                             f"makes {len(timesteps)} for {self.num_inference_steps} steps: use DDIM, DPM-Solver++ "
                             "or UniPC")
        text, _ = self.pipe.encode_prompt(prompt, self.unet.device, 1, False)
        inputs = self.inputs_for(picture, None)
        condition = inversion_condition(inputs, self.unet.dtype) if inputs else None
        meter = _Meter(self.unet, self.call_macs)
        meter.phase = "inversion"
        try:
            inversion = ddim_inversion(self.unet, scheduler, clean, text.to(self.unet.dtype), timesteps,
                                       self.policy.inversion_skip, condition)
        finally:
            phases = meter.close()
        return picture, inputs, inversion, phases

    def _invert_flow(self, image: Any, prompt: str) -> tuple[Image.Image, dict[str, Any], Any, dict[str, PhaseStats]]:
        """`_invert` for a rectified-flow pipeline (SD3, FLUX: `inversion.flow_inversion`). The schedule and the
        denoiser's conditioning are the pipeline's own: one step of it with `prompt` is run and its first call's
        inputs kept (the conditional half where it uses classifier-free guidance)."""
        picture, clean = self._encode(image)
        probed: dict[str, Any] = {}

        def keep_inputs(module, args, kwargs):
            if not probed:
                probed.update(kwargs)

        def first_step_only(pipe, i, t, kwargs):
            pipe._interrupt = True
            return {}

        self._latents = torch.zeros_like(clean)
        handle = self.unet.register_forward_pre_hook(keep_inputs, with_kwargs=True)
        try:
            self._call_pipeline(prompt, first_step_only, output_type="latent")
        finally:
            handle.remove()
        name = self.unet.adapter.latents
        packed, probe = self._pack(clean), probed[name]
        # tokens the pipeline appends to the latents' (FLUX Kontext's picture), kept as they are through the inversion
        appended = probe[-1:, packed.shape[1]:] if probe.shape[1:] != packed.shape[1:] else None
        batch = probe.shape[0]
        conditioning = {k: v[-1:] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch > 1 else v
                        for k, v in probed.items() if k not in (name, "return_dict")}
        meter = _Meter(self.unet, self.call_macs)
        meter.phase = "inversion"
        try:
            inversion = flow_inversion(self.unet, conditioning, name, packed, self.pipe.scheduler.sigmas.to(
                clean.device), self.policy.inversion_skip, appended)
        finally:
            phases = meter.close()
        inversion.latents = [self._unpack(z) for z in inversion.latents]
        return picture, self.inputs_for(picture, None), inversion, phases

    def edit(self, prompt: str, mask: Any = None, paste_back: int | None = None, keep: bool = True,
             control_image: Any = None, ip_adapter_image: Any = None) -> EditResult:
        """Edit the current image (the last generation or edit) to `prompt`. Without `mask`, the affected region is
        detected; with one, that region is recomputed: a bool or 0/1 tensor or NumPy array at latent resolution
        (H, W), or a PIL image at latent or image resolution (white = edit; after `load_image`, also the size of
        the picture given, cropped and resized like it); see `inputs.as_mask`. Outside the mask the latents stay
        the source's, bit for bit. `paste_back` (feather pixels): after decoding, the pixels outside the mask are
        the current picture's (for a loaded image the picture itself, not the VAE's reconstruction), fading into
        the edit over that many pixels inside it (`compositing.paste_outside`). `keep=False`: the edit does not
        become the current image (its sparse steps write nothing back, its dense steps are not kept, its decode is
        not recorded), so that the next edit starts from the same image again: several tries at one picture. A
        mask of another type, shape or values raises `MaskError`, a prompt that is not a str a TypeError.
        `control_image` (a ControlNet or T2I-Adapter pipeline, with a user's `mask`): a new control image that differs
        from the source's only inside the mask (a ValueError otherwise); kept for later edits with the edit.
        `ip_adapter_image` (a pipeline with an IP-Adapter): a new image prompt, which acts inside the mask like a new
        text prompt; kept for later edits with the edit."""
        self._check_edit(prompt, paste_back, keep)
        source = self._source
        if mask is None and self.inpainting:
            raise ValueError("an inpainting pipeline repaints the mask it is given: pass edit(prompt, mask=...)")
        if mask is not None:
            h, w = self._latents.shape[-2:]
            mask = crop_mask_like_image(mask, self._loaded_size, self.width, self.height)
            mask = as_mask(mask, (h, w), scale_factor=self.pipe.vae_scale_factor).reshape(h, w)
        # A word swap holds the source's layout for its first steps (they run dense, under control): objects stay
        # where they were and take the new words. Inserted or deleted words may move things, so they never do.
        # (Not over an inpainting pipeline: it repaints its mask, which its source run saw empty.)
        swaps = not self.inpainting and swaps_words_only(self.pipe.tokenizer, source.maps_prompt, prompt)
        schedule = EditSchedule.plan(self.policy, self.num_inference_steps, mask is not None, swaps)
        inputs = self.inputs_for(source.pixels, mask)
        if control_image is not None:
            if not self.control_model or mask is None:
                raise ValueError("edit(control_image=...) " + ("needs the user's mask it changes the control image "
                                 "inside" if self.control_model else "is for ControlNet and T2I-Adapter pipelines"))
            check_control_image(self._control_image, control_image, mask)
            inputs.update(control_inputs(self.pipe, control_image, self.height, self.width))
        if ip_adapter_image is not None:
            self._check_ip_adapter_image(ip_adapter_image, "edit(prompt, ip_adapter_image=...)")
            inputs.update(ip_adapter_inputs(ip_adapter_image))
        edit = _EditRun(self, source, schedule, mask, keep)
        images = edit.execute(prompt, inputs)
        detected = edit.mask if mask is None else None
        stats = {**edit.phases, "cache_bytes": self.cache.nbytes, **self._decode_stats()}
        if edit.region is None:  # empty mask: the source is unchanged, and stays the session's current run
            return EditResult(prompt, source.result.images, source.result.latents, edit.mask, stats,
                              detected=detected)
        if paste_back is not None:
            images = [paste_outside(images[0], source.pixels, edit.blend, paste_back), *images[1:]]
        result = EditResult(prompt, images, edit.trajectory[-1], edit.blend, stats, region=edit.region,
                            detected=detected)
        if keep:
            self._source = _Run(prompt, prompt if edit.new_maps else source.maps_prompt, edit.trajectory, result,
                                edit.reference())
            if control_image is not None:
                self._control_image = control_image
            if ip_adapter_image is not None:
                self._ip_adapter_image = ip_adapter_image
        return result

    def _check_ip_adapter_image(self, image: Any, call: str, required: bool = False) -> None:
        """An image prompt is given where the pipeline has an IP-Adapter loaded (always, if `required`)."""
        loaded = has_ip_adapter(self.pipe)
        if image is not None and not loaded:
            raise ValueError(f"{call}: {type(self.pipe).__name__} has no IP-Adapter loaded (pipe.load_ip_adapter)")
        if required and loaded and image is None:
            raise ValueError(f"{type(self.pipe).__name__} has an IP-Adapter loaded: pass {call}, the image prompt "
                             "(a picture, or its embeddings)")

    def _check_edit(self, prompt: str, paste_back: int | None, keep: bool) -> None:
        """Refuse an edit's arguments before anything runs."""
        if paste_back is not None and (isinstance(paste_back, bool) or not isinstance(paste_back, int)
                                       or paste_back < 0):
            raise ValueError(f"paste_back is a feather width in pixels (an int >= 0) or None, got {paste_back!r}")
        check_prompt(prompt)
        if not keep and self.policy.refresh_every is not None:
            raise ValueError("edit(keep=False) cannot refresh (Policy.refresh_every): a refresh step records into "
                             "the session's cache, which such an edit leaves as it is")
        if self._source is None:
            raise RuntimeError("edit() needs a source image: call generate(prompt) or load_image(image, prompt) first")
        token_ids(self.pipe.tokenizer, prompt)

    def save(self, path) -> Any:
        """Write this session (its current image's run and record cache, prompts, policy, scheduler, and a
        fingerprint of the U-Net) to the folder `path`, as safetensors files and a JSON manifest
        (`editing.persistence`). `EditSession.load(path, pipe)` continues it."""
        from .persistence import save_session

        if (self.control_model and not self.edits_its_picture) or self._ip_adapter_image is not None:
            kind, what = (f"a {self.control_model}", "control image (and a ControlNet's records)") \
                if self.control_model else ("an IP-Adapter", "image prompt")
            raise NotImplementedError(f"saving a session whose pipeline has {kind} is not supported yet: its {what} "
                                      "would not be saved")
        return save_session(self, path)

    @classmethod
    def load(cls, path, pipe, memory_budget: MemoryBudget | None = None) -> EditSession:
        """The session saved in `path`, over `pipe` (the same U-Net weights, scheduler and latent size, checked:
        a mismatch or a damaged file raises `editing.persistence.SessionFileError`, naming it). `memory_budget`:
        one shared with other sessions (a service's), else one made from the saved policy."""
        from .persistence import SessionFileError, read_session

        saved = read_session(path, pipe, memory_budget)
        session = cls(pipe, policy=saved.policy, num_inference_steps=saved.num_inference_steps,
                      guidance_scale=saved.guidance_scale, height=saved.height, width=saved.width,
                      noise_seed=saved.noise_seed,  # a U-Net compiled with another policy is compiled anew
                      memory_budget=getattr(saved.cache.store, "budget", None))
        session.cache.close()
        session.cache = saved.cache
        session._latents = saved.initial_latents.to(session.unet.device, session.unet.dtype)
        trajectory = [z.to(session._latents.device) for z in saved.trajectory]
        result = EditResult(saved.prompt, [saved.image], trajectory[-1], saved.mask,
                            {"cache_bytes": saved.cache.nbytes}, region=saved.region)
        reference = [z.to(session._latents.device) for z in saved.reference] if saved.reference else None
        session._source = _Run(saved.prompt, saved.maps_prompt, trajectory, result, reference=reference)
        session._loaded_size = saved.loaded_size
        if (saved.picture is not None) != session.edits_its_picture:
            saved_over = "one that edits" if saved.picture is not None else "one that does not edit"
            raise SessionFileError(f"{path} was saved over a pipeline {saved_over} a picture it is given (FLUX "
                                   f"Kontext); {type(pipe).__name__} is not such a pipeline: load it over the kind "
                                   "it was saved with")
        session._control_image = saved.picture
        return session

    def close(self) -> None:
        """Let go of what the session recorded: its records in memory and its spill folders on disk (also done when
        the session is garbage-collected). Saved sessions (`save`) are not touched. The session can start again with
        `generate` or `load_image`."""
        self.cache.close()
        for companion in self.companions:
            companion.cache.close()
        if self.decoding is not None:
            self.decoding.close()
        self._source = None
        return_free_heap()  # what the records held goes back to the system, not only to this process's heap

    def __enter__(self) -> EditSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def memory_breakdown(self) -> dict[str, int]:
        """Bytes the session holds, by kind: the record cache's kinds (`RecordCache.breakdown`, summed over steps),
        "latents" (the current run's latents after every step, which edits blend with) and "decode" (the recorded
        decode of the current image, with `sparse_decode`)."""
        totals = dict(self.cache.breakdown()["total"])
        for companion in self.companions:  # a ControlNet's records
            totals[companion.name] = companion.cache.nbytes
        trajectory = self._source.trajectory if self._source is not None else []
        totals["latents"] = sum(z.numel() * z.element_size() for z in trajectory)
        if self.decoding is not None:
            totals["decode"] = self.decoding.cache.nbytes
        return totals

    def prepare_edits(self, fraction: float = 0.15) -> None:
        """Bind now the programs an edit's first calls would bind (`Executor.prepare`): the U-Net's control
        programs, and the sparse programs of the U-Net and the decoder for a centred disk covering `fraction` of
        the latents (masks of the same plan structure run them; others bind their own). For an application to
        call while nothing waits (the user looking at the source); an edit does the same when it is not done."""
        if self._source is None:
            raise RuntimeError("no image yet: call generate(prompt) or load_image(image, prompt) first")
        disk = centred_disk(tuple(self.cache.latent_shape[-2:]), fraction)
        self.unet.executor.prepare(disk)
        if self.decoding is not None:
            self.decoding.decoder.executor.prepare(disk, control=False)

    @property
    def current(self) -> EditResult:
        """The current image: the result of the last generation or edit."""
        if self._source is None:
            raise RuntimeError("no image yet: call generate(prompt) first")
        return self._source.result

    @property
    def edits_its_picture(self) -> bool:
        """Whether the pipeline edits a picture it is given by an instruction (FLUX Kontext's `image`, which
        `generate` takes as `control_image`)."""
        return reference_picture(self.pipe) is not None

    @property
    def picture(self):
        """The picture the next edit is made on, and pastes back from: the current image, or for a loaded image
        not yet edited the picture given (cropped and resized)."""
        if self._source is None:
            raise RuntimeError("no image yet: call generate(prompt) or load_image(image, prompt) first")
        return self._source.pixels

    def inputs_for(self, picture, mask: torch.Tensor | None) -> dict[str, Any]:
        """The pipeline's keyword inputs besides the prompt and latents for a run over `picture` with `mask`: an
        inpainting pipeline's picture and mask (`editing.inpainting.inpaint_inputs`), and `image_inputs`."""
        inputs = inpaint_inputs(self.pipe, picture, mask) if self.inpainting else {}
        return {**inputs, **self.image_inputs()}

    def image_inputs(self) -> dict[str, Any]:
        """The pipeline's keyword inputs of the pictures a run follows: a ControlNet or T2I-Adapter pipeline's
        control image or FLUX Kontext's picture (the source's, given to `generate`), an IP-Adapter's image prompt."""
        inputs: dict[str, Any] = {}
        if self._control_image is not None:
            inputs.update(control_inputs(self.pipe, self._control_image, self.height, self.width))
        if self._ip_adapter_image is not None:
            inputs.update(ip_adapter_inputs(self._ip_adapter_image))
        return inputs

    @property
    def source_trajectory(self) -> list[torch.Tensor]:
        """The latents after each denoising step of the current image's run (the last generation or edit)."""
        if self._source is None:
            raise RuntimeError("no run yet: call generate(prompt) first")
        return list(self._source.trajectory)

    # --- internals --------------------------------------------------------------------------------------------

    def _clear_caches(self) -> None:
        self.cache.clear()
        for companion in self.companions:
            companion.cache.clear()

    def _runs(self, mode):
        """A run of the denoiser over the session's cache in `mode`, with its companions' (`editing.companions`)."""
        return run_group(self.unet, self.cache, self.companions, mode)

    def _control_steps(self, prompt: str, steps: int) -> list[torch.Tensor]:
        """The latents after each of the first `steps` steps of a control run of `prompt` with the cache's maps of
        that same prompt, from the session's initial latents; nothing is recorded."""
        latents: list[torch.Tensor] = []

        def on_step_end(pipe, i, t, kwargs):
            latents.append(self._unpack(kwargs["latents"]).clone())
            if len(latents) == steps:
                pipe._interrupt = True
            return {}

        discarded = RecordCache(self.cache.dtype, make_store(self.policy, self.memory_budget))
        try:
            with self._runs(ControlMode(self._alignment(prompt, prompt), discarded)) as group:
                self._call_pipeline(prompt, on_step_end, output_type="latent")
            group.close()
        finally:
            discarded.close()
        return latents

    def _alignment(self, source_prompt: str, prompt: str) -> torch.Tensor:
        """(batch, tokens) alignment for the U-Net batch: the unconditional half (CFG) has the same, empty
        prompt in both runs, so all its tokens are shared."""
        conditional = align_tokens(self.pipe.tokenizer, source_prompt, prompt)
        if self.guidance_scale > 1:
            return torch.stack([torch.arange(conditional.numel()), conditional])
        return conditional[None]

    def _call_pipeline(self, prompt: str, on_step_end, output_type: str = "pil",
                       inputs: dict[str, Any] | None = None, history: bool = False, keep: bool = True) -> list:
        """One run of the pipeline from the session's initial latents; `inputs`: more keyword inputs (an
        inpainting pipeline's picture and mask). `history`: the run makes the session's next current image
        (generate, load_image, edit), so its decode goes through the recorded decode of the current one and
        replaces it (unless not `keep`: an edit that does not become the current image); other runs (a comparison, a
        probe) decode with the eager decoder."""
        generator = torch.Generator().manual_seed(self.noise_seed) if self.noise_seed is not None else None
        inputs = inputs if inputs is not None else self.image_inputs()  # a probe's or a comparison's: the pictures
        decoding = history and self.decoding is not None and output_type != "latent"
        try:
            with self.decoding.steering(keep) if decoding else contextlib.nullcontext():
                output = self.pipe(
                    prompt=prompt, latents=self._pack(self._latents.clone()),
                    num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                    height=self.height, width=self.width, generator=generator,
                    output_type=output_type, **step_callbacks(self.pipe, on_step_end), **inputs,
                )
        except Interrupted:  # a legacy pipeline stopped by a step: what the step kept is all there is
            return []
        return output.images

    def _decode_stats(self) -> dict[str, Any]:
        """{"decode": the last decode's `DecodeStats`} when the decoder is compiled and the run decoded."""
        last = self.decoding.last if self.decoding is not None else None
        return {} if last is None else {"decode": last}

    def _run(self, prompt: str, on_step_end, inputs: dict[str, Any] | None = None) -> tuple[list, dict[str, Any]]:
        meter = _Meter(self.unet, self.call_macs)
        try:
            images = self._call_pipeline(prompt, on_step_end, inputs=inputs, history=True)
        finally:
            phases = meter.close()
        return images, {**phases, "cache_bytes": self.cache.nbytes, **self._decode_stats()}
