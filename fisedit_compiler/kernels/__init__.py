"""Kernels of the sparse path, dispatched by device in one place.

`reference` holds plain-PyTorch implementations: the CPU path, and the ground truth other implementations are
tested against. The runtime calls the functions below and never names an implementation.
"""

from __future__ import annotations

from . import reference

gather_pixels = reference.gather_pixels
to_canonical = reference.to_canonical
from_canonical = reference.from_canonical
group_norm_affine = reference.group_norm_affine
group_norm_with_stats = reference.group_norm_with_stats
repeat_over_blocks = reference.repeat_over_blocks
active_query_attention = reference.active_query_attention
