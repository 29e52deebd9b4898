"""Shared fixtures: tiny random-weight U-Nets with the block types of SD 1.5, SD 2 and SDXL, and their inputs."""

from __future__ import annotations

import functools
import gc
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run through Triton's CPU interpreter where there is no GPU, so that a plain `pytest` runs the
    # same tests as `make test`. Set before anything imports triton: it reads the flag when kernels are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fisedit_compiler import environment  # noqa: E402
from fisedit_compiler.editing.masks import ellipse_mask as _ellipse_mask  # noqa: E402
from fisedit_compiler.models import example_unet_inputs, random_unet  # noqa: E402


@pytest.fixture(autouse=True)
def _reread_environment():
    """The package reads its environment variables once (`fisedit_compiler.environment`); a test that sets one calls
    `environment.reread()`. Autouse fixtures are torn down after `monkeypatch`, so this re-read sees the variables as
    they were before the test, and nothing the test set carries over to the next."""
    yield
    environment.reread()


@pytest.fixture(autouse=True)
def _unfreeze_garbage_collection():
    """A test that warms a service or runs the demo freezes the objects then alive out of the garbage collector's
    reach (`runtime.collector`), which only an application that owns its process should do: undone after it, so
    that the test process goes on collecting everything."""
    yield
    gc.unfreeze()


@functools.lru_cache(maxsize=None)
def tiny_unet(arch: str):
    return random_unet(arch, "tiny", seed=0)


# Keyword inputs for one U-Net call: latents, a timestep, text embeddings (and SDXL's added conditions).
unet_inputs = functools.partial(example_unet_inputs, text_len=7)
# A (size, size) bool ellipse covering about `fraction` of the map.
ellipse_mask = functools.partial(_ellipse_mask, center=(0.4, 0.6), grid_offset=0)


def run_pipeline(pipe, prompt: str, latents: torch.Tensor, steps: int) -> torch.Tensor:
    """The final latents of a CFG pipeline run from `latents` (cloned: pipelines scale them in place)."""
    size = latents.shape[-1]
    return pipe(prompt, latents=latents.clone(), num_inference_steps=steps, guidance_scale=7.5, output_type="latent",
                height=8 * size, width=8 * size).images


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    """Equal up to float rounding, relative to the output's scale."""
    return (a - b).abs().max().item() <= rtol * max(1.0, b.abs().max().item())


def backend_matches_compile(unet, inputs: dict, new: dict, mask: torch.Tensor, policy):
    """Assert that `torch.compile(unet, backend="fisedit")` records `inputs` as the eager U-Net computes them and
    replays `new` sparsely over `mask` as `fisedit.compile` does; returns the dynamo-compiled U-Net."""
    import fisedit_compiler as fisedit

    compiled = fisedit.compile(unet, policy)
    with compiled.record():
        compiled(**inputs)
    with compiled.sparse(mask):
        expected = compiled(**new).sample
    dynamo = torch.compile(unet, backend=fisedit.backend(policy))
    with fisedit.record(dynamo):
        assert close(dynamo(**inputs).sample, unet(**inputs).sample)
    with fisedit.sparse(dynamo, mask):
        assert close(dynamo(**new).sample, expected)
    return dynamo


@pytest.fixture(params=["sd15", "sd2", "sdxl"])
def arch(request) -> str:
    return request.param
