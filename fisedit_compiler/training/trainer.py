"""Train the embedded shapes model on a CPU and save it as a Stable Diffusion pipeline folder.

    OMP_WAIT_POLICY=PASSIVE fisedit train-shapes --work-dir out/train-shapes     # the shipped model: 88 min, 2 cores
    OMP_WAIT_POLICY=PASSIVE fisedit train-shapes --work-dir out/sd --recipe sd-layout --unet-continue-steps 5600
    # the previously shipped model (SD 1/2's U-Net layout, float32): 4.8 h

(``OMP_WAIT_POLICY=PASSIVE``: torch's idle OpenMP threads otherwise spin; with another busy process on this 2-core
machine, a U-Net step was measured 4x slower without it.)

Phases, in order; an interrupted run started again with the same command continues where the last checkpoint
left it (``--work-dir`` holds everything):

1. ``vae``: the ``AutoencoderKL`` on 64x64 crops (each around an object) of freshly drawn scenes (it is fully
   convolutional, and a crop costs a quarter of a whole image), L1 + MSE reconstruction plus Stable Diffusion's
   small KL term, no GAN.
2. ``encode``: a fixed dataset of scenes is encoded once (the posterior means), so the U-Net phase never runs the
   encoder; the VAE's ``scaling_factor`` is set to 1 / the latents' standard deviation (unit-variance latents).
3. ``unet``: ``UNet2DConditionModel`` and ``CLIPTextModel`` together, DDPM epsilon-prediction loss with min-SNR
   weighting (gamma 5: it speeds up convergence), 10% empty captions for classifier-free guidance, AdamW, warm-up
   then cosine decay, an exponential moving average of both models' weights (that is what is shipped).
   (``decoder``: optional, the VAE decoder alone fine-tuned on whole scenes; the shipped recipe has none.)
4. ``export``: the pipeline folder (fp16 safetensors) and its model card ``README.md``.

Reproducible: every step draws its data and noise from generators seeded by (seed, phase, step), so no random
state has to be carried across an interruption; weights and optimizer states are checkpointed exactly (float32), so
a resumed run is bit-identical to an uninterrupted one.  Checkpoints are one safetensors file (tensors) whose
metadata is the JSON state (phase, step, optimizer hyper-parameters, seconds per phase): nothing is pickled, and
the file is replaced atomically, so an interruption while saving leaves the previous checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import environment
from ..models import make_scheduler
from .model_config import (
    LATENT_SIZE,
    TEXT_MAX_LENGTH,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    count_parameters,
    model_size,
)
from .shapes import IMAGE_SIZE, caption_for, render, render_scene, sample_spec

__all__ = ["DEFAULT_OUT", "TrainConfig", "train"]

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "assets" / "shapes"

CHECKPOINT = "checkpoint.safetensors"
LATENTS = "latents.safetensors"
LOSS_LOG = "loss_log.jsonl"
CONFIG = "config.json"
EXPORT = "export"
PHASES = ("vae", "encode", "unet", "decoder", "export", "done")

# Seeds of the per-step generators: (seed, stream, step or scene index).
_VAE_STREAM, _DATASET_STREAM, _UNET_STREAM, _DECODER_STREAM = 1, 2, 3, 4
# Seeds of the models' initialisation: seed * 16 + offset.
_INIT_OFFSET = {"vae": 1, "unet": 2, "text_encoder": 3}
# Fields that do not change the result, so a run may resume with other values.
_RUNTIME_FIELDS = ("checkpoint_minutes", "threads")
# Fields a finished or running work dir may raise: the U-Net or decoder phase then goes on from where it is.
_EXTENDABLE_FIELDS = ("unet_continue_steps", "decoder_steps")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines the trained model (and, in ``_RUNTIME_FIELDS``, how the run uses the machine)."""

    seed: int = 0
    tiny: bool = False
    unet_layout: str = "sd"  # a key of `model_config.UNET_LAYOUTS`
    # Matrix products and convolutions in bfloat16 under `torch.autocast` (weights, optimizer and losses stay
    # float32): 1.2x (U-Net) to 1.45x (VAE) faster steps on a CPU with AMX or AVX512-BF16; on others it is emulated.
    mixed_precision: bool = False
    vae_steps: int = 3_000
    vae_batch_size: int = 16
    vae_crop: int = 64
    vae_lr: float = 1e-3
    # Crops of scenes without objects: the decoder must turn an object-free latent map (an edit that removed the
    # object, the sky of a box edit) into background, not into noise over the whole frame.
    vae_empty_fraction: float = 0.0
    vae_mse_weight: float = 1.0  # reconstruction loss: L1 + this x MSE
    kl_weight: float = 1e-6  # Stable Diffusion's: KL summed over a latent / reconstruction summed over its image
    dataset_size: int = 20_000
    encode_batch_size: int = 32
    unet_steps: int = 2_800
    # More U-Net steps after the first `unet_steps`: a second warm-up and cosine decay from `continue_lr`, with fresh
    # optimizer moments (so a run continued after its export equals one configured with them from the start).
    unet_continue_steps: int = 0
    continue_lr: float = 2.5e-4
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    ema_decay: float = 0.998
    # Decoder fine-tuning after the U-Net phase: the VAE decoder alone (the encoder frozen, so the latent space the
    # U-Net learnt stays) on whole scenes, `decoder_empty_fraction` of them without objects. The VAE phase's crops
    # always hold an object, and its decoder turned a latent map without one (an edit that removed the object, the
    # sky of a box edit) into noise over the whole frame.
    decoder_steps: int = 1_500
    decoder_batch_size: int = 8
    decoder_lr: float = 2e-4
    decoder_empty_fraction: float = 0.25
    uncond_prob: float = 0.1
    snr_gamma: float = 5.0
    checkpoint_minutes: float = 5.0
    threads: int = 2

    @classmethod
    def preset(cls, tiny: bool = False, recipe: str = "shipped", **overrides) -> TrainConfig:
        """A recipe's settings (`RECIPES`), or the smoke test's tiny ones; ``overrides`` replace fields."""
        if recipe not in RECIPES:
            raise ValueError(f"unknown training recipe {recipe!r}; choose one of {sorted(RECIPES)}")
        base = cls(**RECIPES[recipe])
        if tiny:
            base = dataclasses.replace(base, tiny=True, vae_steps=3, vae_batch_size=2, dataset_size=6,
                                       encode_batch_size=4, unet_steps=4, batch_size=2, warmup_steps=2, ema_decay=0.9,
                                       decoder_steps=2 if base.decoder_steps else 0, decoder_batch_size=2, threads=1)
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


# Named recipes (fields that differ from the dataclass defaults). "shipped" (the default): what trained the shipped
# model in 88 min on the 2-core CPU (the budget: 90): bfloat16 autocast, object-free VAE crops instead of a
# decoder phase, 2000 VAE steps, SDXL's U-Net layout (no 1024-token self-attention: 0.74x the step time) and batch 64
# (0.85x the time per sample of batch 32), 3500 U-Net steps at lr 1e-3, so that the U-Net sees 224k samples.
# "sd-layout": the dataclass defaults, SD 1/2's layout in float32; with --unet-continue-steps 5600 it trained the
# previously shipped model (4.8 h; benchmarks/results/shapes-model-card_sd-layout-4.8h.md), which the shipped one
# beats on every figure of benchmarks/shapes_quality.py but the share of the latents its detected masks cover.
RECIPES: dict[str, dict] = {
    "shipped": {"mixed_precision": True, "vae_steps": 2_000, "vae_empty_fraction": 0.25, "unet_layout": "sdxl",
                "batch_size": 64, "unet_steps": 3_500, "lr": 1e-3, "decoder_steps": 0},
    "sd-layout": {},
}


def _step_rng(config: TrainConfig, stream: int, index: int) -> np.random.Generator:
    """The generator of one step (or one dataset scene): independent of every other step's."""
    return np.random.default_rng([config.seed, stream, index])


def _torch_generator(rng: np.random.Generator) -> torch.Generator:
    """A torch generator seeded from ``rng`` (for the step's noise)."""
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def _learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then cosine decay to a tenth of it at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _autocast(config: TrainConfig):
    """The phase's forward passes in bfloat16 where ``config.mixed_precision`` asks for it."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.mixed_precision)


def _posterior_float32(vae, images: torch.Tensor):
    """``vae``'s posterior of ``images`` in float32 (its encoder may have run under autocast)."""
    return DiagonalGaussianDistribution(vae.encode(images).latent_dist.parameters.float())


def _images_to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, H, W) float32 in [-1, 1] from (H, W, 3) uint8 images."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


# --------------------------------------------------------------------------- checkpoints


def _optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], list]:
    """The optimizer's per-parameter state as named tensors, and its parameter groups (JSON-able)."""
    state_dict = optimizer.state_dict()
    tensors = {f"{prefix}.{index}.{name}": value
               for index, entry in state_dict["state"].items() for name, value in entry.items()}
    return tensors, state_dict["param_groups"]


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str,
                    param_groups: list) -> None:
    """Restore what ``_optimizer_tensors`` saved."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1:].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{name}": value for name, value in tensors.items()}


def _unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name[len(prefix) + 1:]: value for name, value in tensors.items() if name.startswith(prefix + ".")}


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write ``tensors`` and JSON ``metadata`` to one safetensors file, replacing ``path`` atomically."""
    temporary = path.with_name(path.name + ".tmp")
    save_file({name: value.detach().contiguous() for name, value in tensors.items()}, str(temporary),
              metadata={"state": json.dumps(metadata)})
    os.replace(temporary, path)


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON metadata of a file written by ``_save_tensors``."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = json.loads(handle.metadata()["state"])
    return tensors, metadata


class _Run:
    """The state of one training run: work dir, checkpoint, loss log, timing and the stop rule of this session."""

    def __init__(self, config: TrainConfig, work_dir: Path, stop_after_steps: int | None, progress: bool):
        self.config = config
        self.work_dir = work_dir
        self.progress = progress
        self.stop_after_steps = stop_after_steps
        self.steps_this_session = 0
        self.size = model_size(config.tiny, config.unet_layout)
        checkpoint = work_dir / CHECKPOINT
        if checkpoint.is_file():
            self.tensors, self.state = _load_tensors(checkpoint)
            self._truncate_log()
            logger.info("resuming %s at phase %s, step %d", work_dir, self.state["phase"], self.state["step"])
        else:
            self.tensors = {}
            self.state = {"phase": "vae", "step": 0, "seconds": {}}
        self.clock = time.monotonic()
        self.last_checkpoint = self.clock

    def _truncate_log(self) -> None:
        """Drop log lines of steps after the checkpoint (an interrupted session ran them; they will run again)."""
        path = self.work_dir / LOSS_LOG
        if not path.is_file():
            return
        phase_index = PHASES.index(self.state["phase"])
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            entry = json.loads(line)
            entry_index = PHASES.index(entry["phase"])
            if entry_index < phase_index or (entry_index == phase_index and entry["step"] < self.state["step"]):
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log(self, **entry) -> None:
        """Append a line to the loss log, with the seconds the phase has run so far."""
        phase_seconds = self.state["seconds"].get(self.state["phase"], 0.0) + time.monotonic() - self.clock
        with open(self.work_dir / LOSS_LOG, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({**entry, "seconds": round(phase_seconds, 2)}) + "\n")

    def _account_time(self) -> None:
        now = time.monotonic()
        seconds = self.state["seconds"]
        seconds[self.state["phase"]] = seconds.get(self.state["phase"], 0.0) + now - self.clock
        self.clock = now

    def save(self, tensors: dict[str, torch.Tensor], **state_updates) -> None:
        """Checkpoint ``tensors`` with the state (the time spent so far is booked to the phase that ran)."""
        self._account_time()
        self.state.update(state_updates)
        _save_tensors(self.work_dir / CHECKPOINT, tensors, self.state)
        self.tensors = tensors
        self.last_checkpoint = time.monotonic()

    def step_finished(self) -> tuple[bool, bool]:
        """(checkpoint now, stop now) after a step: every ``checkpoint_minutes``, and when the session's steps are up."""
        self.steps_this_session += 1
        stop = self.stop_after_steps is not None and self.steps_this_session >= self.stop_after_steps
        due = time.monotonic() - self.last_checkpoint >= 60 * self.config.checkpoint_minutes
        return due or stop, stop

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, initial=self.state["step"], desc=desc, disable=not self.progress, dynamic_ncols=True)


# --------------------------------------------------------------------------- phases


def _vae_batch(config: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Generator]:
    """Crops of fresh scenes for VAE step ``step``, and the generator of its posterior noise.

    A crop contains the centre of one of its scene's objects: objects cover little of a scene, and with plain
    random crops the loss is mostly background, so object colours were learnt last (wrong hues after 600 steps).
    `vae_empty_fraction` of the crops come from scenes without objects instead.
    """
    rng = _step_rng(config, _VAE_STREAM, step)
    crops = []
    for _ in range(config.vae_batch_size):
        if config.vae_empty_fraction and rng.random() < config.vae_empty_fraction:  # no draw when 0: the
            # sd-layout recipe's crops stay the ones it was trained on
            image = render(dataclasses.replace(sample_spec(rng), objects=()))[0]
            y, x = rng.integers(0, IMAGE_SIZE - config.vae_crop + 1, size=2)
            crops.append(image[y: y + config.vae_crop, x: x + config.vae_crop])
            continue
        scene = render_scene(rng)
        y0, x0, y1, x1 = scene.objects[int(rng.integers(len(scene.objects)))].bbox
        centre = np.array([(y0 + y1) // 2, (x0 + x1) // 2])
        low = np.clip(centre - config.vae_crop + 1, 0, IMAGE_SIZE - config.vae_crop)
        high = np.clip(centre, 0, IMAGE_SIZE - config.vae_crop)
        y, x = rng.integers(low, high + 1)
        crops.append(scene.image[y: y + config.vae_crop, x: x + config.vae_crop])
    return _images_to_tensor(crops), _torch_generator(rng)


@torch.no_grad()
def _start_with_small_posterior_variance(vae) -> None:
    """Make the encoder's initial log-variance about -10 instead of about 0.

    With unit posterior noise at the start, the decoder first sees mostly noise and the encoder escapes it by
    inflating its means (the KL term is too weak to stop that); measured over 300 steps, starting from a small
    variance converges faster (L1 0.100 against 0.121) and keeps the latents bounded.
    """
    vae.quant_conv.weight[4:].mul_(0.01)
    vae.quant_conv.bias[4:].fill_(-10.0)


def _reconstruction_losses(reconstruction: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 and MSE of a VAE reconstruction (the VAE and decoder phases' loss is L1 + `vae_mse_weight` x MSE)."""
    return (reconstruction - images).abs().mean(), ((reconstruction - images) ** 2).mean()


def _train_vae(run: _Run) -> bool:
    """Phase 1; returns False when the session stopped before the phase ended."""
    config = run.config
    vae = build_vae(run.size, config.seed * 16 + _INIT_OFFSET["vae"])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    if run.state["step"] > 0:
        vae.load_state_dict(_unprefixed("vae", run.tensors))
        _load_optimizer(optimizer, run.tensors, "vae_optimizer", run.state["optimizer_param_groups"])
    else:
        _start_with_small_posterior_variance(vae)
    vae.train()
    with run.bar(config.vae_steps, "vae") as bar:
        for step in range(run.state["step"], config.vae_steps):
            images, noise_generator = _vae_batch(config, step)
            lr = _learning_rate(step, config.vae_steps, config.vae_lr, config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(config):
                posterior = _posterior_float32(vae, images)
                reconstruction = vae.decode(posterior.sample(generator=noise_generator)).sample.float()
            l1, mse = _reconstruction_losses(reconstruction, images)
            kl = posterior.kl().mean() / images[0].numel()
            loss = l1 + config.vae_mse_weight * mse + config.kl_weight * kl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log(phase="vae", step=step, loss=loss.item(), l1=l1.item(), mse=mse.item(), kl=kl.item(), lr=lr)
            bar.update(1)
            bar.set_postfix(l1=f"{l1.item():.4f}")
            save_now, stop = run.step_finished()
            if step + 1 == config.vae_steps:
                break
            if save_now:
                tensors, groups = _optimizer_tensors(optimizer, "vae_optimizer")
                run.save({**_prefixed("vae", vae.state_dict()), **tensors}, step=step + 1, optimizer_param_groups=groups)
            if stop:
                return False
    run.save(_prefixed("vae", vae.state_dict()), phase="encode", step=0, optimizer_param_groups=None)
    return _session_continues(run)


def _session_continues(run: _Run) -> bool:
    """Whether this session may run more steps (the stop rule counts steps, and a finished phase ends on one)."""
    return run.stop_after_steps is None or run.steps_this_session < run.stop_after_steps


def _load_vae(run: _Run):
    vae = build_vae(run.size, run.config.seed * 16 + _INIT_OFFSET["vae"])
    vae.load_state_dict(_unprefixed("vae", run.tensors))
    return vae.eval()


def _dataset_scene(config: TrainConfig, index: int):
    return render_scene(_step_rng(config, _DATASET_STREAM, index))


@torch.no_grad()
def _encode_dataset(run: _Run) -> None:
    """Phase 2: the latents (posterior means) of the dataset scenes, and the scaling factor."""
    config = run.config
    vae = _load_vae(run)
    latents = torch.empty(config.dataset_size, 4, LATENT_SIZE, LATENT_SIZE)
    with tqdm(total=config.dataset_size, desc="encode", disable=not run.progress, dynamic_ncols=True) as bar:
        for start in range(0, config.dataset_size, config.encode_batch_size):
            indices = range(start, min(start + config.encode_batch_size, config.dataset_size))
            images = _images_to_tensor([_dataset_scene(config, index).image for index in indices])
            latents[start: start + len(indices)] = vae.encode(images).latent_dist.mode()
            bar.update(len(indices))
    std, mean = latents.std().item(), latents.mean().item()
    _save_tensors(run.work_dir / LATENTS, {"latents": latents}, {"std": std, "mean": mean})
    run.save(run.tensors, phase="unet", step=0, scaling_factor=1.0 / std, latent_std=std, latent_mean=mean)


def _unet_batch(config: TrainConfig, step: int, specs: list, latents: torch.Tensor):
    """Latents, captions (10% empty), timesteps and noise of U-Net step ``step``."""
    rng = _step_rng(config, _UNET_STREAM, step)
    generator = _torch_generator(rng)
    indices = rng.integers(len(specs), size=config.batch_size)
    captions = ["" if rng.random() < config.uncond_prob else caption_for(specs[index], rng) for index in indices]
    timesteps = torch.randint(0, 1000, (config.batch_size,), generator=generator)
    noise = torch.randn(config.batch_size, 4, LATENT_SIZE, LATENT_SIZE, generator=generator)
    return latents[torch.from_numpy(indices)], captions, timesteps, noise


def _unet_total(config: TrainConfig) -> int:
    return config.unet_steps + config.unet_continue_steps


def _unet_learning_rate(config: TrainConfig, step: int) -> float:
    """The first `unet_steps` follow one warm-up and cosine decay; continued steps a second one from `continue_lr`."""
    if step < config.unet_steps:
        return _learning_rate(step, config.unet_steps, config.lr, config.warmup_steps)
    return _learning_rate(step - config.unet_steps, config.unet_continue_steps, config.continue_lr,
                          config.warmup_steps)


@dataclass
class _UNetTraining:
    """The U-Net phase's models, optimizer and exponential moving average of the weights."""

    tokenizer: object
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    parameters: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: dict[str, torch.Tensor]  # the averaged weights, "unet.<name>" / "text_encoder.<name>"
    ema_targets: dict[str, torch.Tensor]  # the live parameters they average, by the same keys

    def checkpoint(self, vae_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The phase's tensors to checkpoint (without the optimizer's), after the VAE's."""
        return {**vae_tensors, **_prefixed("unet", self.unet.state_dict()),
                **_prefixed("text_encoder", self.text_encoder.state_dict()), **_prefixed("ema", self.ema)}

    def update_ema(self, decay: float) -> None:
        with torch.no_grad():
            for key, target in self.ema_targets.items():
                self.ema[key].lerp_(target.detach(), 1 - decay)


def _start_unet_training(run: _Run) -> _UNetTraining:
    """The U-Net and text encoder, their optimizer and EMA: fresh, or as the checkpoint left them."""
    config = run.config
    tokenizer = build_tokenizer()
    unet = build_unet(run.size, config.seed * 16 + _INIT_OFFSET["unet"])
    text_encoder = build_text_encoder(run.size, tokenizer, config.seed * 16 + _INIT_OFFSET["text_encoder"])
    models = {"unet": unet, "text_encoder": text_encoder}
    parameters = [p for model in models.values() for p in model.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.01)
    if run.state["step"] > 0:
        for name, model in models.items():
            model.load_state_dict(_unprefixed(name, run.tensors))
        if run.state.get("optimizer_param_groups") is not None:  # else a continuation starts with fresh moments
            _load_optimizer(optimizer, run.tensors, "optimizer", run.state["optimizer_param_groups"])
        ema = _unprefixed("ema", run.tensors)
    else:
        ema = {f"{name}.{key}": value.detach().clone()
               for name, model in models.items() for key, value in model.named_parameters()}
    ema_targets = {f"{name}.{key}": value for name, model in models.items() for key, value in model.named_parameters()}
    return _UNetTraining(tokenizer, unet, text_encoder, parameters, optimizer, ema, ema_targets)


def _min_snr_loss_weights(config: TrainConfig) -> torch.Tensor:
    """Per timestep, the min-SNR-gamma weight of the epsilon-prediction loss."""
    alphas_cumprod = make_scheduler("ddim").alphas_cumprod
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return torch.clamp(snr, max=config.snr_gamma) / snr


def _unet_step(training: _UNetTraining, config: TrainConfig, step: int, batch, loss_weight: torch.Tensor,
               noise_scheduler) -> dict[str, float]:
    """One optimizer step of the U-Net and text encoder on `batch` (`_unet_batch`), then the EMA update; returns
    the values the loss log records."""
    clean, captions, timesteps, noise = batch
    lr = _unet_learning_rate(config, step)
    for group in training.optimizer.param_groups:
        group["lr"] = lr
    token_ids = training.tokenizer(captions, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                                   return_tensors="pt").input_ids
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    with _autocast(config):
        text = training.text_encoder(token_ids)[0]
        predicted = training.unet(noisy, timesteps, text).sample.float()
    per_sample = ((predicted - noise) ** 2).mean(dim=(1, 2, 3))
    loss = (loss_weight[timesteps] * per_sample).mean()
    training.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(training.parameters, 1.0)
    training.optimizer.step()
    training.update_ema(min(config.ema_decay, (1 + step) / (10 + step)))
    return {"loss": loss.item(), "mse": per_sample.mean().item(), "grad_norm": grad_norm.item(), "lr": lr}


def _train_unet(run: _Run) -> bool:
    """Phase 3; returns False when the session stopped before the phase ended."""
    config = run.config
    training = _start_unet_training(run)
    vae_tensors = {key: value for key, value in run.tensors.items() if key.startswith("vae.")}
    latents = _load_tensors(run.work_dir / LATENTS)[0]["latents"] * run.state["scaling_factor"]
    specs = [sample_spec(_step_rng(config, _DATASET_STREAM, index)) for index in range(config.dataset_size)]
    loss_weight = _min_snr_loss_weights(config)
    noise_scheduler = make_scheduler("ddim")
    training.unet.train()
    training.text_encoder.train()
    total = _unet_total(config)
    with run.bar(total, "unet") as bar:
        for step in range(run.state["step"], total):
            if step == config.unet_steps and step > 0:  # the continuation starts with fresh optimizer moments
                training.optimizer = torch.optim.AdamW(training.parameters, lr=config.continue_lr, weight_decay=0.01)
            batch = _unet_batch(config, step, specs, latents)
            logged = _unet_step(training, config, step, batch, loss_weight, noise_scheduler)
            run.log(phase="unet", step=step, **logged)
            bar.update(1)
            bar.set_postfix(loss=f"{logged['loss']:.4f}")
            save_now, stop = run.step_finished()
            if step + 1 == total:
                break
            if save_now:
                tensors, groups = _optimizer_tensors(training.optimizer, "optimizer")
                run.save({**training.checkpoint(vae_tensors), **tensors}, step=step + 1, optimizer_param_groups=groups)
            if stop:
                return False
    run.save(training.checkpoint(vae_tensors), phase="decoder", step=run.state.get("decoder_trained", 0),
             optimizer_param_groups=None, unet_trained=total)
    return _session_continues(run)


def _decoder_batch(config: TrainConfig, step: int) -> tuple[torch.Tensor, torch.Generator]:
    """Whole fresh scenes for decoder step ``step`` (`decoder_empty_fraction` of them without objects), and the
    generator of its posterior noise."""
    rng = _step_rng(config, _DECODER_STREAM, step)
    images = []
    for _ in range(config.decoder_batch_size):
        spec = sample_spec(rng)
        if rng.random() < config.decoder_empty_fraction:
            spec = dataclasses.replace(spec, objects=())
        images.append(render(spec)[0])
    return _images_to_tensor(images), _torch_generator(rng)


def _train_decoder(run: _Run) -> bool:
    """Phase 4 (when `decoder_steps` > 0); returns False when the session stopped before the phase ended."""
    config = run.config
    vae = _load_vae(run)
    others = {key: value for key, value in run.tensors.items()
              if not key.startswith("vae.") and not key.startswith("decoder_optimizer.")}
    parameters = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.decoder_lr, weight_decay=0.0)
    start = run.state.get("decoder_trained", 0)
    if run.state.get("optimizer_param_groups") is not None:
        _load_optimizer(optimizer, run.tensors, "decoder_optimizer", run.state["optimizer_param_groups"])
    vae.decoder.train()
    with run.bar(config.decoder_steps, "decoder") as bar:
        for step in range(run.state["step"], config.decoder_steps):
            images, noise_generator = _decoder_batch(config, step)
            lr = _learning_rate(step - start, config.decoder_steps - start, config.decoder_lr, config.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.no_grad(), _autocast(config):
                latents = _posterior_float32(vae, images).sample(generator=noise_generator)
            with _autocast(config):
                reconstruction = vae.decode(latents).sample.float()
            l1, mse = _reconstruction_losses(reconstruction, images)
            loss = l1 + config.vae_mse_weight * mse
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            run.log(phase="decoder", step=step, loss=loss.item(), l1=l1.item(), mse=mse.item(), lr=lr)
            bar.update(1)
            bar.set_postfix(l1=f"{l1.item():.4f}")
            save_now, stop = run.step_finished()
            if step + 1 == config.decoder_steps:
                break
            if save_now:
                tensors, groups = _optimizer_tensors(optimizer, "decoder_optimizer")
                run.save({**others, **_prefixed("vae", vae.state_dict()), **tensors}, step=step + 1,
                         optimizer_param_groups=groups)
            if stop:
                return False
    run.save({**others, **_prefixed("vae", vae.state_dict())}, phase="export", step=0, optimizer_param_groups=None,
             decoder_trained=max(config.decoder_steps, start))
    return _session_continues(run)


# --------------------------------------------------------------------------- export


def _final_losses(work_dir: Path, last: int = 50) -> dict[str, dict[str, float]]:
    """Per phase, the mean of each logged quantity over its last ``last`` steps (read back from the loss log)."""
    entries: dict[str, list[dict]] = {}
    for line in (work_dir / LOSS_LOG).read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        entries.setdefault(entry["phase"], []).append(entry)
    means = {}
    for phase, phase_entries in entries.items():
        tail = phase_entries[-last:]
        keys = [key for key in tail[0] if key not in ("phase", "step", "lr", "seconds")]
        means[phase] = {key: float(np.mean([entry[key] for entry in tail])) for key in keys}
        means[phase]["steps_averaged"] = len(tail)
    return means


def _folder_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _decoder_card_text(config: TrainConfig, minutes: dict[str, float], seconds: dict[str, float],
                       decoder_loss: dict[str, float]) -> tuple[str, str]:
    """The model card's decoder-phase row and the decoder's part of the final-losses row."""
    if not config.decoder_steps:
        return "none (the VAE phase's object-free crops teach the decoder backgrounds)", ""
    row = (f"{config.decoder_steps} steps, the VAE decoder alone (encoder frozen: the U-Net's latent space "
           f"is kept), batch {config.decoder_batch_size} whole {IMAGE_SIZE}x{IMAGE_SIZE} scenes of which "
           f"{config.decoder_empty_fraction:.0%} have no object, AdamW lr {config.decoder_lr} (warm-up and "
           f"cosine decay as above), L1 + {config.vae_mse_weight:g} x MSE, {minutes['decoder']:.1f} min "
           f"({seconds.get('decoder', 0.0) / config.decoder_steps:.2f} s/step)")
    losses = (f"; decoder L1 {decoder_loss.get('l1', float('nan')):.4f}, "
              f"MSE {decoder_loss.get('mse', float('nan')):.5f} (whole scenes)")
    return row, losses


def _card_intro(config: TrainConfig) -> str:
    """The model card's title and what the model is."""
    return f"""# fisedit shapes model{" (tiny smoke-test configuration)" if config.tiny else ""}

A small Stable Diffusion-family text-to-image model trained from scratch on procedurally generated scenes of
coloured shapes (`fisedit_compiler.training.shapes`): one to three objects (circle, square, triangle, cross; red,
green, blue, yellow, purple, orange, white, black; small or big) on a gray, white or black background, plain,
striped or checkered. Prompts follow the captions' grammar, e.g. "a red circle on a gray background", "a big red
circle and a small blue square", "a red circle, a blue square and a green triangle on a black striped background".
It exists so that the editing demo and semantic tests have a model whose pictures follow their prompts, without
downloading weights.

Load it with `fisedit_compiler.models.load_pipeline(path)`. The weights are stored in float16 and `load_pipeline`
loads them as float32 unless asked otherwise: pass `dtype=torch.float16` on a GPU. Default size 128x128 (latents {LATENT_SIZE}x{LATENT_SIZE}x4), DDIM scheduler.

"""


def _card_how_it_was_made(run: _Run, command: str) -> str:
    """The model card's table of the phases, with the measured times and final losses."""
    config, state = run.config, run.state
    losses = _final_losses(run.work_dir)
    seconds = state["seconds"]
    vae_loss, unet_loss = losses.get("vae", {}), losses.get("unet", {})
    minutes = {phase: seconds.get(phase, 0.0) / 60 for phase in ("vae", "encode", "unet", "decoder")}
    decoder_row, decoder_losses = _decoder_card_text(config, minutes, seconds, losses.get("decoder", {}))
    continued = (f" and {config.unet_continue_steps} continued steps (fresh AdamW moments, a second warm-up and cosine "
                 f"decay from lr {config.continue_lr})") if config.unet_continue_steps else ""
    return f"""## How it was made

Command: `{command}`

| | |
|---|---|
| seed | {config.seed} |
| VAE phase | {config.vae_steps} steps, batch {config.vae_batch_size} {config.vae_crop}x{config.vae_crop} crops of fresh scenes (each around an object; {config.vae_empty_fraction:.0%} from scenes without objects), AdamW lr {config.vae_lr} (warm-up {config.warmup_steps} steps, cosine decay to a tenth), L1 + {config.vae_mse_weight:g} x MSE + {config.kl_weight} x KL (Stable Diffusion's ratio), initial posterior log-variance -10, {minutes["vae"]:.1f} min ({seconds.get("vae", 0.0) / max(config.vae_steps, 1):.2f} s/step) |
| dataset | {config.dataset_size} scenes encoded once (posterior means), {minutes["encode"]:.1f} min; latent std {state["latent_std"]:.4f}, mean {state["latent_mean"]:.4f}: `scaling_factor` = {state["scaling_factor"]:.5f} |
| U-Net phase | {config.unet_steps} steps{continued}, batch {config.batch_size}, U-Net and text encoder together, AdamW lr {config.lr} (warm-up {config.warmup_steps} steps, cosine decay to a tenth), epsilon prediction, min-SNR-{config.snr_gamma:g} loss weights, {config.uncond_prob:.0%} empty captions (classifier-free guidance), EMA {config.ema_decay} of the weights (shipped), {minutes["unet"]:.1f} min ({seconds.get("unet", 0.0) / max(_unet_total(config), 1):.2f} s/step) |
| decoder phase | {decoder_row} |
| final losses (mean of the last {unet_loss.get("steps_averaged", 0)} steps) | VAE L1 {vae_loss.get("l1", float("nan")):.4f}, MSE {vae_loss.get("mse", float("nan")):.5f} (images in [-1, 1]); U-Net weighted loss {unet_loss.get("loss", float("nan")):.4f}, unweighted MSE {unet_loss.get("mse", float("nan")):.4f}{decoder_losses} |
| precision | {"bfloat16 autocast for the forward passes (float32 weights, optimizer states and losses)" if config.mixed_precision else "float32"} |
| machine | {config.threads} CPU threads, OMP_WAIT_POLICY={environment.current().omp_wait_policy or "unset"}; wall-clock {sum(minutes.values()):.1f} min for the training phases (summed over sessions) |

"""


def _card_architecture(run: _Run, parameters: dict[str, int], folder_bytes: int) -> str:
    """The model card's table of the components, and the saved size."""
    config, size = run.config, run.size
    return f"""## Architecture (diffusers / transformers classes)

| component | class | parameters |
|---|---|---:|
| vae | `AutoencoderKL`, blocks {size.vae_channels}, 1 layer per block, no mid-block attention | {parameters["vae"]:,} |
| text_encoder | `CLIPTextModel`, hidden {size.text_hidden}, {size.text_layers} layers, {size.text_heads} heads, context {TEXT_MAX_LENGTH} | {parameters["text_encoder"]:,} |
| unet | `UNet2DConditionModel`, SD block types in the {config.unet_layout!r} layout ({size.describe_unet_layout()}), channels {size.unet_channels}, {size.unet_layers_per_block} layer(s) per block, heads {size.unet_heads} | {parameters["unet"]:,} |
| tokenizer | `CLIPTokenizer`, byte-level BPE in which every grammar word is one token | |
| scheduler | `DDIMScheduler`, SD's schedule (scaled_linear 0.00085-0.012, 1000 steps, epsilon) | |

Saved size: {folder_bytes / 2**20:.1f} MiB (float16 safetensors).

"""


_CARD_WHY = """Why 32x32 latents (a VAE downsampling by 4, not SD's 8): the editing compiler's savings come from recomputing only
the blocks a mask covers, and a small object must span several latent cells for a mask to be much smaller than the
image; at 16x16 a small shape (18-26 px) would be 2-3 cells and the halo would cover most of the map. 32x32 is also
the smallest size at which SD's three resolution levels (32, 16, 8) keep a spatial map at the bottom.

Why the text encoder is trained jointly with the U-Net: a frozen random encoder gives each word a fixed random
direction, and the U-Net alone would have to learn which colour word belongs to which shape word; training the
encoder lets it build context-dependent embeddings ("red" next to "circle"), which binds attributes to objects
better in a small compute budget.

The tokenizer, the scenes and the training are in `fisedit_compiler/training/`; `fisedit train-shapes --help`.
"""


def _model_card(run: _Run, command: str, parameters: dict[str, int], folder_bytes: int) -> str:
    """The pipeline folder's README.md: how the model was made, with the measured numbers."""
    return (_card_intro(run.config) + _card_how_it_was_made(run, command)
            + _card_architecture(run, parameters, folder_bytes) + _CARD_WHY)


def _export(run: _Run, command: str) -> None:
    """Phase 4: the EMA weights as an fp16 ``StableDiffusionPipeline`` folder, with its model card, in the work dir."""
    config = run.config
    tokenizer = build_tokenizer()
    vae = _load_vae(run)
    vae.register_to_config(scaling_factor=run.state["scaling_factor"])
    unet = build_unet(run.size, config.seed * 16 + _INIT_OFFSET["unet"])
    text_encoder = build_text_encoder(run.size, tokenizer, config.seed * 16 + _INIT_OFFSET["text_encoder"])
    ema = _unprefixed("ema", run.tensors)
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        weights = model.state_dict()
        weights.update(_unprefixed(name, ema))
        model.load_state_dict(weights)
        model.eval()
    parameters = {"vae": count_parameters(vae), "text_encoder": count_parameters(text_encoder),
                  "unet": count_parameters(unet)}
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=make_scheduler("ddim"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    export_dir = run.work_dir / EXPORT
    if export_dir.exists():
        shutil.rmtree(export_dir)
    pipe.save_pretrained(export_dir, safe_serialization=True)
    run.save(run.tensors, phase="done", step=0)  # books the export time before the card reads it
    card = _model_card(run, command, parameters, _folder_bytes(export_dir))
    (export_dir / "README.md").write_text(card, encoding="utf-8")


def _install(export_dir: Path, out_dir: Path) -> None:
    """Copy the exported folder's entries into ``out_dir``, replacing same-named ones and leaving others alone."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for entry in export_dir.iterdir():
        target = out_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        if entry.is_dir():
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)


def _check_config(config: TrainConfig, work_dir: Path) -> None:
    """Record the config in a new work dir; in a used one, insist on the same settings (so the run can resume)."""
    path = work_dir / CONFIG
    current = dataclasses.asdict(config)
    if not path.is_file():
        path.write_text(json.dumps(current, indent=2), encoding="utf-8")
        return
    recorded = json.loads(path.read_text(encoding="utf-8"))
    defaults = dataclasses.asdict(TrainConfig())  # fields added since the work dir was made have their defaults
    different = [f"{key}: {recorded.get(key, defaults[key])!r} there, {value!r} now" for key, value in current.items()
                 if key not in _RUNTIME_FIELDS + _EXTENDABLE_FIELDS and recorded.get(key, defaults[key]) != value]
    shortened = [f"{key}: {recorded.get(key, defaults[key])} there, {current[key]} now" for key in _EXTENDABLE_FIELDS
                 if current[key] < recorded.get(key, defaults[key])]
    if different or shortened:
        raise ValueError(f"work dir {str(work_dir)!r} holds a run with other settings ({'; '.join(different + shortened)}"
                         "); resume it with the same settings (--unet-continue-steps may only grow) or use a new "
                         "--work-dir")
    if any(current[key] != recorded.get(key, defaults[key]) for key in _EXTENDABLE_FIELDS):
        path.write_text(json.dumps(current, indent=2), encoding="utf-8")


def train(
    config: TrainConfig,
    work_dir: str | Path,
    out_dir: str | Path = DEFAULT_OUT,
    command: str = "",
    stop_after_steps: int | None = None,
    progress: bool = True,
) -> Path | None:
    """Run (or resume) every phase and write the pipeline folder to ``out_dir``; returns it.

    ``command`` is recorded in the model card.  ``stop_after_steps``: end this session after that many training
    steps (VAE and U-Net steps together), with a checkpoint, as an interruption would, and return None; calling
    ``train`` again with the same config resumes.  ``progress``: tqdm bars.
    """
    work_dir, out_dir = Path(work_dir), Path(out_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    _check_config(config, work_dir)
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        run = _Run(config, work_dir, stop_after_steps, progress)
        if run.state["phase"] in ("export", "done") and run.state.get("unet_trained", config.unet_steps) < _unet_total(
                config):  # continue a finished U-Net phase (its end checkpoint has no optimizer moments: none needed)
            run.state.update(phase="unet", step=run.state.get("unet_trained", config.unet_steps),
                             optimizer_param_groups=None)
        if run.state["phase"] == "vae" and not _train_vae(run):
            return None
        if run.state["phase"] == "encode":
            _encode_dataset(run)
        if run.state["phase"] == "unet" and not _train_unet(run):
            return None
        if run.state["phase"] in ("export", "done") and run.state.get("decoder_trained", 0) < config.decoder_steps:
            run.state.update(phase="decoder", step=run.state.get("decoder_trained", 0), optimizer_param_groups=None)
        if run.state["phase"] == "decoder" and not _train_decoder(run):
            return None
        if run.state["phase"] == "export":
            _export(run, command)
    finally:
        torch.set_num_threads(caller_threads)
    _install(work_dir / EXPORT, out_dir)
    logger.info("wrote %s (%.1f MiB)", out_dir, _folder_bytes(out_dir) / 2**20)
    return out_dir
