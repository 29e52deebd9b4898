"""The torch.compile backend "fisedit": registration, record and sparse calls through dynamo's graphs (identical to
`fisedit.compile`'s), graph breaks, recompiles, and errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
from torch import nn

import fisedit_compiler as fisedit
from conftest import ellipse_mask, run_pipeline
from sparse_reference import active_region
from fisedit_compiler.backend import fisedit_backend
from fisedit_compiler.models import random_pipeline

LATENT = 16


def test_backend_is_registered_on_import():
    assert torch._dynamo.lookup_backend("fisedit") is fisedit_backend


@pytest.mark.skipif(
    "fisedit" not in entry_points(group="torch_dynamo_backends").names,
    reason="the package is not pip-installed, so its entry point is not there (pip install -e .)",
)
def test_entry_point_finds_the_backend_without_importing_the_package():
    code = textwrap.dedent("""
        import sys, torch
        assert "fisedit_compiler" not in sys.modules
        backend = torch._dynamo.lookup_backend("fisedit")
        assert backend is sys.modules["fisedit_compiler.backend"].fisedit_backend
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def run(pipe, prompt, latents):
    return run_pipeline(pipe, prompt, latents, steps=2)


@pytest.mark.slow  # dynamo traces in a pipeline run: fifteen seconds
@torch.no_grad()
def test_pipeline_with_compiled_unet_matches_fisedit_compile():
    pipe = random_pipeline("sd2", latent_size=LATENT, seed=0)
    unet = pipe.unet
    policy = fisedit.Policy(block_size=4)
    compiled = torch.compile(unet, backend=fisedit.backend(policy))
    latents = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    mask = ellipse_mask(LATENT, 0.15)

    pipe.unet = compiled
    dynamo_forward = compiled.forward
    dense = run(pipe, "a cabin in the woods", latents)  # outside record()/sparse(): dynamo's graph as it is
    with fisedit.record(compiled) as session:
        source = run(pipe, "a cabin in the woods", latents)
    assert len(session.cache.steps) == 2 and session.cache.nbytes > 0
    with fisedit.sparse(compiled, mask) as session:
        edited = run(pipe, "a cabin in the woods with a river", latents)
        active = session.active_pixels()
    assert compiled.forward is dynamo_forward  # record() and sparse() route calls only while they last

    reference = fisedit.compile(unet, policy)
    pipe.unet = reference
    with reference.record():
        source_ref = run(pipe, "a cabin in the woods", latents)
    with reference.sparse(mask):
        edited_ref = run(pipe, "a cabin in the woods with a river", latents)
    assert torch.equal(source, source_ref) and torch.equal(edited, edited_ref)
    # record calls equal the eager U-Net, up to float rounding where their linear layers take oneDNN
    torch.testing.assert_close(source, dense, rtol=1e-4, atol=1e-4)
    assert torch.equal(active, active_region(mask, (LATENT, LATENT), policy.halo, 4, policy.halo_unit))
    assert torch.equal(edited[..., ~active], source[..., ~active])
    assert (edited - source).abs().max() > 1e-3


UNET_LIKE = fisedit.backend(adapter=fisedit.UNet2DConditionAdapter)  # TinyUNet is called like a U-Net


class TinyUNet(nn.Module):
    """Enough of a U-Net for the passes and `CompiledUNet.forward`'s call signature."""

    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)
        self.graph_break = graph_break

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        h = self.conv_in(sample) + timestep.float().reshape(-1, 1, 1, 1) / 1000
        if self.graph_break:
            torch._dynamo.graph_break()
        return (self.conv_out(nn.functional.silu(self.norm(h))) + sample,)


@torch.no_grad()
def test_graph_break_is_named():
    compiled = torch.compile(TinyUNet(graph_break=True), backend=UNET_LIKE)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor(10)
    dense = compiled(x, t, None)[0]  # dense calls run the pieces as they are
    with pytest.raises(fisedit.GraphBreakError, match=r"graph_break\(\).*test_backend\.py:\d+"):
        with fisedit.record(compiled):
            compiled(x, t, None)
    assert torch.equal(compiled(x, t, None)[0], dense)


@torch.no_grad()
def test_recompiles_for_new_shapes_and_dynamic_graphs():
    module = TinyUNet()
    compiled = torch.compile(module, backend=UNET_LIKE, dynamic=True)  # floats reach the graph as 0-d tensors
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[3:6, 4:9] = True
    for batch, size in ((2, 16), (1, 8), (1, 16)):
        x, t = torch.randn(batch, 4, size, size), torch.tensor(10)
        with fisedit.record(compiled) as session:
            recorded = compiled(x, t, None)[0]
        assert torch.allclose(recorded, module(x, t)[0], atol=1e-6) and session.cache.latent_shape == tuple(x.shape)
    with fisedit.sparse(compiled, mask) as session:
        replay = compiled(x, t, None)[0]
        active = session.active_pixels()
    assert torch.allclose(replay, recorded, atol=1e-5)
    assert torch.equal(replay[..., ~active], recorded[..., ~active])


def test_errors():
    module = TinyUNet()
    with pytest.raises(TypeError, match="backend='fisedit'"):
        with fisedit.record(module):
            pass
    with pytest.raises(TypeError, match="compiled with another backend"):
        with fisedit.record(torch.compile(module, backend="eager")):
            pass
    compiled = torch.compile(module, backend=UNET_LIKE)
    with pytest.raises(RuntimeError, match="needs a recorded source run"):
        with fisedit.sparse(compiled, torch.ones(8, 8, dtype=torch.bool)):
            pass
