"""What a captured graph is specialised to: its inputs' shapes and dtypes (graphs are captured per signature)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class InputSignature:
    """What a captured graph is specialised to: the shape and dtype of every tensor input, by name."""

    tensors: tuple[tuple[str, tuple[int, ...], torch.dtype, str], ...]

    @staticmethod
    def of(inputs: dict[str, Any]) -> InputSignature:
        flat, _ = torch.utils._pytree.tree_flatten_with_path(inputs)
        entries = []
        for path, value in flat:
            name = torch.utils._pytree.keystr(path)
            if isinstance(value, torch.Tensor):
                entries.append((name, tuple(value.shape), value.dtype, value.device.type))
            else:
                entries.append((name, (), None, repr(value)))
        return InputSignature(tuple(entries))

    def describe(self) -> str:
        return ", ".join(f"{name}{list(shape)}" for name, shape, _, _ in self.tensors)
