"""The MACs of a sparse call fall with the mask (counted with `macs.MacCounter`, attention included), and the
counter finds what PyTorch's `FlopCounterMode` finds."""

from __future__ import annotations

import torch

import fisedit_compiler as fisedit
from conftest import ellipse_mask, tiny_unet, unet_inputs
from torch.utils import flop_counter

from fisedit_compiler.macs import MacCounter, count_macs, node_macs


def test_attention_is_counted_on_cpu():
    q = torch.randn(1, 2, 64, 16)
    macs, _ = count_macs(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert macs == 2 * 2 * 64 * 64 * 16


def test_node_macs_splits_a_call_s_macs_over_the_graph_s_nodes():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 5, 3, padding=1)
            self.linear = torch.nn.Linear(5, 7)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.linear(y.flatten(2).transpose(1, 2))

    gm = torch.fx.symbolic_trace(Block())
    x = torch.randn(2, 3, 6, 6)
    per_node = node_macs(gm, x)
    assert per_node == {"conv": 2 * 36 * 5 * 3 * 9, "relu": 0, "flatten": 0, "transpose": 0, "linear": 2 * 36 * 5 * 7}
    assert sum(per_node.values()) == count_macs(gm, x)[0]


@torch.no_grad()
def test_sparse_macs_fall_with_the_mask():
    unet = tiny_unet("sd2")  # SD 2 block types, small channels
    size = 48
    compiled = fisedit.compile(unet)  # default policy
    inputs = unet_inputs(unet, size=size)
    with compiled.record():
        compiled(**inputs)
    dense, _ = count_macs(unet, **inputs)
    ratios = []
    full = torch.ones(size, size, dtype=torch.bool)
    for mask in [ellipse_mask(size, fraction) for fraction in (0.05, 0.15, 0.3)] + [full]:
        with compiled.sparse(mask):
            sparse, _ = count_macs(compiled, **inputs)
        ratios.append(sparse / dense)
    assert ratios[0] <= 0.5, ratios
    assert ratios == sorted(ratios), ratios
    assert 0.95 <= ratios[-1] <= 1.3, ratios  # a full mask costs about a dense call (halos add a little)


@torch.no_grad()
def test_the_counter_finds_what_flop_counter_mode_finds_in_every_kind_of_call():
    """Dense, record, sparse and control calls of a tiny SD 2 U-Net (convolutions, linear layers in oneDNN and BLAS,
    attention, gathers): `MacCounter` counts what `FlopCounterMode` counts, without its per-op decomposition and
    module tracking."""
    unet = tiny_unet("sd2")
    size = 32
    compiled = fisedit.compile(unet)
    inputs, new = unet_inputs(unet, size=size), unet_inputs(unet, size=size, seed=1)

    def both(fn):
        with MacCounter() as ours:
            fn()
        with flop_counter.FlopCounterMode(display=False) as theirs:
            fn()
        return ours.macs, theirs.get_total_flops() // 2

    counts = [both(lambda: unet(**inputs))]
    with compiled.record(attention_maps=1):
        counts.append(both(lambda: compiled(**inputs)))
    with compiled.sparse(ellipse_mask(size, 0.2)):
        counts.append(both(lambda: compiled(**new)))
    for ours, theirs in counts:
        assert ours == theirs > 0
    assert counts[2][0] < counts[0][0]
