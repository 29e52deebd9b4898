"""Sparse VAE decode: an edit's image decoded around the changed latents against the dense decode (issue 14).

    .venv/bin/python benchmarks/vae_decode.py                       # SD's VAE, 512x512 (64x64 latents), fp32
    .venv/bin/python benchmarks/vae_decode.py --size tiny --latent-size 16 --repeats 1 --out /tmp/v   # a smoke run

One process, seeded random weights (`models.random_vae`, the real SD VAE architecture with `--size full`): the
eager decoder on source latents (dense), the compiled decoder recording that decode, then per mask the latents
redrawn inside the mask and decoded three ways: dense (eager), sparse (`decoder.sparse(mask)`, replaying the
record) — MACs, median seconds, the share of the image's pixels recomputed, PSNR of the sparse decode against the
dense one inside the mask, and whether the pixels outside the recomputed region are the recorded image's, bit for
bit. Writes `<out>/vae-decode_<arch>-<size>-<latent>.{json,md}`.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import fisedit_compiler as fisedit
from fisedit_compiler.editing.decoding import decoder_policy
from fisedit_compiler.editing.masks import ellipse_mask
from fisedit_compiler.macs import count_macs
from fisedit_compiler.models import random_vae

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling results_io, also when a test imports this file
from results_io import allocator_note, machine, set_up_allocator, write_results  # noqa: E402


def _seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2) over the pixels `where`."""
    error = ((a - b)[..., where].float() ** 2).mean().item()
    return math.inf if error == 0 else 10 * math.log10(4 / error)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15", choices=("sd15", "sd2", "sdxl"))
    parser.add_argument("--size", default="full", choices=("full", "tiny"))
    parser.add_argument("--latent-size", type=int, default=64)
    parser.add_argument("--masks", default="5,15,30", help="ellipse masks, percent of the latents")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--halo", type=int, default=fisedit.Policy().halo)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    set_up_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = args.latent_size
    vae = random_vae(args.arch, args.size, seed=0, sample_size=8 * n)
    policy = decoder_policy(fisedit.Policy(halo=args.halo))  # as an EditSession's decoder runs
    decoder = fisedit.compile(vae.decoder, policy)
    source = torch.randn(1, 4, n, n, generator=torch.Generator().manual_seed(0))
    other = torch.randn(1, 4, n, n, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        z = vae.post_quant_conv(source)
        dense_macs, image = count_macs(vae.decoder, z)
        dense_seconds = _seconds(lambda: vae.decoder(z), args.repeats)
        start = time.perf_counter()
        with decoder.record():
            recorded = decoder(z)
        first_record = time.perf_counter() - start  # captures and compiles the variants
        record_bytes = decoder.cache.nbytes  # one decode's (the timed record calls below add occurrences)
        with decoder.record():
            record_seconds = _seconds(lambda: decoder(z), args.repeats)
        if not torch.equal(recorded, image):
            raise AssertionError("the recorded decode differs from the eager decoder's")
        rows = []
        for percent in (float(p) for p in args.masks.split(",")):
            mask = ellipse_mask(n, percent / 100, exact=True)
            edited = vae.post_quant_conv(torch.where(mask, other, source))
            dense = vae.decoder(edited)
            with decoder.sparse(mask):
                sparse_macs, sparse = count_macs(decoder, edited)
                sparse_seconds = _seconds(lambda: decoder(edited), args.repeats)
                region = decoder.current_run.plan.active_pixels(tuple(image.shape[-2:]))
            inside = torch.kron(mask, torch.ones(8, 8, dtype=torch.bool))
            rows.append({
                "mask_percent": percent, "coverage": mask.float().mean().item(),
                "recomputed": region.float().mean().item(),
                "macs": sparse_macs, "macs_ratio": dense_macs / sparse_macs,
                "seconds": sparse_seconds, "speedup": dense_seconds / sparse_seconds,
                "psnr_in_mask": _psnr(sparse, dense, inside),
                "psnr_in_mask_source": _psnr(image, dense, inside),
                "outside_bit_identical": bool(torch.equal(sparse[..., ~region], image[..., ~region])),
            })
    data = {
        "machine": machine(), "arch": args.arch, "size": args.size, "latent_size": n, "image_size": 8 * n,
        "policy": {"halo": policy.halo, "block_size": policy.block_size, "norm_stats": policy.norm_stats},
        "dense": {"macs": dense_macs, "seconds": dense_seconds},
        "record": {"seconds": record_seconds, "first_seconds": first_record, "bytes": record_bytes,
                   "overhead": record_seconds / dense_seconds - 1},
        "masks": rows,
    }
    write_results(args.out, f"vae-decode_{args.arch}-{args.size}-{n}", data, _format(data))
    return data


def _format(data: dict) -> str:
    m, d, r = data["machine"], data["dense"], data["record"]
    lines = [
        f"# Sparse VAE decode: {data['arch']} VAE ({data['size']}), {data['image_size']}x{data['image_size']} "
        f"({data['latent_size']}x{data['latent_size']} latents), fp32",
        "",
        f"{m['date']}, git {m['git']}, torch {m['torch']}, {m['threads']} threads{allocator_note(m)}; policy halo "
        f"{data['policy']['halo']}, block size {data['policy']['block_size'] or 'cost model'}, norm statistics "
        f"{data['policy']['norm_stats']}. Random weights: PSNR figures say how the approximations behave on an "
        "untrained decoder, not on a trained one.",
        "",
        f"Dense decode: {d['macs'] / 1e9:.1f} GMACs, {d['seconds']:.2f} s. Recording it: {r['seconds']:.2f} s "
        f"({100 * r['overhead']:+.0f}%; the first, which compiles: {r['first_seconds']:.1f} s), "
        f"{r['bytes'] / 2**20:.0f} MiB recorded.",
        "",
        "| mask | recomputed pixels | GMACs | MACs ratio | seconds | speed-up | PSNR in mask (dB) | keeping the "
        "source there (dB) | outside bit-identical |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in data["masks"]:
        lines.append(
            f"| ellipse {row['mask_percent']:g}% | {100 * row['recomputed']:.1f}% | {row['macs'] / 1e9:.1f} | "
            f"{row['macs_ratio']:.2f}x | {row['seconds']:.2f} | {row['speedup']:.2f}x | {row['psnr_in_mask']:.1f} | "
            f"{row['psnr_in_mask_source']:.1f} | {row['outside_bit_identical']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
