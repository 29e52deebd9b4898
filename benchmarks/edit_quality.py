"""Editing benchmark on the embedded shapes model: does an edit do what was typed, per edit type and contender.

    python benchmarks/edit_quality.py [--per-type 20] [--steps 20] [--out benchmarks/results] [--pictures DIR]

Cases (`training.edit_suite.edit_cases`, fixed seed): colour swap, shape swap, size change, adding an object,
removing one, background colour; one or two objects. Contenders, one process, the same initial noise per case:

- `dense`: the eager pipeline regenerating the edited prompt;
- `p2p_dense`: Prompt-to-Prompt dense, our control variant at every step (cross-attention maps, a word swap's
  layout held for its first `hold_layout_steps`), no sparse step; its final latents are blended with the source's
  outside the drift it detects at the end (P2P's local blend);
- `ours_detected`: `EditSession.edit(prompt)`, the default policy, mask detected;
- `ours_gt`: the same with the source object's mask (the evaluator's, at latent resolution, dilated by one latent
  pixel) as a user mask; for "add" there is no such object (not run), for "background" the mask is everything but
  the objects;
- `deepcache`: DeepCache regenerating the edited prompt (`DeepCacheSDHelper`, interval `--deepcache-interval`,
  branch 0) over the eager U-Net, when the `DeepCache` package is installed (`pip install --no-deps DeepCache`).

Per type and contender: success rate (`edit_suite.judge`: the new attribute on the edited object, every other
object kept in place), mean IoU of the edited object with the source object (attribute edits), PSNR and SSIM of the
picture against the source outside the edited objects (bit-exact latents outside the region for ours: counted), PSNR
of ours against `p2p_dense` inside our mask (detected or the user's: the issue's measure) and inside our region
(the mask with its halo, in blocks: stricter, its rim meets the source's context), seconds and MACs of U-Net calls
against the dense regeneration.
Fidelity of the sparse computation alone: PSNR of `ours_detected` inside its region against the same edit run
unaccelerated (`Policy(refresh_every=1)`: the same control steps, mask and blend, every later step dense), which is
what RegionE's 30.5-32.1 dB compare against; `p2p_dense` differs from it by controlling every step (not run when
`--set controlled_steps=...` puts sparse steps under control: refresh steps never are).
Cases whose source picture does not show the objects named (the model's miss, not the edit's) are left out and
counted. Writes `edit-quality.json` and `.md`.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity
from torch.utils import flop_counter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fisedit_compiler.compiler import compile  # noqa: E402
from fisedit_compiler.report import PANEL_GAP, SIDE_BY_SIDE_LABELS, dense_regeneration, side_by_side  # noqa: E402
from fisedit_compiler.editing.session import EditSession  # noqa: E402
from fisedit_compiler.policy import Policy  # noqa: E402
from fisedit_compiler.training import edit_suite  # noqa: E402
from fisedit_compiler.training.quality import load_shapes_pipeline, psnr  # noqa: E402
from results_io import machine, write_results  # noqa: E402

CONTENDERS = ("dense", "p2p_dense", "ours_detected", "ours_gt", "deepcache")


def latent_mask(pixels: np.ndarray, factor: int, dilation: int = 1) -> torch.Tensor:
    """An image-resolution bool mask as the latent pixels it touches, dilated by `dilation` latent pixels."""
    m = F.max_pool2d(torch.from_numpy(pixels).float()[None, None], factor)
    if dilation:
        m = F.max_pool2d(m, 2 * dilation + 1, 1, dilation)
    return m[0, 0] > 0


def upsample(mask: torch.Tensor, factor: int) -> np.ndarray:
    return np.kron(mask.cpu().numpy().astype(np.uint8), np.ones((factor, factor), np.uint8)).astype(bool)


def ssim(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    """Mean SSIM of two RGB images over the pixels of `where` (skimage's map: 7x7 windows, 8-bit range)."""
    _, full = structural_similarity(a, b, channel_axis=-1, data_range=255, full=True)
    return float(full.mean(axis=-1)[where].mean())


def rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


class Runner:
    def __init__(self, pipe, steps: int, guidance: float, deepcache_interval: int = 3,
                 overrides: dict | None = None):
        self.pipe, self.steps, self.guidance = pipe, steps, guidance
        self.overrides = dict(overrides or {})  # policy fields set for our edits and P2P dense (`--set`)
        self.deepcache_interval = deepcache_interval
        self.eager = pipe.unet
        self.unets: dict[Policy, torch.nn.Module] = {}

    def policy(self, **fields) -> Policy:
        """The policy of a contender: `fields`, then the `--set` overrides."""
        return Policy(**{**fields, **self.overrides})

    def session(self, policy: Policy) -> EditSession:
        if policy not in self.unets:
            self.unets[policy] = compile(self.eager, policy)
        self.pipe.unet = self.unets[policy]
        return EditSession(self.pipe, num_inference_steps=self.steps, guidance_scale=self.guidance)

    def deepcache(self, prompt: str, seed: int) -> tuple[Image.Image, tuple[float, int]] | None:
        """DeepCache regenerating `prompt` from the case's initial latents over the eager U-Net: the picture and its
        U-Net (seconds, MACs); None without the DeepCache package. MACs are counted on a second, identical run
        (the counter slows the calls it watches), every call counted: a shallow call costs less than a full one."""
        try:
            from DeepCache import DeepCacheSDHelper
        except ImportError:
            return None
        compiled, self.pipe.unet = self.pipe.unet, self.eager
        helper = DeepCacheSDHelper(pipe=self.pipe)
        helper.set_params(cache_interval=self.deepcache_interval, cache_branch_id=0)
        helper.enable()
        try:
            (image, seconds), (_, macs) = (self._metered(prompt, seed, count) for count in (False, True))
        finally:
            helper.disable()
            self.pipe.unet = compiled
        return image, (seconds, macs)

    def _metered(self, prompt: str, seed: int, count: bool) -> tuple[Image.Image, float | int]:
        """The pipeline's picture, and its U-Net calls' seconds (or, with `count`, MACs)."""
        total: list = []
        state: dict = {}

        def before(module, args):
            if count:
                state["counter"] = flop_counter.FlopCounterMode(display=False)
                state["counter"].__enter__()
            state["start"] = time.perf_counter()

        def after(module, args, output):
            if count:
                state["counter"].__exit__(None, None, None)
                total.append(state["counter"].get_total_flops() // 2)
            else:
                total.append(time.perf_counter() - state["start"])

        handles = [self.eager.register_forward_pre_hook(before), self.eager.register_forward_hook(after)]
        try:
            image = self.pipe(prompt, latents=self.initial(seed), num_inference_steps=self.steps,
                              guidance_scale=self.guidance).images[0]
        finally:
            for handle in handles:
                handle.remove()
        return image, sum(total)

    def initial(self, seed: int) -> torch.Tensor:
        return torch.randn((1, 4, 32, 32), generator=torch.Generator().manual_seed(seed))


def unet_cost(stats: dict) -> tuple[float, int]:
    phases = [stats[p] for p in ("dense", "sparse") if p in stats]
    return sum(p.seconds for p in phases), sum(p.macs for p in phases)


def run_case(runner: Runner, case: edit_suite.EditCase, factor: int, picture: Path | None = None) -> dict | None:
    """The case's row (None if the source misses an object); with `picture`, source | ours (detected) | its region
    | dense regeneration saved there."""
    session = runner.session(runner.policy())
    source = session.generate(case.source_prompt, latents=runner.initial(case.seed))
    source_image = rgb(source.images[0])
    objects = edit_suite.source_objects(case, source_image)
    if objects is None:
        return None
    row: dict = {"type": case.type, "source": case.source_prompt, "edit": case.edited_prompt, "seed": case.seed}
    dense_stats, dense_image = dense_regeneration(session, case.edited_prompt)  # from the same initial latents
    results = {"dense": (dense_image, None, (dense_stats.seconds, dense_stats.macs))}
    detected = session.edit(case.edited_prompt, keep=False)
    results["ours_detected"] = (detected.images[0], detected, unet_cost(detected.stats))
    object_pixels = np.zeros(source_image.shape[:2], bool)
    for obj in objects.values():
        object_pixels |= obj.mask
    if case.type != "add":
        if case.type == "background":
            user = ~latent_mask(object_pixels, factor)
        else:
            user = latent_mask(objects[0].mask, factor)
        gt = session.edit(case.edited_prompt, mask=user, keep=False)
        results["ours_gt"] = (gt.images[0], gt, unet_cost(gt.stats))
    # (after the edits of `session`: a runner's session sets the pipeline's U-Net to its policy's)
    unaccelerated = None  # every step after the control steps dense (refresh steps: never under control)
    if not runner.policy().edit.controlled_steps:
        unaccelerated_session = runner.session(runner.policy(refresh_every=1))
        unaccelerated_session.generate(case.source_prompt, latents=runner.initial(case.seed))
        unaccelerated = unaccelerated_session.edit(case.edited_prompt)  # (a refresh records: keep=True)
    p2p_session = runner.session(runner.policy(dense_steps=1.0, detect_from=0.1, detect_to=0.2))
    p2p_session.generate(case.source_prompt, latents=runner.initial(case.seed))
    p2p = p2p_session.edit(case.edited_prompt, keep=False)
    results["p2p_dense"] = (p2p.images[0], p2p, unet_cost(p2p.stats))
    deepcache = runner.deepcache(case.edited_prompt, case.seed)
    if deepcache is not None:
        results["deepcache"] = (deepcache[0], None, deepcache[1])
    for name, (image, result, (seconds, macs)) in results.items():
        verdict = edit_suite.judge(case, objects, rgb(image))
        entry = {"success": verdict["success"], "attribute": verdict["attribute"],
                 "others_kept": verdict["others_kept"], "iou": verdict.get("iou"), "found": verdict["found"],
                 "seconds": seconds, "macs": macs}
        changed = object_pixels.copy()
        for found in edit_suite.find_objects(rgb(image), case.background):
            changed |= found.mask
        if case.type != "background":
            entry["psnr_outside"] = psnr(rgb(image), source_image, ~changed)
            entry["ssim_outside"] = ssim(rgb(image), source_image, ~changed)
        if result is not None and result.mask is not None and name.startswith("ours"):
            outside = ~result.mask
            entry["latents_outside_identical"] = bool(torch.equal(result.latents[..., outside],
                                                                  source.latents[..., outside]))
            region = upsample(result.mask, factor)
            entry["region_fraction"] = float(result.mask.float().mean())
            entry["psnr_vs_p2p_in_region"] = psnr(rgb(image), rgb(results["p2p_dense"][0]), region)
            mask = result.mask if result.detected is None else result.detected  # the user's, or the detected one
            entry["psnr_vs_p2p_in_mask"] = psnr(rgb(image), rgb(results["p2p_dense"][0]), upsample(mask, factor))
            if name == "ours_detected" and unaccelerated is not None:
                entry["mask_as_unaccelerated"] = bool(torch.equal(result.mask, unaccelerated.mask))
                entry["psnr_vs_unaccelerated_in_region"] = psnr(rgb(image), rgb(unaccelerated.images[0]), region)
        row[name] = entry
    if picture is not None:
        side_by_side(source.images[0], detected.images[0], detected.mask, dense_image).save(picture)
        row["picture"] = picture.name
    return row


def summarise(rows: list[dict]) -> dict:
    summary: dict = {}
    for kind in edit_suite.EDIT_TYPES:
        typed = [r for r in rows if r["type"] == kind]
        if not typed:
            continue
        per: dict = {"cases": len(typed)}
        dense_seconds = np.mean([r["dense"]["seconds"] for r in typed])
        dense_macs = np.mean([r["dense"]["macs"] for r in typed])
        for name in CONTENDERS:
            entries = [r[name] for r in typed if name in r]
            if not entries:
                continue
            ious = [e["iou"] for e in entries if e.get("iou") is not None]
            finite = lambda key: [e[key] for e in entries if key in e and math.isfinite(e[key])]  # noqa: E731
            per[name] = {
                "success": float(np.mean([e["success"] for e in entries])),
                "iou": float(np.mean(ious)) if ious else None,
                "psnr_outside": float(np.mean(finite("psnr_outside"))) if finite("psnr_outside") else None,
                "ssim_outside": float(np.mean(finite("ssim_outside"))) if finite("ssim_outside") else None,
                **{key: float(np.mean(finite(key))) if finite(key) else None
                   for key in ("psnr_vs_p2p_in_region", "psnr_vs_p2p_in_mask", "psnr_vs_unaccelerated_in_region")},
                "latents_outside_identical": all(e.get("latents_outside_identical", True) for e in entries),
                "seconds_vs_dense": float(np.mean([e["seconds"] for e in entries]) / dense_seconds),
                "macs_vs_dense": float(np.mean([e["macs"] for e in entries]) / dense_macs),
            }
        p2p = [r for r in typed if r["p2p_dense"]["success"]]
        per["ours_detected_where_p2p_succeeds"] = (float(np.mean([r["ours_detected"]["success"] for r in p2p]))
                                                   if p2p else None)
        summary[kind] = per
    return summary


def markdown(data: dict) -> str:
    lines = [f"# Edit quality on the embedded shapes model ({data['steps']} DDIM steps, CFG {data['guidance']})", "",
             f"Machine: {data['machine']['cpu']}, git {data['machine']['git']}, {data['machine']['date']}", "",
             f"{data['per_type']} cases drawn per type (seed {data['seed']}); cases whose source picture misses "
             f"a named object are left out ({data['skipped']} of {data['drawn']})."
             + (f" Policy fields set for ours and P2P dense: {data['policy_overrides']}."
                if data.get("policy_overrides") else ""), "",
             "Success rate (IoU of the edited object with the source object; U-Net seconds / MACs against the "
             "dense regeneration):", "",
             "| type | cases | " + " | ".join(CONTENDERS) + " | ours (detected) where P2P succeeds |",
             "|---|---:|" + "---|" * len(CONTENDERS) + "---:|"]
    for kind, per in data["summary"].items():
        cells = []
        for name in CONTENDERS:
            c = per.get(name)
            if c is None:
                cells.append("-")
                continue
            iou = f", IoU {c['iou']:.2f}" if c["iou"] is not None else ""
            cost = f"; {c['seconds_vs_dense']:.2f}x s, {c['macs_vs_dense']:.2f}x MACs" if name != "dense" else ""
            cells.append(f"{c['success']:.0%}{iou}{cost}")
        where = per["ours_detected_where_p2p_succeeds"]
        lines.append(f"| {kind} | {per['cases']} | " + " | ".join(cells) +
                     f" | {'-' if where is None else f'{where:.0%}'} |")
    lines += ["", "PSNR (dB) / SSIM outside the objects against the source; PSNR of ours against P2P dense in the "
              "edit's mask (the detected one, or the user's) and in its region (the mask with its halo, in blocks; "
              "for a user's mask the mask itself), and against the same edit unaccelerated (every step after the "
              "control steps dense; what the sparse steps alone change; not run with sparse steps under control) "
              "(dB):", "",
              "| type | " + " | ".join(CONTENDERS) + " | ours detected vs P2P, mask / region | ours GT vs P2P "
              "| ours detected vs unaccelerated |",
              "|---|" + "---:|" * (len(CONTENDERS) + 3)]
    fmt = lambda v, digits=1: "-" if v is None else f"{v:.{digits}f}"  # noqa: E731
    for kind, per in data["summary"].items():
        cells = [f"{fmt(per[name]['psnr_outside'])} / {fmt(per[name]['ssim_outside'], 3)}" if name in per else "-"
                 for name in CONTENDERS]
        detected = per["ours_detected"]
        vs = [f"{fmt(detected['psnr_vs_p2p_in_mask'])} / {fmt(detected['psnr_vs_p2p_in_region'])}",
              fmt(per["ours_gt"]["psnr_vs_p2p_in_region"]) if "ours_gt" in per else "-",
              fmt(detected["psnr_vs_unaccelerated_in_region"])]
        lines.append(f"| {kind} | " + " | ".join(cells + vs) + " |")
    identical = all(per[name]["latents_outside_identical"] for per in data["summary"].values()
                    for name in ("ours_detected", "ours_gt") if name in per)
    lines += ["", f"Our edits' latents outside their region equal the source's bit for bit in every case: "
              f"{identical}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-type", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--deepcache-interval", type=int, default=3)
    parser.add_argument("--types", default=",".join(edit_suite.EDIT_TYPES))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a policy field for our edits and P2P dense (e.g. mask_dilation=2); repeatable; the "
                        "results are named by it")
    parser.add_argument("--pictures", help="folder for one picture per type: its first case whose source shows "
                        "the objects (source | ours, detected | region | dense regeneration)")
    args = parser.parse_args(argv)
    pictured: set[str] = set()
    torch.manual_seed(0)
    pipe = load_shapes_pipeline()
    pipe.set_progress_bar_config(disable=True)
    overrides = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.set)}
    runner = Runner(pipe, args.steps, args.guidance, args.deepcache_interval, overrides)
    cases = edit_suite.edit_cases(args.per_type, args.seed, tuple(args.types.split(",")))
    rows, skipped, start = [], 0, time.perf_counter()
    for n, case in enumerate(cases):
        picture = None
        if args.pictures and case.type not in pictured:
            picture = Path(args.pictures) / f"{case.type}.png"
            picture.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            row = run_case(runner, case, pipe.vae_scale_factor, picture)
        if row is None:
            skipped += 1
        else:
            rows.append(row)
            if picture is not None:
                pictured.add(case.type)
        print(f"[{n + 1}/{len(cases)}] {case.type}: {case.source_prompt!r} -> {case.edited_prompt!r}: "
              + (", ".join(f"{k} {'ok' if row[k]['success'] else 'no'}" for k in CONTENDERS if k in row)
                 if row else "source misses an object"), f"({time.perf_counter() - start:.0f} s)", flush=True)
    data = {"machine": machine(), "steps": args.steps, "guidance": args.guidance, "per_type": args.per_type,
            "deepcache_interval": args.deepcache_interval,
            "seed": args.seed, "drawn": len(cases), "skipped": skipped, "policy_overrides": overrides,
            "summary": summarise(rows), "cases": rows}
    types = args.types.split(",")
    subset = [] if set(types) == set(edit_suite.EDIT_TYPES) else ["-".join(types)]
    name = "_".join(["edit-quality", *subset, *(f"{k}-{v}" for k, v in overrides.items())])
    write_results(args.out, name, data, markdown(data))
    if args.pictures and pictured:
        short = lambda prompt: prompt.removesuffix(" on a gray background")  # noqa: E731
        strips = [(Path(args.pictures) / row["picture"],
                   f"{row['type']}: {short(row['source'])} -> {short(row['edit'])}")
                  for row in rows if "picture" in row]
        contact_sheet(strips).save(Path(args.pictures) / "edits.png")
    return data


def contact_sheet(strips: list[tuple[Path, str]], keep: tuple[int, ...] = (0, 1, 3), scale: float = 0.5
                  ) -> Image.Image:
    """One picture of several `side_by_side` strips, one per row: their panels `keep` (source, ours, dense
    regeneration), at `scale`, each row under its caption."""
    from PIL import ImageDraw

    rows, caption_height = [], 14
    for path, caption in strips:
        strip = Image.open(path).convert("RGB")
        panel = (strip.width + PANEL_GAP) // len(SIDE_BY_SIDE_LABELS)  # a panel and the gap after it
        cells = [strip.crop((i * panel, 0, i * panel + panel - PANEL_GAP, strip.height)) for i in keep]
        row = Image.new("RGB", (len(cells) * panel, strip.height), (255, 255, 255))
        for i, cell in enumerate(cells):
            row.paste(cell, (i * panel, 0))
        row = row.resize((round(row.width * scale), round(row.height * scale)), Image.LANCZOS)
        captioned = Image.new("RGB", (row.width, row.height + caption_height), (255, 255, 255))
        ImageDraw.Draw(captioned).text((2, 1), caption, fill=(0, 0, 0))
        captioned.paste(row, (0, caption_height))
        rows.append(captioned)
    sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), (255, 255, 255))
    top = 0
    for row in rows:
        sheet.paste(row, (0, top))
        top += row.height
    return sheet


if __name__ == "__main__":
    main()
