"""fisedit-compiler: FISEdit's cached, sparse U-Net calls for text-to-image editing, as a torch.fx compiler.

    import fisedit_compiler as fisedit
    sparse_unet = fisedit.compile(pipe.unet, fisedit.Policy())
    compiled = torch.compile(pipe.unet, backend="fisedit")   # with fisedit.record(compiled): ...
"""

import logging as _logging


class _NoImageProcessorFallbackNotice(_logging.Filter):
    """Drops transformers' notice that its image processors fall back to PIL without torchvision, which importing
    diffusers' Stable Diffusion pipelines prints twice: the project uses no image processor (no safety checker).
    Installed before the imports below, which import those pipelines."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


_logging.getLogger("transformers.utils.import_utils").addFilter(_NoImageProcessorFallbackNotice())

from .adapters import (  # noqa: E402
    ControlNetAdapter,
    FluxTransformerAdapter,
    ModelAdapter,
    SD3TransformerAdapter,
    UNet2DConditionAdapter,
    UnsupportedModelError,
    register_adapter,
)
from .backend import GraphBreakError, backend, record, sparse  # noqa: E402
from .compiler import CompiledUNet, MaskError, compile  # noqa: E402
from .editing.session import EditResult, EditSession  # noqa: E402
from .passes.find_sparse_regions import UnsupportedOpError  # noqa: E402
from .policy import Policy  # noqa: E402
from .runtime.cache import SettingsMismatchError, StepNotRecordedError  # noqa: E402

__all__ = [
    "compile", "CompiledUNet", "Policy", "EditSession", "EditResult", "MaskError", "StepNotRecordedError",
    "SettingsMismatchError",
    "UnsupportedOpError", "backend", "record", "sparse", "GraphBreakError", "ModelAdapter", "UNet2DConditionAdapter",
    "SD3TransformerAdapter", "FluxTransformerAdapter", "ControlNetAdapter", "UnsupportedModelError", "register_adapter",
]
