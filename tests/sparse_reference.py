"""A reference for what a sparse call computes, written without the compiler: the eager U-Net run with forward
hooks that put the recorded activations back outside the active blocks.

The sparse variant computes, at every layer of a sparse resolution, the active blocks of that resolution from
inputs that are fresh on active blocks and recorded elsewhere. Running the eager U-Net on the new inputs and
replacing, after every module whose output has pixels at a sparse resolution, the inactive pixels by that module's
output in the recorded run gives the same values (elementwise ops between modules keep the split, since they map
recorded inputs to the recorded output). GroupNorm with `norm_stats="recorded"` normalises with the recorded run's
statistics; with `norm_stats="fresh"` GroupNorm runs dense (see below). Queries of inactive tokens are computed and thrown away, so self-attention sees keys and values of all
tokens, fresh for active ones and recorded for the rest: the `active_queries` (and `dense`) attention policy.

The active blocks are derived here from the mask and the policy, independently of `MaskPlan`: the mask max-pooled
to the resolution, dilated by the halo (a square of side 2 * halo + 1), rounded up to b x b blocks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import fisedit_compiler as fisedit


def block_size(policy: fisedit.Policy, res: tuple[int, int]) -> int:
    """The fixed block size at `res`: the largest divisor of the map size not above `policy.block_size`."""
    g = math.gcd(*res)
    return max(d for d in range(1, min(policy.block_size, g) + 1) if g % d == 0)


def _dilated(cells: list[list[bool]], halo: int) -> list[list[bool]]:
    h, w = len(cells), len(cells[0])
    return [[any(cells[yy][xx] for yy in range(max(0, y - halo), min(h, y + halo + 1))
                 for xx in range(max(0, x - halo), min(w, x + halo + 1))) for x in range(w)] for y in range(h)]


def active_region(mask: torch.Tensor, res: tuple[int, int], halo: int, block: int, halo_unit: str) -> torch.Tensor:
    """(H, W) bool: the pixels at `res` that a sparse layer computes, with plain loops over cells: the mask pooled to
    `res` and dilated by `halo` cells there, or ("latent_pixels") dilated by `halo` latent pixels and pooled."""
    mask = mask.reshape(-1, *mask.shape[-2:]).any(dim=0)
    lh, lw = mask.shape
    h, w = res
    fy, fx = lh // h, lw // w
    latent = [[bool(v) for v in row] for row in mask.tolist()]
    if halo_unit == "latent_pixels":
        latent = _dilated(latent, halo)
    pooled = [[any(latent[yy][xx] for yy in range(y * fy, (y + 1) * fy) for xx in range(x * fx, (x + 1) * fx))
               for x in range(w)] for y in range(h)]
    dilated = _dilated(pooled, halo) if halo_unit == "cells" else pooled
    region = torch.zeros(h, w, dtype=torch.bool)
    for by in range(0, h, block):
        for bx in range(0, w, block):
            if any(dilated[y][x] for y in range(by, by + block) for x in range(bx, bx + block)):
                region[by:by + block, bx:bx + block] = True
    return region


def _pixels(output: torch.Tensor, regions: dict[tuple[int, int], torch.Tensor]):
    """The active region for `output`'s pixels and how to broadcast it, or None if it has no sparse pixels."""
    if output.dim() == 4 and tuple(output.shape[-2:]) in regions:  # NCHW map
        return regions[tuple(output.shape[-2:])][None, None]
    if output.dim() == 3:  # B x HW x C tokens
        for (h, w), region in regions.items():
            if output.shape[1] == h * w:
                return region.reshape(1, h * w, 1)
    return None


def _group_norm_stats(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grouped = x.reshape(x.shape[0], norm.num_groups, -1).double()
    return grouped.mean(-1, keepdim=True), torch.rsqrt(grouped.var(-1, unbiased=False, keepdim=True) + norm.eps)


@torch.no_grad()
def reference_sparse_call(unet: nn.Module, recorded_inputs: dict, inputs: dict, mask: torch.Tensor,
                          policy: fisedit.Policy) -> torch.Tensor:
    """The output of a sparse call on `inputs` after a record call on `recorded_inputs`, for a fixed block size
    and the `active_queries` or `dense` attention policy."""
    latent = tuple(inputs["sample"].shape[-2:])
    regions = {}
    for level in range(int(math.log2(policy.max_sparse_downscale)) + 1):
        res = (latent[0] >> level, latent[1] >> level)
        regions[res] = active_region(mask, res, policy.halo, block_size(policy, res), policy.halo_unit)

    # Per module, its calls in order: some modules (activations) are called more than once in a forward.
    recorded: dict[nn.Module, list[torch.Tensor]] = {}
    stats: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    calls: dict[nn.Module, int] = {}

    def record(module, args, output):
        recorded.setdefault(module, []).append(output)
        if isinstance(module, nn.GroupNorm):
            stats.setdefault(module, []).append(_group_norm_stats(module, args[0]))

    # With fresh statistics GroupNorm runs dense: its output, and elementwise ops on it up to the next convolution
    # or linear layer, are fresh at every pixel, and the halos of the next layer read them.
    dense: list[torch.Tensor] = []

    def replay(module, args, output):
        call = calls[module] = calls.get(module, -1) + 1
        if not isinstance(output, torch.Tensor):
            return None
        region = _pixels(output, regions)
        if region is None:
            return None
        if policy.norm_stats == "fresh" and (
                isinstance(module, nn.GroupNorm)
                or (isinstance(module, (nn.SiLU, nn.Dropout)) and any(args[0] is t for t in dense))):
            dense.append(output)
            return None
        if isinstance(module, nn.GroupNorm) and policy.norm_stats == "recorded":
            mean, rstd = stats[module][call]
            x = args[0]
            normed = ((x.reshape(x.shape[0], module.num_groups, -1).double() - mean) * rstd).reshape(x.shape)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            output = (normed * module.weight.double().reshape(shape) + module.bias.double().reshape(shape)).to(x.dtype)
        return torch.where(region.to(output.device), output, recorded[module][call])

    def run(hook, kwargs):
        handles = [m.register_forward_hook(hook) for m in unet.modules() if m is not unet]
        try:
            return unet(**kwargs).sample
        finally:
            for handle in handles:
                handle.remove()

    run(record, recorded_inputs)
    return run(replay, inputs)
