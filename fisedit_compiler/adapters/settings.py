"""What a captured graph bakes in besides its inputs' shapes: the settings a recorded run is only valid under.

Export runs the model's Python with the values it finds, so a LoRA layer's scale, which adapters are active or merged,
an IP-Adapter's scale and a call's non-tensor inputs (a LoRA `scale` in `cross_attention_kwargs`, a ControlNet's
`conditioning_scale`) become constants of the graph. Two consequences, both handled by `Settings`:

- graphs are captured per settings (the executor keys its variants by them): `pipe.set_adapters(...)` after a record
  run captures anew instead of running a graph with stale scales;
- a record holds the settings it was made under, and a sparse or control call under other settings is refused: its
  output would mix activations of two different models, the recorded ones outside the region and fresh ones inside.

Only models that carry such state are scanned (PEFT layers: diffusers sets `_hf_peft_config_loaded` when LoRA
adapters are loaded; IP-Adapter processors: a U-Net with an IP-Adapter image projection), so a plain model pays
nothing per call. The `Settings` value itself is the IR's (`ir.signature`), beside the input signature.
"""

from __future__ import annotations

import hashlib
from collections import Counter

from torch import nn

from ..ir.signature import Settings


def model_settings(model: nn.Module) -> Settings:
    """The model's LoRA state (PEFT layers: active adapters, their scales, merged or disabled) and IP-Adapter scales;
    empty for a model with neither."""
    entries = []
    if getattr(model, "_hf_peft_config_loaded", False):
        entries.append(("LoRA", _lora_state(model)))
    if type(getattr(model, "encoder_hid_proj", None)).__name__ == "MultiIPAdapterImageProjection":
        scales = [tuple(processor.scale) for processor in model.attn_processors.values()
                  if hasattr(processor, "scale") and type(processor).__name__.startswith("IPAdapter")]
        entries.append(("IP-Adapter scales", _summary(Counter(scales), "scale {} on {} layers")))
    return Settings(tuple(entries))


def _lora_state(model: nn.Module) -> str:
    from peft.tuners.tuners_utils import BaseTunerLayer  # diffusers' PEFT backend: present when layers are

    layers = Counter()
    exact = []
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            if module.disable_adapters:
                state = "disabled"
            else:
                scaling = getattr(module, "scaling", {})
                active = [a for a in module.active_adapters if a not in module.merged_adapters]
                state = ", ".join(f"{a!r} x{scaling.get(a, 1.0):g}" for a in active) or "none active"
                if module.merged_adapters:
                    state += f" (merged: {', '.join(module.merged_adapters)})"
            layers[state] += 1
            exact.append((name, state))
    digest = hashlib.sha1(repr(exact).encode()).hexdigest()[:8]  # which layer has which state
    return f"{_summary(layers, '{} on {} layers')} [{digest}]"


def _summary(counts: Counter, form: str) -> str:
    return ", ".join(form.format(state, n) for state, n in sorted(counts.items(), key=str)) or "none"
