"""Measuring tools above the kernels: `calibrate` measures a device's sparse-layer costs for the cost model."""

from .calibrate import CHANNELS, calibrate

__all__ = ["CHANNELS", "calibrate"]
