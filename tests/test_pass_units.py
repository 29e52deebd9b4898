"""Each pass of the sparse pipeline on a small hand-built module (not a U-Net): it rewrites what it is for, and
its postcondition holds right after it; a pass that does nothing is caught by its postcondition."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fisedit_compiler as fisedit
from conftest import close
from fisedit_compiler.build import copy_graph_module
from fisedit_compiler.passes.pipelines import sparse_passes
from fisedit_compiler.capture import capture
from fisedit_compiler.passes.manager import PassError, PassManager

SIZE = 16


class SmallNet(nn.Module):
    """Every op family the sparse passes handle, at two sparse resolutions (16x16 and 8x8), and a cross-attention."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.time = nn.Linear(1, 8)
        self.norm = nn.GroupNorm(2, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.up = nn.Conv2d(8, 8, 3, padding=1)
        self.qkv = nn.Linear(8, 24)
        self.text_kv = nn.Linear(6, 16)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, sample, timestep, encoder_hidden_states, return_dict=True):
        b, _, h, w = sample.shape
        x = F.silu(self.norm(self.conv_in(sample)))
        d = self.down(x)  # reads the gather, GroupNorm and SiLU of its windows: a fusable chain
        x = x + self.time(timestep.float().reshape(1, 1).expand(b, 1))[:, :, None, None]  # per batch item
        upsampled = F.interpolate(d, scale_factor=2.0, mode="nearest")
        x = x + self.up(upsampled) + upsampled  # the upsample has a conv reader and a plain one
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, 8)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None]).squeeze(1)
        x = x + attended.reshape(b, h, w, 8).permute(0, 3, 1, 2)
        text_k, text_v = self.text_kv(encoder_hidden_states).chunk(2, dim=-1)  # cross-attention to the text
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, 8)
        attended = F.scaled_dot_product_attention(tokens[:, None], text_k[:, None], text_v[:, None]).squeeze(1)
        x = x + attended.reshape(b, h, w, 8).permute(0, 3, 1, 2)
        return (self.conv_out(x),)


POLICY = fisedit.Policy(block_size=4)
INPUTS = {"sample": torch.randn(2, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(1)),
          "timestep": torch.tensor(7),
          "encoder_hidden_states": torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(2))}


def _snapshots(passes):
    gm = capture(fisedit.UNet2DConditionAdapter(SmallNet()), dict(INPUTS))
    snapshots = {}
    def snapshot(record, g):
        snapshots[record.name] = (record, copy_graph_module(g))

    PassManager("sparse", passes, [snapshot])(gm)
    return snapshots


PASSES = sparse_passes(POLICY)


@pytest.mark.parametrize("index", range(len(PASSES)), ids=[p.name for p in PASSES])
def test_each_pass_rewrites_and_its_postcondition_holds(index):
    snapshots = _snapshots(PASSES[: index + 1])
    record, gm = snapshots[PASSES[index].name]
    assert record.rewrites > 0, f"{record.name} found nothing to do in a module made for it"
    if PASSES[index].postcondition is not None:
        assert PASSES[index].postcondition(gm) == []


@pytest.mark.parametrize("name", [p.name for p in PASSES if p.postcondition is not None])
def test_a_pass_that_does_nothing_breaks_its_postcondition(name):
    """Each postcondition can fail: with the pass replaced by a no-op, the manager raises, naming it (the
    annotation and region passes are required by the next ones, so the check is on the graph they leave)."""
    passes = [dataclasses.replace(p, run=lambda gm: 0) if p.name == name else p for p in PASSES]
    passes = passes[: [p.name for p in passes].index(name) + 1]
    with pytest.raises(PassError, match=f"pass '{name}' left its postcondition unmet"):
        _snapshots(passes)


@torch.no_grad()
def test_the_small_module_compiles_to_an_exact_sparse_variant():
    """End to end on the same module: a replay of the recorded input returns the recorded output for a partial
    mask, and with fresh statistics an all-true mask gives the dense call on new input."""
    model = SmallNet()
    fresh = dataclasses.replace(POLICY, norm_stats="fresh")
    for policy, mask, new in ((POLICY, INPUTS["sample"][0, 0] > 1.0, False),
                              (fresh, torch.ones(SIZE, SIZE, dtype=bool), True)):
        compiled = fisedit.compile(model, policy, adapter=fisedit.UNet2DConditionAdapter)
        with compiled.record():
            recorded = compiled(**INPUTS)[0]
        x = INPUTS["sample"] * 1.5 if new else INPUTS["sample"]
        with compiled.sparse(mask):
            out = compiled(x, INPUTS["timestep"], INPUTS["encoder_hidden_states"])[0]
        assert close(out, model(x, INPUTS["timestep"], INPUTS["encoder_hidden_states"])[0] if new else recorded)


def test_every_op_family_has_a_layout_rule():
    """Layout inference is a registry of rules by op family (`passes.ops`); an op outside every family has none."""
    from fisedit_compiler.passes import ops
    from fisedit_compiler.passes.annotate_spatial_layout import rule_for

    families = (ops.PER_PIXEL_DIM_ARG, ops.RESHAPES, ops.PERMUTES, ops.UNSQUEEZES, ops.UPSAMPLE_NEAREST,
                {ops.CONV, ops.GROUP_NORM, ops.SDPA, ops.GETITEM})
    assert all(rule_for(target) is not None for family in families for target in family)
    assert rule_for(torch.ops.aten.silu.default) is rule_for(torch.ops.aten.add.Tensor) is not None  # ELEMENTWISE
    assert rule_for(torch.ops.aten.mm.default) is None


def test_a_new_op_family_is_one_layout_rule():
    """A rule registered for an op gives its nodes their layout; a reason it returns becomes an `UnknownLayout`."""
    from fisedit_compiler.ir import LAYOUT, SpatialLayout
    from fisedit_compiler.passes.annotate_spatial_layout import (LAYOUT_RULES, UnknownLayout, infer_layout,
                                                                 layout_rule)

    def token_mixer(x, heads):
        """An op of a family no rule covers yet."""

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    x.meta[LAYOUT] = SpatialLayout("seq", (8, 8), (1,), (2, 64, 16))
    node = graph.call_function(token_mixer, (x, 4))
    assert infer_layout(node, (2, 64, 16)) == UnknownLayout(f"no layout rule for {token_mixer}", (8, 8))

    @layout_rule(token_mixer)
    def _tokens(node, first, inputs, shape):
        return dataclasses.replace(first, shape=shape) if first.kind == "seq" else "token_mixer expects tokens"

    try:
        assert infer_layout(node, (2, 64, 16)) == SpatialLayout("seq", (8, 8), (1,), (2, 64, 16))
        x.meta[LAYOUT] = SpatialLayout("map", (8, 8), (2, 3), (2, 16, 8, 8))
        assert infer_layout(node, (2, 16, 8, 8)) == UnknownLayout("token_mixer expects tokens", (8, 8))
        with pytest.raises(ValueError, match="has a layout rule"):
            layout_rule(token_mixer)(_tokens)
    finally:
        del LAYOUT_RULES[token_mixer]
