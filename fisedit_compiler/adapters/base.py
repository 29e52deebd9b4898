"""The model adapter: everything the compiler knows about one model family, declared in one small object.

An adapter says which of the model's inputs carry pixels and in what layout, how the model is called and its
output wrapped, and how wide its feature maps are per resolution (for the cost model). The passes read only what
`capture` writes on the graph's inputs from the adapter (`ir.INPUT`), so a new family (a
ControlNet, an SD3 or FLUX transformer) is a new adapter, not a change to the passes.

    @register_adapter
    class MyAdapter(ModelAdapter):
        model_classes = ("MyModel",)          # matched by class name along the model's MRO
        latents = "sample"                    # the argument holding the latents (an NCHW map)
        pixel_maps = frozenset({"residuals"}) # other NCHW maps, one tensor or a (nested) tuple of them
        conditions = frozenset({"timestep", "encoder_hidden_states"})  # inputs without pixels

`compile()` refuses a model with no adapter, and a model whose `forward` requires an input its adapter does not
declare; a record or sparse call refuses any undeclared input it is given (both errors name the model and input).
Dict inputs of per-call options (`options`: `cross_attention_kwargs`) are taken with the keys declared and refused
with any other. What a call's graph bakes in (its options' values, the model's LoRA and IP-Adapter state) is its
`settings` (`adapters/settings.py`): a record is only replayed under the settings it was made with.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, ClassVar

import torch
from torch import nn

from ..ir import InputLayout, SpatialLayout
from ..ir.signature import Settings, input_settings
from .settings import model_settings


class UnsupportedModelError(TypeError):
    """A model that no adapter declares, or an input of a model that its adapter does not know."""


def _map_layout(value: torch.Tensor, path: str, model: str) -> SpatialLayout:
    if value.dim() != 4:
        raise UnsupportedModelError(
            f"{model} input {path} carries pixels as an NCHW map, so it must be 4-D; got shape {tuple(value.shape)}"
        )
    return SpatialLayout("map", (value.shape[2], value.shape[3]), (2, 3), tuple(value.shape))


def _batched(value: Any, batch: int) -> Any:
    """A pixel map of batch 1 given with latents of batch `batch` > 1, repeated to that batch: a gather takes each
    batch item's blocks."""
    if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[0] == 1 and batch > 1:
        return value.expand(batch, *value.shape[1:]).contiguous()
    return value


class ModelAdapter:
    """Base class of the adapters; see the module docstring. One instance wraps one model."""

    model_classes: ClassVar[tuple[str, ...]] = ()
    latents: ClassVar[str] = "sample"
    timestep: ClassVar[str | None] = "timestep"  # None: one call per image (a VAE decoder), keyed as timestep 0
    pixel_maps: ClassVar[frozenset[str]] = frozenset()
    text: ClassVar[str | None] = None  # the prompt's embedding, whose cross-attention maps control calls inject
    conditions: ClassVar[frozenset[str]] = frozenset()
    refused: ClassVar[Mapping[str, str]] = {}  # inputs that record and sparse calls refuse when given, and why
    # dict inputs of options that record and sparse calls take, with the keys they take and their defaults (others
    # are refused; a default value is dropped): diffusers' `cross_attention_kwargs={"scale": s}`, a LoRA scale
    options: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    # The module whose output says where a picture's objects are (a U-Net's mid block), which control calls of a
    # word swap take from the source run (`passes/tap_layout_features.py`); None: the layout is never held.
    layout_module: ClassVar[str | None] = None

    def __init__(self, model: nn.Module):
        self.model = model
        self.signature = inspect.signature(model.forward)
        self.check_signature()

    @property
    def model_name(self) -> str:
        return type(self.model).__name__

    def known(self, name: str) -> bool:
        return (name == self.latents or name in self.pixel_maps or name in self.conditions or name in self.options
                or name == "return_dict")

    def check_signature(self) -> None:
        """Compile time: every input that `forward` requires is declared, and so are the latents."""
        parameters = self.signature.parameters
        if self.latents not in parameters:
            raise UnsupportedModelError(
                f"{self.model_name}.forward has no {self.latents!r} argument, which {type(self).__name__} expects "
                "to hold the latents"
            )
        for name, p in parameters.items():
            required = p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            if required and not self.known(name) and name not in self.refused:
                raise UnsupportedModelError(
                    f"{self.model_name}.forward requires input {name!r}, which {type(self).__name__} does not "
                    "declare (as latents, pixel maps or a condition without pixels): extend the adapter"
                )

    def bind(self, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """A call's inputs by name (None dropped, the timestep a tensor) and its `return_dict`."""
        bound = self.signature.bind(*args, **kwargs)
        arguments: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise UnsupportedModelError(f"{self.model_name} was called with extra positional inputs")
            else:
                arguments[name] = value
        return_dict = arguments.pop("return_dict", True)
        inputs = {}
        for name, value in arguments.items():
            if value is None:
                continue
            if name in self.refused:
                if isinstance(value, torch.Tensor) or value:  # an empty dict of options is no option
                    raise NotImplementedError(f"{self.model_name} input {name!r} in record() or sparse() calls: "
                                              f"{self.refused[name]}")
                continue
            if name in self.options:
                value = self.check_options(name, value)
                if not value:
                    continue
            if not self.known(name):
                raise UnsupportedModelError(
                    f"{self.model_name} was called with input {name!r}, which {type(self).__name__} does not "
                    "declare: fisedit cannot tell whether it carries pixels"
                )
            inputs[name] = value
        latents = inputs[self.latents]
        timestep = inputs.get(self.timestep) if self.timestep is not None else None
        if timestep is not None and not isinstance(timestep, torch.Tensor):
            inputs[self.timestep] = torch.tensor(timestep, device=latents.device)
        for name in self.pixel_maps & inputs.keys():  # one map for every batch item: as the model broadcasts it
            inputs[name] = torch.utils._pytree.tree_map(functools.partial(_batched, batch=latents.shape[0]),
                                                        inputs[name])
        return inputs, return_dict

    def check_options(self, name: str, value: Any) -> dict[str, Any]:
        """An options input: a dict whose keys are among those the adapter takes (`options[name]`), without the ones
        at their default value (a call with `{"scale": 1.0}` is a call without: the same graph and record)."""
        if not isinstance(value, Mapping):
            raise TypeError(f"{self.model_name} input {name!r} is a dict of options, got {type(value).__name__}")
        unknown = sorted(set(value) - set(self.options[name]))
        if unknown:
            taken = ", ".join(repr(k) for k in sorted(self.options[name]))
            raise NotImplementedError(
                f"{self.model_name} input {name!r} with key(s) {', '.join(map(repr, unknown))} in record() or sparse() "
                f"calls: only {taken} is supported (a LoRA scale); other attention processor arguments (IP-Adapter "
                "masks, custom processors' options) are not"
            )
        defaults = self.options[name]
        return {key: v for key, v in value.items() if isinstance(v, torch.Tensor) or v != defaults[key]}

    def settings(self, inputs: dict[str, Any]) -> Settings:
        """What a call's graph bakes in: its non-tensor inputs (option values, flags) and the model's LoRA and
        IP-Adapter state (`adapters/settings.py`)."""
        return input_settings(inputs) + model_settings(self.model)

    def input_layouts(self, inputs: dict[str, Any]) -> list[InputLayout]:
        """The layout of every flattened input, in `torch.utils._pytree` order (that of the captured graph's
        placeholders)."""
        flat, _ = torch.utils._pytree.tree_flatten_with_path(inputs)
        result = []
        for path, value in flat:
            name, where = path[0].key, torch.utils._pytree.keystr(path)
            if not isinstance(value, torch.Tensor) or not (name == self.latents or name in self.pixel_maps):
                result.append(InputLayout(where, None, text=name == self.text and isinstance(value, torch.Tensor)))
            else:
                result.append(InputLayout(where, self.pixel_layout(name, value, where, inputs), name == self.latents))
        return result

    def pixel_layout(self, name: str, value: torch.Tensor, path: str, inputs: dict[str, Any]) -> SpatialLayout:
        """The layout of an input with pixels (`path` in the flattened inputs): an NCHW map by default."""
        return _map_layout(value, path, self.model_name)

    def step_timestep(self, inputs: dict[str, Any]) -> torch.Tensor:
        """The timestep that keys a call's record: the timestep input, or 0 for a model without one."""
        if self.timestep is None:
            return torch.zeros((), device=inputs[self.latents].device)
        return inputs[self.timestep]

    def call(self, inputs: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """Run the model on bound inputs; a tuple whose first item is the model's prediction."""
        return self.model(**inputs, return_dict=False)

    def wrap_output(self, outputs: tuple[torch.Tensor, ...], return_dict: bool) -> Any:
        """What the model itself would return for `outputs` (from `call` or a variant); the base returns them."""
        return outputs

    def latent_shape(self, inputs: dict[str, Any]) -> tuple[int, ...]:
        """The shape of the latents as masks see them, (B, C, H, W): a record run's, which sparse calls must match."""
        return tuple(inputs[self.latents].shape)

    def mask_extent(self, inputs: dict[str, Any]) -> tuple[int, int]:
        """The (H, W) at latent resolution that the pixel layouts span, of which masks cover the top-left
        `latent_shape(inputs)[-2:]`; the rest (another picture's pixels that the model reads, such as FLUX Kontext's
        reference tokens) is never active. Default: the masks' own."""
        return tuple(self.latent_shape(inputs)[-2:])  # type: ignore[return-value]

    def call_terms(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """What a call's record is made and checked under (`Executor.call`'s `shape`, `extent` and `settings`)."""
        return {"shape": self.latent_shape(inputs), "extent": self.mask_extent(inputs),
                "settings": self.settings(inputs)}

    def output_downscale(self) -> int:
        """The downscale of the map whose active blocks the output recomputes: 1 for a model whose last layers run
        at latent resolution (a U-Net), the patch size for a transformer's tokens."""
        return 1

    def channels(self) -> dict[Fraction, int]:
        """Feature width per downscale factor of the latents (1, 2, 4, ...; 1/2, 1/4, ... for maps finer than the
        latents); empty if unknown (the cost model then uses its widest calibration)."""
        return {}


_ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make `adapter_for` pick `cls` for models of its `model_classes`."""
    _ADAPTERS.append(cls)
    return cls


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The registered adapter of `model`'s class (or of its nearest base class that has one)."""
    for base in type(model).__mro__:
        for cls in reversed(_ADAPTERS):
            if base.__name__ in cls.model_classes:
                return cls(model)
    known = ", ".join(sorted(name for cls in _ADAPTERS for name in cls.model_classes))
    raise UnsupportedModelError(
        f"fisedit has no adapter for {type(model).__name__} (adapters exist for: {known}). Pass "
        "`adapter=` to fisedit.compile for a module that is called like one of those, or write a ModelAdapter "
        "(fisedit_compiler/adapters/) for its family"
    )
