"""The intermediate representation the passes, the runtime and the kernels share, below all of them.

- `graph`: what annotates a captured graph: where a tensor's spatial dims are (`SpatialLayout`), what the cache
  holds (`CacheRef`), the model's inputs (`InputLayout`) and the node meta keys.
- `index`: the gather geometries of the sparse variant (`WindowSpec` and its kinds), the active blocks of a
  resolution (`BlockLayout`) and the index tensors of a gather (`GatherIndex`), which `runtime.mask_plan` builds
  per mask and the kernels read.
- `ops`: the op vocabulary of IR graphs (`gather_windows`, `scatter_into_recorded`, ...: what the passes insert and
  recognise), declared by signature; the runtime registers how each is lowered (`runtime.ops.register_lowering`).

Everything of `graph` and `index` is re-exported here: ``from fisedit_compiler.ir import SpatialLayout,
GatherIndex``; the ops by their module: ``from fisedit_compiler.ir import ops``.
"""

from .graph import (
    ACTIVATION_KINDS,
    INPUT,
    KEY,
    LAYOUT,
    REGION,
    SPARSE,
    CONTROL_KINDS,
    CacheKind,
    CacheRef,
    InputLayout,
    SpatialLayout,
    cache_key,
    concatenated,
    graph_constant,
    latent_input,
    reads_input,
    tensor_meta,
)
from .index import (
    ActivePixels,
    BlockLayout,
    BlockPlan,
    ConvWindows,
    FullImage,
    GatherIndex,
    Resolution,
    Upsampled,
    WindowCoords,
    WindowSpec,
    block_windows,
)
from . import ops

__all__ = [
    "ACTIVATION_KINDS",
    "CONTROL_KINDS",
    "CacheKind",
    "INPUT",
    "KEY",
    "LAYOUT",
    "REGION",
    "SPARSE",
    "ActivePixels",
    "BlockLayout",
    "BlockPlan",
    "CacheRef",
    "ConvWindows",
    "FullImage",
    "GatherIndex",
    "InputLayout",
    "Resolution",
    "SpatialLayout",
    "Upsampled",
    "WindowCoords",
    "WindowSpec",
    "block_windows",
    "cache_key",
    "concatenated",
    "graph_constant",
    "latent_input",
    "ops",
    "reads_input",
    "tensor_meta",
]
