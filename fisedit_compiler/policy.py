"""`Policy`: every choice the compiler makes that a user may want to change, with the paper's defaults."""

from __future__ import annotations

import dataclasses
from typing import Literal

AttentionMode = Literal["active_queries", "masked_only", "dense"]
NormStats = Literal["recorded", "fresh"]


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a compiled U-Net runs its sparse calls.

    Attributes:
        max_sparse_downscale: a layer runs sparse when its feature map is at most this many times smaller than
            the latents. The default 4 makes SD 2 at 96x96 latents sparse at 96, 48 and 24 and dense at 12: the
            paper keeps low resolutions dense because a mask pooled down to them covers most of the map.
        halo: dilation of the mask at every resolution, in cells of that resolution. It widens the region that
            is recomputed so that the seam between fresh and recorded activations falls outside the edit.
        block_size: the side of the square blocks that sparse layers compute. At each resolution the largest
            divisor of the map size not above this value is used, so blocks never overhang the map.
        attention: self-attention at sparse resolutions. "active_queries": queries from active tokens, keys and
            values from all tokens (fresh for active ones, recorded for the rest); exact wherever the inactive
            tokens' inputs equal the recorded ones. "masked_only": the paper's variant, active tokens attend to
            active tokens only. "dense": self-attention layers are not made sparse; their inputs are
            materialised at full size and every query is computed.
        norm_stats: GroupNorm statistics in sparse calls. "recorded" (the paper's approximation) reuses the
            source run's mean and variance so that GroupNorm becomes a per-channel affine map on active blocks;
            "fresh" materialises the GroupNorm input and computes the statistics of the current call.
    """

    max_sparse_downscale: int = 4
    halo: int = 1
    block_size: int = 8
    attention: AttentionMode = "active_queries"
    norm_stats: NormStats = "recorded"

    def __post_init__(self) -> None:
        if self.max_sparse_downscale < 1:
            raise ValueError(f"max_sparse_downscale must be >= 1, got {self.max_sparse_downscale}")
        if self.halo < 0:
            raise ValueError(f"halo must be >= 0, got {self.halo}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.attention not in ("active_queries", "masked_only", "dense"):
            raise ValueError(
                f"attention must be 'active_queries', 'masked_only' or 'dense', got {self.attention!r}"
            )
        if self.norm_stats not in ("recorded", "fresh"):
            raise ValueError(f"norm_stats must be 'recorded' or 'fresh', got {self.norm_stats!r}")

    def is_sparse_resolution(self, resolution: tuple[int, int], latent: tuple[int, int]) -> bool:
        """Whether a feature map of `resolution` runs sparse for latents of size `latent`."""
        return all(r * self.max_sparse_downscale >= l for r, l in zip(resolution, latent))
