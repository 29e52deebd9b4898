"""Safetensors files read into one allocation (or mapped) and written one tensor at a time (the record cache's step
files).

`safetensors.safe_open` allocates every tensor it reads on its own, and `safetensors.torch.save_file` needs every
tensor contiguous at once; a step of SD 2 at 768x768 is 0.87 GiB in a few hundred tensors. The files are standard
safetensors files: `safe_open` reads what `write_safetensors` writes, and `read_safetensors` reads any file whose
tensors are of the dtypes below.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from pathlib import Path
from typing import Any

import torch

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write CPU `tensors` as a safetensors file, one tensor at a time: a non-contiguous tensor is copied on its
    own while it is written (`safetensors.torch.save_file` needs them all contiguous at once). Tensors are laid
    out by decreasing element size, so that each starts aligned for its dtype. The file is written next to `path`
    and renamed over it when complete: a file that exists is never modified in place (`map_safetensors` may have
    it mapped), and a crash never leaves a partial file under the final name."""
    path = Path(path)
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
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            f.write(len(encoded).to_bytes(8, "little"))
            f.write(encoded)
            for name in order:
                f.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _header(f, size: int) -> tuple[dict, int]:
    """The header of the safetensors file open as `f` (of `size` bytes), and where its data starts."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise ValueError("truncated: no header")
    header_len = int.from_bytes(prefix, "little")
    if header_len > size - 8:
        raise ValueError("truncated: the header runs past the end of the file")
    return json.loads(f.read(header_len)), 8 + header_len


def _views(slab: torch.Tensor, header: dict, base: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a safetensors `header` as views of `slab` (the file's data, which starts `base` bytes into an
    allocation aligned for every dtype), and the metadata."""
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
        if (base + begin) % dtype.itemsize:  # not aligned for its dtype (safetensors writers align; others may not)
            part = part.clone()
        tensors[name] = part.view(dtype).view(entry["shape"])
    return tensors, metadata


def read_safetensors(path: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file read with one `readinto` into one uint8 CPU tensor (the slab): the file's tensors as views
    of it, and the file's metadata. (`safetensors.safe_open` allocates each tensor on its own.) ValueError for a
    file that is not a complete safetensors file."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        header, start = _header(f, size)
        slab = torch.empty(size - start, dtype=torch.uint8)
        if f.readinto(memoryview(slab.numpy())) != slab.numel():
            raise ValueError("truncated while reading")
    tensors, metadata = _views(slab, header, 0)
    return slab, tensors, metadata


def map_safetensors(path: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, str]]:
    """`read_safetensors` without the copy: the file memory-mapped copy-on-write (the tensors may be modified; the
    file is not), its pages read in and mapped now, by reading a byte of each (this call, not the first use, waits
    for the disk; `MAP_POPULATE` would copy every page of a writable mapping). The slab (the file's data) keeps the
    mapping; the file may be removed or replaced meanwhile, but must not be modified in place
    (`write_safetensors` never does). Where memory maps are not available copy-on-write, it reads the file like
    `read_safetensors`."""
    if not hasattr(mmap, "MAP_PRIVATE"):
        return read_safetensors(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header, start = _header(f, size)
        if size == start:  # an empty data section cannot be mapped
            return read_safetensors(path)
        mapped = mmap.mmap(f.fileno(), size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_WILLNEED)  # read ahead, in the background
    whole = torch.frombuffer(mapped, dtype=torch.uint8)
    whole[::mmap.PAGESIZE].max()  # a read of every page: read faults map the file's pages, no copy
    slab = whole[start:]
    tensors, metadata = _views(slab, header, start)
    return slab, tensors, metadata
