"""Per pass: which ops are present or absent after it, and numerical equality with the eager U-Net.

With one block per map (`block_size` above the map size) and an all-true mask, a gathered tensor has exactly its
dense shape, so the graph after *every* pass of the sparse pipeline is runnable, and must still compute the U-Net.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

import fisedit_compiler as fisedit
from conftest import close, tiny_unet, unet_inputs
from fisedit_compiler.build import build_variants, copy_graph_module
from fisedit_compiler.ir import ACTIVATION_KINDS, KEY, LAYOUT, REGION, SPARSE, CacheRef, SpatialLayout
from fisedit_compiler.ir import ops as ir_ops
from fisedit_compiler.passes import ops
from fisedit_compiler.passes.insert_record_taps import cache_refs
from fisedit_compiler.passes.manager import op_counts
from fisedit_compiler.runtime.program import bind
from fisedit_compiler.runtime.cache import RecordCache, StepKey
from fisedit_compiler.runtime.mask_plan import MaskPlan

SIZE = 32
ONE_BLOCK = fisedit.Policy(block_size=1024)


@functools.lru_cache(maxsize=None)
def compiled_with_snapshots(arch: str, policy: fisedit.Policy = ONE_BLOCK):
    unet = tiny_unet(arch)
    inputs = unet_inputs(unet, size=SIZE)
    snapshots = []
    variants = build_variants(
        fisedit.UNet2DConditionAdapter(unet), inputs, policy,
        observers=[lambda record, gm: snapshots.append((record, copy_graph_module(gm)))],
    )
    return unet, inputs, variants, snapshots


def run_sparse(gm, variants, inputs, policy, mask):
    """Record one step with `variants.record`, then run `gm` as a sparse call with `mask`."""
    cache = RecordCache()
    step = cache.new_step(StepKey.of(inputs["timestep"], 2), tuple(inputs["sample"].shape))
    with torch.no_grad():
        variants.run_record(inputs, step)
        plan = MaskPlan(mask, policy)
        return bind(gm, plan)(inputs, step, plan)[0]


@torch.no_grad()
def test_every_intermediate_graph_computes_the_unet(arch):
    unet, inputs, variants, snapshots = compiled_with_snapshots(arch)
    eager = unet(**inputs).sample
    full = torch.ones(SIZE, SIZE, dtype=torch.bool)
    sparse_snapshots = [(r, gm) for r, gm in snapshots if r.variant == "sparse"]
    assert [r.name for r, _ in sparse_snapshots][-1] == "insert_cache_write_back"
    for record, gm in sparse_snapshots:
        assert close(run_sparse(gm, variants, inputs, ONE_BLOCK, full), eager), record.name


def _by_name(snapshots, variant="sparse"):
    return {record.name: (record, gm) for record, gm in snapshots if record.variant == variant}


def test_annotate_spatial_layout_tags_pixels():
    _, _, _, snapshots = compiled_with_snapshots("sd2")
    _, gm = _by_name(snapshots)["annotate_spatial_layout"]
    nodes = {n.name: n for n in gm.graph.nodes}
    assert nodes["inputs_sample"].meta[LAYOUT] == SpatialLayout("map", (32, 32), (2, 3), (2, 4, 32, 32))
    seqs = [n.meta[LAYOUT] for n in gm.graph.nodes if n.target is ops.SDPA]
    assert {s.res for s in seqs} == {(32, 32), (16, 16), (8, 8), (4, 4)}
    assert all(s.kind == "seq" and s.dims == (2,) for s in seqs)
    # the time embedding has no pixels
    time_linear = [n for n in gm.graph.nodes if n.target is ops.aten.linear.default and "time_embedding" in str(n.args[1])]
    assert time_linear and all(n.meta[LAYOUT] is None for n in time_linear)


def test_find_sparse_regions_marks_sparse_resolutions_only():
    policy = dataclasses.replace(ONE_BLOCK, max_sparse_downscale=4)  # the 4x4 level dense
    _, _, _, snapshots = compiled_with_snapshots("sd2", policy)
    _, gm = _by_name(snapshots)["find_sparse_regions"]
    for n in gm.graph.nodes:
        layout = n.meta.get(LAYOUT)
        if n.op == "call_function" and isinstance(layout, SpatialLayout):
            # convs and upsamples reading a dense resolution stay dense (their output is made at full size)
            reads_dense = (n.target is ops.CONV or n.target in ops.UPSAMPLE_NEAREST) and min(
                n.args[0].meta[LAYOUT].res) < SIZE // 4
            assert n.meta[SPARSE] == (min(layout.res) >= SIZE // 4 and not reads_dense), n.name
    assert {n.meta[REGION] for n in gm.graph.nodes if n.meta.get(SPARSE)} == {0}


def test_find_sparse_regions_raises_on_ops_without_a_sparse_rule():
    class FlipUNet(torch.nn.Module):
        """A U-Net-shaped module whose flip along a pixel dim has no sparse rule."""

        def __init__(self):
            super().__init__()
            self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.conv_out = torch.nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, sample, timestep, encoder_hidden_states, return_dict=True):
            return (self.conv_out(self.conv_in(sample).flip(-1)),)

    compiled = fisedit.compile(FlipUNet(), adapter=fisedit.UNet2DConditionAdapter)
    inputs = unet_inputs(tiny_unet("sd2"), size=16)
    with pytest.raises(fisedit.UnsupportedOpError, match=r"node 'flip' \(aten.flip.default\) at resolution 16x16"):
        with compiled.record():
            compiled(**inputs)


def _counts(snapshots, name):
    record, gm = _by_name(snapshots)[name]
    return record.ops_before, record.ops_after, gm


def test_insert_region_boundaries_gathers_and_scatters_at_region_edges():
    before, after, gm = _counts(compiled_with_snapshots("sd2")[3], "insert_region_boundaries")
    assert before["gather_active"] == 0 and after["gather_active"] >= 1
    scatters = [n for n in gm.graph.nodes if n.target is ir_ops.scatter_into_recorded]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert any(s in output.all_input_nodes for s in scatters)  # the U-Net output leaves the region
    for s in scatters:  # a scatter's readers are dense, or read it at full size (self-attention K/V)
        assert all(not u.meta.get(SPARSE) or u.target is ops.SDPA for u in s.users)


def test_cached_group_norm_replaces_sparse_group_norms():
    before, after, gm = _counts(compiled_with_snapshots("sd2")[3], "cached_group_norm")
    rewritten = after["group_norm_recorded_stats"]
    assert rewritten > 0 and after["aten.group_norm.default"] == before["aten.group_norm.default"] - rewritten
    assert all(not n.meta.get(SPARSE) for n in gm.graph.nodes if n.target is ops.GROUP_NORM)


def test_cached_group_norm_does_nothing_with_fresh_statistics():
    before, after, _ = _counts(compiled_with_snapshots("sd2", fisedit.Policy(norm_stats="fresh"))[3],
                               "cached_group_norm")
    assert after == before


def test_sparse_conv_gives_every_spatial_kernel_a_window_gather():
    before, after, gm = _counts(compiled_with_snapshots("sd2")[3], "sparse_conv")
    rewritten = after.get("conv_windows", 0)
    assert rewritten > 0 and after["aten.conv2d.default"] == before["aten.conv2d.default"] - rewritten
    assert not [n for n in gm.graph.nodes if n.target is ops.CONV and n.meta.get(SPARSE)]
    for conv in (n for n in gm.graph.nodes if n.target is ir_ops.conv_windows):
        if tuple(conv.args[1].meta["val"].shape[2:]) == (1, 1):  # pointwise convs read the blocks as they are
            assert conv.args[0].target not in (ir_ops.gather_windows, ir_ops.zero_outside_image)
        else:
            assert conv.args[0].target in (ir_ops.gather_windows, ir_ops.zero_outside_image)


def test_sparse_upsample_leaves_no_sparse_upsample():
    _, _, gm = _counts(compiled_with_snapshots("sd2")[3], "sparse_upsample")
    assert not [n for n in gm.graph.nodes if n.target in ops.UPSAMPLE_NEAREST and n.meta.get(SPARSE) and n.users]


def test_relayout_gathered_leaves_no_dense_reshape_in_regions():
    before, after, gm = _counts(compiled_with_snapshots("sd2")[3], "relayout_gathered")
    assert after["relayout_gathered"] > 0
    assert not [n for n in gm.graph.nodes if n.target in ops.RESHAPES and n.meta.get(SPARSE)]


def test_broadcast_over_blocks_repeats_the_time_embedding():
    before, after, gm = _counts(compiled_with_snapshots("sd2")[3], "broadcast_over_blocks")
    repeats = [n for n in gm.graph.nodes if n.target is ir_ops.repeat_over_blocks]
    assert repeats and all(n.args[0].meta[LAYOUT] is None for n in repeats)


def test_sparse_attention_rewrites_self_attention_at_sparse_resolutions():
    before, after, gm = _counts(compiled_with_snapshots("sd2")[3], "sparse_attention")
    rewritten = after["active_query_attention"]
    assert rewritten > 0 and after["aten.scaled_dot_product_attention.default"] == (
        before["aten.scaled_dot_product_attention.default"] - rewritten)
    for n in gm.graph.nodes:
        if n.target is ir_ops.active_query_attention:
            assert n.args[1].meta.get(SPARSE) and isinstance(n.args[3], CacheRef)


def test_fuse_gather_norm_silu_fuses_every_resnet_window_chain():
    """Every gather -> GroupNorm -> SiLU chain of a convolution's windows becomes one fused gather; in up blocks the
    GroupNorm reads a concatenation of the upsampled path's and the skip connection's windows: one fused gather of
    both operands (or, where one operand is a full-size tensor computed in the call, one per operand with its slice
    of the channels, the finished windows concatenated)."""
    before, after, gm = _counts(compiled_with_snapshots("sd2")[3], "fuse_gather_norm_silu")
    chains = before["zero_outside_image"] - after["zero_outside_image"]
    assert chains > 0 and after["group_norm_recorded_stats"] == before["group_norm_recorded_stats"] - chains
    assert after["gather_windows"] <= before["gather_windows"]
    fused = [n for n in gm.graph.nodes if n.target is ir_ops.gather_windows_norm_silu]
    concatenations = [n for n in fused if len(n.args[0]) > 1]
    sliced = [n for n in fused if n.args[8] is not None]
    assert concatenations and len(fused) == chains + len(sliced) // 2  # sliced chains: two operands each
    for n in concatenations:  # the operands' channels are the convolution's input channels, in order
        (conv,) = n.users
        assert conv.target is ir_ops.conv_windows
        sources, refs, layouts = n.args[:3]
        assert len(sources) == len(refs) == len(layouts) and all(ref is not None for ref in refs)
        assert sum(layout.rest_numel for layout in layouts) == gm.get_parameter(conv.args[1].target).shape[1]
    # every resnet's second chain (conv1 + time embedding, norm2, SiLU, identity dropout) fused, the time embedding
    # folded into the affine map: as many as the sparse graph has second convolutions
    with_offset = [n for n in fused if n.args[9] is not None]
    second_convs = [n for n in gm.graph.nodes if n.target is ir_ops.conv_windows and "conv2" in n.args[1].target]
    assert with_offset and len(with_offset) == len(second_convs)
    assert all(n.args[9].target is not ir_ops.repeat_over_blocks and n.args[8] is None for n in with_offset)
    for part in sliced:
        (cat,) = part.users
        assert cat.target is ops.aten.cat.default and cat.args[1] == 1
        first, end, total = part.args[8]
        assert end - first == part.args[2][0].rest_numel and end <= total
    for cat in {next(iter(part.users)) for part in sliced}:  # the operands' slices tile the channels in order
        slices = [part.args[8] for part in cat.args[0]]
        assert [first for first, _, _ in slices] == [0] + [end for _, end, _ in slices[:-1]]
        assert slices[-1][1] == slices[-1][2]
    # a chain left unfused normalises something other than gathers: e.g. a concatenation whose operand re-applies
    # a resnet's output scaling on the windows
    for zero in (n for n in gm.graph.nodes if n.target is ir_ops.zero_outside_image):
        act = zero.args[0]
        act = act.args[0] if act.target is ops.aten.dropout.default else act
        if act.target is ops.aten.silu.default and act.args[0].target is ir_ops.group_norm_recorded_stats:
            normalised = act.args[0].args[0]
            assert normalised.target is not ir_ops.gather_windows
            if normalised.target is ops.aten.cat.default:
                assert any(a.target is not ir_ops.gather_windows for a in normalised.args[0])


def test_insert_record_taps_records_exactly_what_sparse_reads():
    _, _, variants, _ = compiled_with_snapshots("sd2")
    refs = cache_refs(variants.sparse)
    counts = op_counts(variants.record)
    assert counts["record"] == sum(r.kind in ACTIVATION_KINDS for r in refs)
    assert counts["group_norm_recording_stats"] == sum(r.kind == "group_norm_stats" for r in refs)
    kv = {r.key for r in refs if r.kind == "attention_kv"}
    assert kv and not kv & {r.key for r in refs if r.kind == "output"}  # K/V are stored once, as K/V


def test_a_residual_add_is_recorded_as_its_sum_not_as_its_terms():
    """A conv's halo reaches back through residual adds (`conv2(h) + conv_shortcut(x)`, a transformer block's
    `proj_out + residual`): the sparse variant reads the recorded sum, one tensor, not each term (issue 13: the
    terms were a third of a step's scatter targets)."""
    _, _, variants, _ = compiled_with_snapshots("sd2")
    outputs = {r.key for r in cache_refs(variants.sparse) if r.kind == "output"}
    terms = [k for k in outputs if ".conv2:" in k or "conv_shortcut" in k or ":permute" in k]
    assert not terms, terms
    assert [k for k in outputs if k.startswith("up_blocks.1.attentions.") and k.endswith(":add#0")], sorted(outputs)


@torch.no_grad()
def test_recorded_tensors_are_keyed_by_module_path_not_by_fx_names():
    """Cache keys name the module and op (`down_blocks.0.resnets.0.conv1:conv2d#0`), are unique, and are the same for
    every input signature of the model, so a cache does not depend on how export or a pass names nodes."""
    unet = tiny_unet("sd2")
    keys = []
    for size in (16, 32):
        compiled = fisedit.compile(unet, ONE_BLOCK)
        with compiled.record():
            compiled(**unet_inputs(unet, size=size))
        (step,) = compiled.cache.steps
        keys.append(sorted((ref.key, ref.kind) for ref in compiled.cache.step(step)))
    assert keys[0] == keys[1]
    assert ("down_blocks.0.resnets.0.conv1:conv2d#0", "output") in keys[0]
    assert any(kind == "group_norm_stats" and key == "down_blocks.0.resnets.0.norm1:group_norm#0"
               for key, kind in keys[0])
    captured = compiled_with_snapshots("sd2")[2].captured
    stable = [n.meta[KEY] for n in captured.graph.nodes if n.op == "call_function"]
    assert len(stable) == len(set(stable))


@torch.no_grad()
def test_a_pointwise_op_no_table_names_runs_sparse():
    """Elementwise ops are PyTorch's `Tag.pointwise` ops: `aten.erf` (in no table of ours) and `aten.clamp` inside a
    sparse region run on gathered blocks, and the sparse call equals the dense one on an all-true mask."""

    class ErfNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
            self.conv_out = torch.nn.Conv2d(8, 4, 3, padding=1)

        def forward(self, sample, timestep, return_dict=True):
            return (self.conv_out(torch.erf(self.conv_in(sample)).clamp(-0.5, 0.5)),)

    model = ErfNet()
    compiled = fisedit.compile(model, fisedit.Policy(block_size=4), adapter=fisedit.UNet2DConditionAdapter)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor(1)
    with compiled.record():
        compiled(x, t)
    with compiled.sparse(torch.ones(16, 16, dtype=torch.bool)):
        out = compiled(x * 2, t, return_dict=False)[0]
    sparse = compiled.variants({"sample": x, "timestep": t}).sparse
    erf = [n for n in sparse.graph.nodes if n.target is torch.ops.aten.erf.default]
    assert erf and all(n.meta[SPARSE] for n in erf)
    assert close(out, model(x * 2, t)[0])
