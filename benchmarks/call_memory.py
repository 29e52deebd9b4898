#!/usr/bin/env python
"""What one call holds in memory beside the weights and the records: the transients a session's bound leaves room for.

    python benchmarks/call_memory.py                                     # SD 1.5 at 512x512 (64x64 latents)
    python benchmarks/call_memory.py --arch sd2 --latent-size 96         # SD 2 at 768x768
    python benchmarks/call_memory.py --size tiny --latent-size 16 --out /tmp/m   # a quick check

An `EditSession` (default `Policy()`, CFG 7.5) over a pipeline with seeded random weights generates a source
(`--steps` steps) and edits it with an ellipse mask of `--mask` of the latents. Every program the U-Net runs is run
by an FX interpreter that frees each value after its last use, as the generated code does, and notes after every
node the bytes of the values alive that the call made itself (not the weights, not the records and plan tensors
it reads): the peak of that is the call's activations, by call kind (record, sparse, ...). Beside it, what the
sparse calls' mask plan made for its programs (`MaskPlan.value`: index tensors, convolution kernels flattened for
pixel-wise blocks), which lives for the edit's denoising steps, and what the records of one step take. Results go
to ``<out>/call-memory_<arch>-<latent>.{json,md}``.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.fx as fx  # noqa: E402

import fisedit_compiler as fisedit  # noqa: E402
from fisedit_compiler.editing.masks import ellipse_mask  # noqa: E402
from fisedit_compiler.models import random_pipeline  # noqa: E402
from fisedit_compiler.runtime import executor  # noqa: E402
from fisedit_compiler.runtime.mask_plan import MaskPlan  # noqa: E402
from results_io import machine, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _storages(value, out: dict[int, int]) -> None:
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    elif isinstance(value, (list, tuple)):
        for item in value:
            _storages(item, out)


class LiveBytes(fx.Interpreter):
    """Runs a program and notes the most bytes alive at once that it made itself (its arguments and the module's
    attributes excluded), and the node it peaked at."""

    def run(self, *args):
        self.excluded: dict[int, int] = {}
        _storages(list(args), self.excluded)
        self.peak, self.peak_node = 0, ""
        return super().run(*args)

    def run_node(self, node: fx.Node):
        result = super().run_node(node)
        alive: dict[int, int] = {}
        for value in [*self.env.values(), result]:
            _storages(value, alive)
        made = sum(n for ptr, n in alive.items() if ptr not in self.excluded)
        if made > self.peak:
            self.peak, self.peak_node = made, node.name
        return result

    def fetch_attr(self, target: str):  # the weights
        value = super().fetch_attr(target)
        _storages(value, self.excluded)
        return value


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sd15")
    parser.add_argument("--latent-size", type=int, default=64)
    parser.add_argument("--size", default="full")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mask", type=float, default=0.15)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)

    peaks: dict[str, int] = collections.defaultdict(int)
    where: dict[str, str] = {}
    plans: list[MaskPlan] = []
    runner, planner = executor.Variants.runner, executor.Executor.mask_plan

    def live_runner(self, program):
        def run(*call_args):
            interpreter = LiveBytes(program.direct())
            out = interpreter.run(*call_args)
            kind = state["kind"]
            if kind == "VAE decoder":  # (its mode is set by a hook that runs after this one's)
                kind += ", " + ("sparse" if program.structure else "record" if program.writes else "eager")
            if interpreter.peak > peaks[kind]:
                peaks[kind], where[kind] = interpreter.peak, interpreter.peak_node
            return out
        return run

    def kept_planner(self, mask, extent=None):
        plans.append(planner(self, mask, extent))
        return plans[-1]

    state = {"kind": "eager"}
    torch.manual_seed(0)
    pipe = random_pipeline(args.arch, latent_size=args.latent_size, seed=0, size=args.size)
    pipe.set_progress_bar_config(disable=True)
    session = fisedit.EditSession(pipe, fisedit.Policy(), num_inference_steps=args.steps)

    def note_kind(module, call_args):
        run = getattr(module, "current_run", None)
        state["kind"] = "eager" if run is None else run.next_call_kind()[0]

    session.unet.register_forward_pre_hook(note_kind)
    if session.decoding is not None:
        session.decoding.decoder.register_forward_pre_hook(lambda module, call_args: state.update(kind="VAE decoder"))
    executor.Variants.runner, executor.Executor.mask_plan = live_runner, kept_planner
    plan_bytes = 0
    release = MaskPlan.release_values

    def measured_release(plan):  # what the plan made, measured when the edit lets it go
        nonlocal plan_bytes
        plan_bytes = max(plan_bytes, sum(v.untyped_storage().nbytes() for v in plan._values.values()
                                         if isinstance(v, torch.Tensor)))
        release(plan)

    MaskPlan.release_values = measured_release
    try:
        with torch.no_grad():
            session.generate("a cabin in the woods", generator=torch.Generator().manual_seed(0))
            session.edit("a red cabin in the woods", mask=ellipse_mask(args.latent_size, args.mask))
    finally:
        executor.Variants.runner, executor.Executor.mask_plan = runner, planner
        MaskPlan.release_values = release
    breakdown = session.cache.breakdown()
    step = max(sum(kinds.values()) for name, kinds in breakdown.items() if name != "total")
    weights = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    decoder = session.decoding.cache.nbytes if session.decoding is not None else 0
    data = {"machine": machine(), "arch": args.arch, "latent_size": args.latent_size, "size": args.size,
            "mask": args.mask, "unet_weight_bytes": weights, "step_record_bytes": step, "decoder_record_bytes": decoder,
            "call_peak_bytes": dict(peaks), "call_peak_node": where, "sparse_plan_bytes": plan_bytes}
    session.close()
    name = f"call-memory_{args.arch}-{args.latent_size}"
    write_results(args.out, name, data, markdown(data))
    return data


def markdown(d: dict) -> str:
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    lines = [f"# What one call holds: {d['arch']} ({d['size']}) at {d['latent_size']}x{d['latent_size']} latents, "
             f"{d['mask']:.0%} mask, CFG batch 2", "",
             f"Machine: {d['machine']['cpu']}, git {d['machine']['git']}, {d['machine']['date']}", "",
             f"U-Net weights {mib(d['unet_weight_bytes'])}; one recorded step {mib(d['step_record_bytes'])}; the "
             f"decoder's record (sparse decode) {mib(d['decoder_record_bytes'])}; the "
             f"sparse calls' mask plan (index tensors, kernels flattened for pixel-wise blocks, made once per edit "
             f"and let go before the decode) {mib(d['sparse_plan_bytes'])}.", "",
             "| call | most bytes alive that the call made (activations) | at node |", "|---|---:|---|"]
    for kind, peak in d["call_peak_bytes"].items():
        lines.append(f"| {kind} | {mib(peak)} | `{d['call_peak_node'][kind]}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
