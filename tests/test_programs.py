"""Programs (`runtime.program`): graph variants bound to a call state are self-contained graphs that
`torch.compile` traces whole, and registered kernels (`torch.ops.fisedit`) that pass PyTorch's operator checks."""

from __future__ import annotations

import dataclasses
import functools
import gc
import inspect
import weakref

import pytest
import torch

import fisedit_compiler as fisedit
from fisedit_compiler import cost_model, macs
from conftest import tiny_unet, unet_inputs
from fisedit_compiler.ir import ActivePixels, ConvWindows, FullImage, SpatialLayout
from fisedit_compiler.ir import ops as ir_ops
from fisedit_compiler.kernels.library import INDEX_FIELDS, layout_args
from fisedit_compiler.runtime.cache import RecordCache, StepKey
from fisedit_compiler.runtime.mask_plan import MaskPlan
from fisedit_compiler.runtime.ops import LOWERINGS, register_lowering
from fisedit_compiler.runtime.program import LOWERED_FROM, Recorded, bind, plan_fact

SIZE = 16
POLICY = fisedit.Policy(block_size=2, halo=1)


def box(top: int, left: int, height: int = 4, width: int = 4) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    mask[top:top + height, left:left + width] = True
    return mask


@functools.lru_cache(maxsize=None)
def recorded_unet():
    """A tiny SD-2-shaped U-Net compiled and recorded for one step with cross-attention maps."""
    unet = tiny_unet("sd2")
    inputs = unet_inputs(unet, size=SIZE)
    compiled = fisedit.compile(unet, POLICY)
    with torch.no_grad(), compiled.record(attention_maps=1):
        compiled(**inputs)
    variants = compiled.variants(inputs)
    step = compiled.cache.step(compiled.cache.steps[0])
    return compiled, inputs, variants, step


def graph_count_backend():
    """A torch.compile backend that counts the graphs dynamo hands it and runs them with `aot_eager`
    (functionalisation and the fake implementations of the registered kernels: what Inductor needs)."""
    from torch._dynamo.backends.debugging import aot_eager

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    return backend, graphs


def test_every_ir_op_has_one_lowering_that_takes_its_arguments():
    """The vocabulary (`ir.ops`) and the runtime's lowerings name the same ops; a lowering takes the binding, then
    the op's parameters; an op runs only lowered."""
    assert set(LOWERINGS) == set(ir_ops.IR_OPS.values())
    for name, op in ir_ops.IR_OPS.items():
        assert op.__name__ == name and op.__module__ == ir_ops.__name__
        assert list(inspect.signature(LOWERINGS[op]).parameters)[1:] == list(inspect.signature(op).parameters)
    assert ir_ops.WRITES == {ir_ops.keep_for_reuse}
    with pytest.raises(RuntimeError, match="does not run by itself"):
        ir_ops.record(torch.zeros(1), None)
    with pytest.raises(TypeError, match="not an IR op"):
        register_lowering(torch.ops.aten.add.Tensor)
    with pytest.raises(ValueError, match="two lowerings"):
        register_lowering(ir_ops.record)(lambda b, value, ref: None)


def test_register_lowering_checks_the_parameters():
    def probe(value, ref):
        """An op declared for this test only."""

    op = ir_ops.ir_op(probe)
    try:
        with pytest.raises(TypeError, match="does not take"):
            register_lowering(op)(lambda b, value: None)
        assert op not in LOWERINGS
    finally:
        del ir_ops.IR_OPS["probe"]


def test_a_program_calls_no_ir_op_and_reads_no_hidden_state():
    _, _, variants, _ = recorded_unet()
    plan = MaskPlan(box(4, 4), POLICY)
    for program in (bind(variants.sparse, plan, write_back=True), bind(variants.record, record_attention_maps=True),
                    bind(variants.control)):
        targets = {n.target for n in program.gm.graph.nodes if n.op == "call_function"}
        assert not targets & set(ir_ops.IR_OPS.values()), "an IR op survived lowering"
        placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
        num_inputs = len(placeholders) - len(program.slots)
        assert num_inputs == len(torch.utils._pytree.tree_leaves(recorded_unet()[1]))
    assert any(isinstance(s, Recorded) for s in bind(variants.sparse, plan).slots)
    assert bind(variants.record).slots == []  # a record call reads nothing: it only writes


def test_an_ir_variant_does_not_run_by_itself():
    _, inputs, variants, _ = recorded_unet()
    with pytest.raises(RuntimeError, match="does not run by itself"):
        variants.sparse(inputs)


@torch.no_grad()
def test_torch_compile_traces_a_write_back_program_in_one_graph():
    """The mutating scatter of write-back traces too (a program without write-back is traced by
    test_a_compiled_model_runs_its_programs_with_the_policys_backend)."""
    _, inputs, variants, step = recorded_unet()
    plan = MaskPlan(box(5, 6), POLICY)
    program = variants.sparse_program(plan, write_back=True)
    own_step = type(step)()
    own_step.update({k: (tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone())
                     for k, v in step.items()})
    eager = program(inputs, own_step, plan)
    backend, graphs = graph_count_backend()
    compiled = torch.compile(program.gm, backend=backend, fullgraph=True)
    got = program(inputs, own_step, plan, runner=compiled)
    assert len(graphs) == 1
    torch.testing.assert_close(got, eager)


@torch.no_grad()
def test_aot_autograd_traces_record_and_control_programs():
    """aot_eager runs the fake implementations and functionalisation: what Inductor needs of a program."""
    _, inputs, variants, step = recorded_unet()
    record = variants.program("record", True)
    eager_step, compiled_step = (RecordCache().new_step(StepKey((1.0,), 2), (1,)) for _ in range(2))
    want = record(inputs, eager_step)
    got = record(inputs, compiled_step, runner=torch.compile(record.gm, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got, want)
    assert eager_step.keys() == compiled_step.keys()
    for ref in eager_step:
        torch.testing.assert_close(compiled_step[ref], eager_step[ref])
    control = variants.program("control", False)
    alignment = torch.arange(inputs["encoder_hidden_states"].shape[1]).expand(2, -1).clone()
    alignment[:, 3] = -1
    eager_step, compiled_step = (RecordCache().new_step(StepKey((1.0,), 2), (1,)) for _ in range(2))
    want = control(inputs, eager_step, source=step, token_alignment=alignment)
    got = control(inputs, compiled_step, source=step, token_alignment=alignment,
                  runner=torch.compile(control.gm, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got, want)
    assert eager_step.keys() == compiled_step.keys()


@torch.no_grad()
def test_a_compiled_program_serves_masks_of_the_same_structure():
    """A compiler's program (`inline_kernels`) takes the block counts as constants: it serves a mask of the same
    block counts elsewhere, not a larger one (eager programs serve both: the next test)."""
    compiled, inputs, variants, step = recorded_unet()
    first, shifted, larger = (MaskPlan(m, POLICY) for m in (box(4, 4), box(4, 8), box(2, 2, 10, 10)))
    program = bind(variants.sparse, first, inline_kernels=True)
    assert program.fits(shifted) and not program.fits(larger)
    # the shared program computes the shifted mask's call exactly as a program bound for it
    fresh = bind(variants.sparse, shifted, inline_kernels=True)
    torch.testing.assert_close(program(inputs, step, shifted), fresh(inputs, step, shifted), rtol=0, atol=0)


def test_masks_of_about_the_same_size_share_a_program_through_repeated_blocks():
    compiled, inputs, variants, step = recorded_unet()
    policy = fisedit.Policy(block_size=1, halo=1, block_count_steps=4)  # pixel-wise: 49 blocks at 16x16 become 56
    padded, other = MaskPlan(box(4, 4, 5, 5), policy), MaskPlan(box(3, 3, 5, 6), policy)
    layouts = [[plan.layout((r, r)) for r in (16, 8, 4)] for plan in (padded, other)]
    assert [layout.num_blocks for layout in layouts[0]] == [layout.num_blocks for layout in layouts[1]]
    assert layouts[0][0].repeated == 7 and layouts[1][0].repeated == 0
    assert layouts[0][0].active_fraction == 49 / 256
    program = bind(variants.sparse, padded, inline_kernels=True)  # a compiler's: its block counts are constants
    assert program.fits(other)
    # the repeated blocks change nothing: a call on new latents equals one bound for the exact block count
    exact = MaskPlan(box(4, 4, 5, 5), dataclasses.replace(policy, block_count_steps=0))
    assert not program.fits(exact) and exact.layout((16, 16)).num_blocks == 49
    new = dict(inputs, sample=inputs["sample"] + box(4, 4, 5, 5) * torch.randn(inputs["sample"].shape,
                                                                         generator=torch.Generator().manual_seed(1)))
    outputs = program(new, step, padded)
    torch.testing.assert_close(outputs, bind(variants.sparse, exact, inline_kernels=True)(new, step, exact))
    assert not torch.allclose(outputs[0], program(inputs, step, padded)[0])
    assert torch.equal(padded.recomputed_pixels(), exact.recomputed_pixels())


@torch.no_grad()
def test_an_eager_program_serves_masks_of_every_size_and_place():
    """Block and window counts, whether windows cross the border and which library a GEMM takes are arguments of an
    eager program: masks of other sizes, inside the map or on its border, reuse the first mask's program (no new
    lowering on their first call), each call bit for bit what a compiler's program bound for that mask computes."""
    _, inputs, variants, step = recorded_unet()
    plans = [MaskPlan(mask, POLICY) for mask in (box(6, 6), box(2, 3, 9, 10), box(0, 0, 4, 12), box(12, 1, 1, 1))]
    assert len({plan.layout((16, 16)).num_blocks for plan in plans}) == len(plans)
    spec = ConvWindows((16, 16), (16, 16), (3, 3), (1, 1), (1, 1), (1, 1))
    assert len({plan.gather_index(spec, False).all_inside for plan in plans}) == 2
    program = variants.sparse_program(plans[0])
    new = dict(inputs, sample=inputs["sample"] + torch.randn(inputs["sample"].shape,
                                                             generator=torch.Generator().manual_seed(1)))
    for plan in plans:
        assert variants.sparse_program(plan) is program
        compiled_form = bind(variants.sparse, plan, inline_kernels=True)
        assert not compiled_form.fits(plans[0]) or plan is plans[0]
        torch.testing.assert_close(program(new, step, plan), compiled_form(new, step, plan), rtol=0, atol=0)


def test_a_program_keeps_no_plan_alive():
    _, _, variants, _ = recorded_unet()
    plan = MaskPlan(box(6, 6, 6, 2), POLICY)
    program = variants.sparse_program(plan)
    ref = weakref.ref(plan)
    del plan
    gc.collect()
    assert ref() is None
    assert program.slots  # still usable with the next plan of the same structure


# --- registered kernels ----------------------------------------------------------------------------------------


def _index_args(plan: MaskPlan, spec, from_gathered: bool) -> tuple:
    index = plan.gather_index(spec, from_gathered)
    c = index.windows
    return [getattr(index, f) for f in INDEX_FIELDS], [c.num_windows, c.height, c.width], index.all_inside


@pytest.mark.parametrize("spec", [ConvWindows((8, 8), (8, 8), (3, 3), (1, 1), (1, 1), (1, 1)), FullImage((8, 8))])
def test_gather_ops_pass_pytorchs_operator_checks(spec):
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 3:6] = True
    plan = MaskPlan(mask, fisedit.Policy(block_size=2, halo=0))
    layout = SpatialLayout("map", (8, 8), (2, 3), (2, 6, 8, 8))
    blocks = plan.layout((8, 8)).num_blocks
    fresh, recorded = torch.randn(2 * blocks, 6, 2, 2), torch.randn(2, 6, 8, 8)
    index, windows, all_inside = _index_args(plan, spec, True)
    args = (fresh, recorded, index, windows, all_inside, *layout_args(layout), blocks)
    torch.library.opcheck(torch.ops.fisedit.gather_pixels.default, args)
    scale, shift = torch.randn(2, 6), torch.randn(2, 6)
    torch.library.opcheck(torch.ops.fisedit.gather_pixels_affine_silu.default, ([fresh], [recorded], *args[2:],
                                                                                scale, shift))
    # a concatenation's operands (4 + 2 channels)
    concat = ([fresh[:, :4], fresh[:, 4:]], [recorded[:, :4], recorded[:, 4:]], *args[2:])
    torch.library.opcheck(torch.ops.fisedit.gather_pixels_affine_silu.default, (*concat, scale, shift))
    full_index, full_windows, full_inside = _index_args(plan, ActivePixels((8, 8)), False)
    torch.library.opcheck(torch.ops.fisedit.gather_pixels.default,
                          (None, recorded, full_index, full_windows, full_inside, *layout_args(layout), 0))
    torch.library.opcheck(torch.ops.fisedit.scatter_pixels_.default,
                          (recorded.clone(), fresh, *layout_args(layout), full_index[2], blocks))


def test_attention_op_passes_pytorchs_operator_checks():
    q = torch.randn(2, 2, 5, 8)
    kf, vf = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    kr, vr = torch.randn(2, 2, 16, 8), torch.randn(2, 2, 16, 8)
    positions = torch.tensor([1, 4, 5, 9, 15])
    torch.library.opcheck(torch.ops.fisedit.active_query_attention.default, (q, kf, vf, kr, vr, positions, None))
    torch.library.opcheck(torch.ops.fisedit.active_query_attention.default, (q, kf, vf, kr, vr, positions, 0.3))


@pytest.mark.parametrize("write_back", [False, True])
@torch.no_grad()
def test_inline_kernels_compute_what_the_registered_operators_do(write_back):
    """Programs for a compiler (`Policy.program_backend`) inline gathers and attention as ATen ops: same values."""
    _, inputs, variants, step = recorded_unet()
    for mask in (box(5, 6), box(0, 0, 16, 3), box(0, 0, 0, 0)):  # inside, on the image border, empty
        plan = MaskPlan(mask, POLICY)
        steps = []
        for inline in (False, True):
            own = type(step)()
            own.update({k: (tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone())
                        for k, v in step.items()})
            program = bind(variants.sparse, plan, write_back=write_back, inline_kernels=inline)
            registered = {torch.ops.fisedit.gather_pixels.default, torch.ops.fisedit.active_query_attention.default}
            assert any(n.target in registered for n in program.gm.graph.nodes) is not inline
            steps.append((program(inputs, own, plan), own))
        (want, want_step), (got, got_step) = steps
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for ref in want_step:
            torch.testing.assert_close(got_step[ref], want_step[ref], rtol=0, atol=0)


@torch.no_grad()
def test_eager_calls_run_the_kernels_directly_with_the_operators_values():
    """An eager call runs `Program.direct`: the registered kernels called as the Python functions behind them (no
    operator dispatch), with the operators' values, bit for bit, and the MACs a counter finds in the operators."""
    from fisedit_compiler.kernels.registry import DIRECT_CALLS

    compiled, inputs, variants, step = recorded_unet()
    plan = MaskPlan(box(5, 6), POLICY)
    program = bind(variants.sparse, plan, write_back=True)
    targets = {n.target for n in program.gm.graph.nodes}
    direct_targets = {n.target for n in program.direct().graph.nodes}
    assert {torch.ops.fisedit.gather_pixels.default, torch.ops.fisedit.active_query_attention.default} <= targets
    assert not direct_targets & set(DIRECT_CALLS) and set(DIRECT_CALLS.values()) & direct_targets
    results = []
    for runner in (program.gm, program.direct()):
        own = type(step)()
        own.update({k: (tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone()) for k, v in step.items()})
        results.append((program(inputs, own, plan, runner=runner), own))
    (want, want_step), (got, got_step) = results
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for ref in want_step:  # the write-back (an in-place kernel) lands in the record both ways
        torch.testing.assert_close(got_step[ref], want_step[ref], rtol=0, atol=0)
    assert variants.runner(program) is program.direct()
    counts = []
    for runner in (program.gm, program.direct()):  # a MAC counter counts the direct calls as the operators
        own = type(step)()
        own.update({k: (tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone()) for k, v in step.items()})
        with macs.flop_counter.FlopCounterMode(display=False) as counter:
            program(inputs, own, plan, runner=runner)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


def test_program_backend_must_be_a_torch_compile_backend():
    with pytest.raises(ValueError, match="not a torch.compile backend"):
        fisedit.Policy(program_backend="inductr")


@pytest.mark.slow  # AOTAutograd traces two programs: half a minute on a CPU
@torch.no_grad()
def test_a_compiled_model_runs_its_programs_with_the_policys_backend():
    """`Policy.program_backend`: record and sparse calls run compiled programs (one graph each), with the results of
    the eager programs."""
    compiled_eager, inputs, _, _ = recorded_unet()
    unet = compiled_eager.unet
    backend, graphs = graph_count_backend()
    from torch._dynamo import register_backend

    register_backend(name="fisedit_test_counting", compiler_fn=backend)
    compiled = fisedit.compile(unet, dataclasses.replace(POLICY, program_backend="fisedit_test_counting"))
    mask = box(3, 9)
    with compiled.record():
        recorded = compiled(**inputs).sample
    with compiled_eager.sparse(mask):
        want = compiled_eager(**inputs).sample
    with compiled.sparse(mask):
        got = compiled(**inputs).sample
        # a MAC count around a call of compiled programs: the eager program's ops, counted (no dynamo error)
        counted, _ = macs.count_macs(lambda: compiled(**inputs))
    with compiled_eager.sparse(mask):
        eager_counted, _ = macs.count_macs(lambda: compiled_eager(**inputs))
    assert len(graphs) == 2  # the record program and the sparse program (none compiled under the counter)
    torch.testing.assert_close(recorded, unet(**inputs).sample)
    torch.testing.assert_close(got, want)
    assert counted == eager_counted > 0


def test_programs_read_the_models_own_parameters_under_flat_names():
    """A program's root holds the model's parameters themselves (not copies), each under one flat name: a dotted
    name would walk the module tree at every call."""
    compiled, _, variants, _ = recorded_unet()
    program = bind(variants.sparse, MaskPlan(box(5, 6), POLICY))
    reads = [n.target for n in program.gm.graph.nodes if n.op == "get_attr"]
    assert reads and not [t for t in reads if "." in t]
    own = {id(p) for p in compiled.unet.parameters()}
    values = [getattr(program.gm, t) for t in reads]
    parameters = [v for v in values if isinstance(v, torch.nn.Parameter)]
    assert parameters and all(id(v) in own for v in parameters)


def test_a_plans_gemm_library_is_a_compiled_programs_constant_and_an_eager_programs_argument(monkeypatch):
    """Which library multiplies im2col's rows (`CostConstants.gemm`) is decided at bind time in a program for a
    compiler: oneDNN's GEMMs are oneDNN linear primitives in it, BLAS's linear layers, and a program bound for one
    is not reused under the other. An eager program takes the plan's library at each call: one program computes
    both plans' calls, each bit for bit as the compiler's program bound for it."""
    monkeypatch.setattr(cost_model, "ONEDNN_MIN_MACS", 1)  # the tiny U-Net's GEMMs are small
    _, inputs, variants, step = recorded_unet()
    mask = box(4, 6)

    def plan(gemm: str) -> MaskPlan:
        return MaskPlan(mask, dataclasses.replace(POLICY, block_size=1),
                        constants=dataclasses.replace(cost_model.DEFAULT, gemm=gemm))

    blas, onednn = plan("blas"), plan("onednn")
    program, other = (bind(variants.sparse, p, inline_kernels=True) for p in (blas, onednn))
    assert not program.fits(onednn) and not other.fits(blas)
    linears = lambda p: sum(n.target is torch.nn.functional.linear or n.target is torch._C._nn.linear  # noqa: E731
                            for n in p.gm.graph.nodes)
    layers = sum(n.target is ir_ops.linear_by_library for n in variants.sparse.graph.nodes)
    assert layers > 0 and linears(other) == 0 and linears(program) >= layers  # every GEMM, linear layers too
    want_blas, want_onednn = program(inputs, step, blas), other(inputs, step, onednn)
    torch.testing.assert_close(want_onednn, want_blas, rtol=1e-5, atol=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(want_onednn, want_blas))  # each library its own rounding
    for p, want in ((blas, want_blas), (onednn, want_onednn)):
        torch.testing.assert_close(bind(variants.sparse, p)(inputs, step, p), want, rtol=0, atol=0)


def test_an_eager_program_takes_each_plans_gemm_library_at_its_call(monkeypatch):
    """Masks whose gathered GEMMs fall on either side of oneDNN's threshold share an eager program, and each call
    multiplies by its own plan's library: bit for bit a compiler's program bound for that plan."""
    _, inputs, variants, step = recorded_unet()

    def plan(mask, gemm: str = "onednn") -> MaskPlan:
        return MaskPlan(mask, dataclasses.replace(POLICY, block_size=1),
                        constants=dataclasses.replace(cost_model.DEFAULT, gemm=gemm))

    small, large = plan(box(6, 6, 2, 2)), plan(box(2, 2, 10, 10))
    key = next(k for k, _ in bind(variants.sparse, small, inline_kernels=True).structure
               if k[0] == "gemm_library" and k[4] == (SIZE, SIZE))
    rows = [key[1] * p.layout(key[4]).num_pixels * key[2] for p in (small, large)]  # GEMM sizes (rows x kernel)
    monkeypatch.setattr(cost_model, "ONEDNN_MIN_MACS", (rows[0] + rows[1]) // 2)  # small: BLAS, large: oneDNN
    assert [plan_fact(p, key) for p in (small, large)] == ["blas", "onednn"]
    program = variants.sparse_program(small)
    assert variants.sparse_program(large) is program
    want = bind(variants.sparse, large, inline_kernels=True)(inputs, step, large)
    in_blas = plan(box(2, 2, 10, 10), "blas")
    assert not torch.equal(bind(variants.sparse, in_blas, inline_kernels=True)(inputs, step, in_blas)[0], want[0])
    torch.testing.assert_close(program(inputs, step, large), want, rtol=0, atol=0)


def test_a_gathered_linear_layer_takes_its_library_by_its_active_rows(monkeypatch):
    """A linear layer on gathered tokens multiplies only the active pixels' rows: the library is chosen for those
    (`CostConstants.gemm_library`), not for the dense layer's rows."""
    _, inputs, variants, step = recorded_unet()
    plan = MaskPlan(box(4, 6), dataclasses.replace(POLICY, block_size=1),
                    constants=dataclasses.replace(cost_model.DEFAULT, gemm="onednn"))
    node = next(n for n in variants.sparse.graph.nodes
                if n.target is ir_ops.linear_by_library and n.args[3] is not None)
    layout = node.args[3]
    out_features, in_features = node.args[1].meta["val"].shape
    dense_rows = layout.shape[0] * layout.res[0] * layout.res[1]
    active_rows = layout.shape[0] * plan.layout(layout.res).num_blocks
    assert active_rows < dense_rows

    def library(min_macs: int) -> str:
        monkeypatch.setattr(cost_model, "ONEDNN_MIN_MACS", min_macs)
        program = bind(variants.sparse, plan, inline_kernels=True)  # (an eager program's is an argument)
        lowered = [n for n in program.gm.graph.nodes if n.meta.get(LOWERED_FROM) == node.name]
        onednn = any(n.target is torch.ops.fisedit.onednn_linear.default for n in lowered)
        return "onednn" if onednn else "blas"

    assert library(active_rows * out_features * in_features) == "onednn"
    assert library(active_rows * out_features * in_features + 1) == "blas"  # too few active rows to pay


@pytest.mark.parametrize("variant", ["record", "control"])
def test_dense_variants_take_their_linear_library_from_the_devices_constants(monkeypatch, variant):
    """The record and control variants' linear layers are `linear_by_library` too (dense rows, the constants of the
    device they run on): a layer large enough for oneDNN takes it, and the record call then equals the eager U-Net
    up to float rounding; with every layer below the threshold it is `F.linear`, bit for bit the eager U-Net."""
    unet = tiny_unet("sd2")
    inputs = unet_inputs(unet, size=SIZE)
    compiled = fisedit.compile(unet, POLICY)
    with torch.no_grad(), compiled.record():
        compiled(**inputs)
    variants = compiled.variants(inputs)
    linears = [n for n in getattr(variants, variant).graph.nodes if n.target is ir_ops.linear_by_library]
    assert linears and all(n.args[3] is None for n in linears)  # dense: no layout to take active rows from
    onednn_op = torch.ops.fisedit.onednn_linear.default

    def bound(min_macs: int):
        monkeypatch.setattr(cost_model, "ONEDNN_MIN_MACS", min_macs)
        program = bind(getattr(variants, variant))
        return program, sum(n.target is onednn_op for n in program.gm.graph.nodes)

    everything, onednn = bound(1)
    assert onednn == len(linears)
    nothing, onednn = bound(2**62)
    assert onednn == 0
    if variant == "record":
        with torch.no_grad():
            eager = unet(**inputs).sample
            step = RecordCache().new_step(StepKey.of(inputs["timestep"], 2), tuple(inputs["sample"].shape))
            assert torch.equal(nothing(inputs, step)[0], eager)
            in_onednn = everything(inputs, step)[0]
        torch.testing.assert_close(in_onednn, eager, rtol=1e-5, atol=1e-5)
        assert not torch.equal(in_onednn, eager)  # another library: its own rounding


@pytest.mark.parametrize("algorithm", ["channels_last", "im2col"])
def test_a_plans_convolution_algorithm_is_part_of_its_programs_structure(algorithm):
    """The cost constants' convolution algorithm (`CostConstants.conv`) decides how a program convolves windows
    larger than one kernel footprint; every algorithm computes the same call, and a program bound for one is not
    reused under constants that name another."""
    _, inputs, variants, step = recorded_unet()
    mask = box(4, 6)

    def plan(conv: str) -> MaskPlan:
        costs = cost_model.DEFAULT.layer
        return MaskPlan(mask, POLICY, constants=cost_model.CostConstants(
            layer=costs, conv={c: {b: conv for b in cost_model.BLOCK_SIZES} for c in costs}))

    usual, other = plan("nchw"), plan(algorithm)
    ops_of = lambda program: [n.target for n in program.gm.graph.nodes]  # noqa: E731
    program, changed = bind(variants.sparse, usual), bind(variants.sparse, other)
    assert not program.fits(other) and not changed.fits(usual)
    convs = [t for t in ops_of(changed) if t is torch.ops.aten.conv2d.default]
    if algorithm == "im2col":  # 3x3 convolutions become GEMMs over unfolded windows
        assert "unfold" in ops_of(changed) and "unfold" not in ops_of(program)
        assert len(convs) < len([t for t in ops_of(program) if t is torch.ops.aten.conv2d.default])
    else:  # the windows are convolved as gathered, not copied to NCHW first
        assert ops_of(changed).count("contiguous") < ops_of(program).count("contiguous")
    torch.testing.assert_close(changed(inputs, step, other), program(inputs, step, usual), rtol=1e-5, atol=1e-5)
