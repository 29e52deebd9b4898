"""What a captured graph is specialised to: its inputs' shapes and dtypes (graphs are captured per signature), and
the settings it bakes in (`Settings`: option values, a model's LoRA state; `adapters.settings` reads a model's)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass(frozen=True)
class InputSignature:
    """What a captured graph is specialised to: the shape, dtype and device type of every tensor input, by name,
    and the value (its repr, no dtype) of every other input."""

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


@dataclasses.dataclass(frozen=True)
class Settings:
    """Named settings, each a readable value: ("LoRA", "adapter 'x' at scale 0.5 on 24 layers [a1b2c3d4]"),
    ("inputs['cross_attention_kwargs']['scale']", "0.5"). Equal settings are equal entries."""

    entries: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        return "; ".join(f"{name} = {value}" for name, value in self.entries) or "no LoRA, adapters or options"

    def difference(self, other: Settings) -> str:
        """What differs between `self` and `other`, one clause per setting: "LoRA: X (recorded) vs Y (now)"."""
        mine, theirs = dict(self.entries), dict(other.entries)
        return "; ".join(f"{name}: {mine.get(name, 'none')} when recorded, {theirs.get(name, 'none')} now"
                         for name in dict.fromkeys([*mine, *theirs]) if mine.get(name) != theirs.get(name))

    def to_json(self) -> list[list[str]]:
        return [list(entry) for entry in self.entries]

    @staticmethod
    def from_json(entries: list[list[str]]) -> Settings:
        return Settings(tuple((str(name), str(value)) for name, value in entries))

    def __add__(self, other: Settings) -> Settings:
        return Settings(self.entries + other.entries)


def input_settings(inputs: dict[str, Any]) -> Settings:
    """The call's non-tensor inputs (options, flags, scales), by their flattened path: the entries without a dtype
    of its `InputSignature`, which holds their values."""
    return Settings(tuple((f"inputs{name}", value) for name, _, dtype, value in InputSignature.of(inputs).tensors
                          if dtype is None))
