"""fisedit-compiler: FISEdit's cached, sparse U-Net calls for text-to-image editing, as a torch.fx compiler.

    import fisedit_compiler as fisedit
    sparse_unet = fisedit.compile(pipe.unet, fisedit.Policy())
    compiled = torch.compile(pipe.unet, backend="fisedit")   # with fisedit.record(compiled): ...
"""

from .adapters import ModelAdapter, UNet2DConditionAdapter, UnsupportedModelError, register_adapter
from .backend import GraphBreakError, backend, record, sparse
from .compiler import CompiledUNet, MaskError, compile
from .editing.session import EditResult, EditSession
from .passes.find_sparse_regions import UnsupportedOpError
from .policy import Policy
from .runtime.cache import StepNotRecordedError

__all__ = [
    "compile", "CompiledUNet", "Policy", "EditSession", "EditResult", "MaskError", "StepNotRecordedError",
    "UnsupportedOpError", "backend", "record", "sparse", "GraphBreakError", "ModelAdapter", "UNet2DConditionAdapter",
    "UnsupportedModelError", "register_adapter",
]
