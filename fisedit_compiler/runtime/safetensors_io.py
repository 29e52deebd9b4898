"""Safetensors files read into one allocation and written one tensor at a time (the record cache's step files).

`safetensors.safe_open` allocates every tensor it reads on its own, and `safetensors.torch.save_file` needs every
tensor contiguous at once; a step of SD 2 at 768x768 is 1.2 GiB in a few hundred tensors. The files are standard
safetensors files: `safe_open` reads what `write_safetensors` writes, and `read_safetensors` reads any file whose
tensors are of the dtypes below.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write CPU `tensors` as a safetensors file, one tensor at a time: a non-contiguous tensor is copied on its
    own while it is written (`safetensors.torch.save_file` needs them all contiguous at once). Tensors are laid
    out by decreasing element size, so that each starts aligned for its dtype."""
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    order = sorted(tensors, key=lambda name: -tensors[name].element_size())
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in order:
            f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().data)


def read_safetensors(path: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file read with one `readinto` into one uint8 CPU tensor (the slab): the file's tensors as views
    of it, and the file's metadata. (`safetensors.safe_open` allocates each tensor on its own.) ValueError for a
    file that is not a complete safetensors file."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError("truncated: no header")
        header_len = int.from_bytes(prefix, "little")
        if header_len > size - 8:
            raise ValueError("truncated: the header runs past the end of the file")
        header = json.loads(f.read(header_len))
        slab = torch.empty(size - 8 - header_len, dtype=torch.uint8)
        if f.readinto(memoryview(slab.numpy())) != slab.numel():
            raise ValueError("truncated while reading")
    metadata = header.pop("__metadata__", {})
    tensors = {}
    for name, entry in header.items():
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        begin, end = entry["data_offsets"]
        if end > slab.numel():
            raise ValueError(f"truncated: tensor {name!r} ends at byte {end} of data, the file has {slab.numel()}")
        if dtype is None or not 0 <= begin <= end or end - begin != math.prod(entry["shape"]) * dtype.itemsize:
            raise ValueError(f"tensor {name!r}: dtype {entry['dtype']}, shape {entry['shape']} and offsets "
                             f"{begin}..{end} do not fit the file")
        part = slab[begin:end]
        if begin % dtype.itemsize:  # not aligned for its dtype (safetensors writers align; other files may not)
            part = part.clone()
        tensor = part.view(dtype).view(entry["shape"])
        tensors[name] = tensor
    return slab, tensors, metadata
