"""The GGUF header parser: a file's metadata and tensor table (types and shapes), read without its tensors.

Parsed in pure Python so that an unsupported file is refused before any
tensor is read. `GGUFHeader` has a module of its own because both the tensor
conversion (`reader`) and the config derivation (`hf_config`) take one, and
`reader` imports `hf_config`: here it is below both.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmt_mlx.errors import UserError

# ggml tensor type ids (ggml.h); the names are what users see in llama.cpp.
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0",
    9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K",
    15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S",
    20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16",
    26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16", 34: "TQ1_0",
    35: "TQ2_0", 39: "MXFP4",
}  # fmt: skip

# GGUF metadata value types (gguf spec).
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
    10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_NUMPY_DTYPES = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
    10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip


@dataclass
class GGUFHeader:
    """What a GGUF file declares, read without loading any tensor."""

    version: int
    metadata: dict[str, Any]
    tensor_types: dict[str, str] = field(default_factory=dict)  # name -> ggml type name
    tensor_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # numpy order


class _Reader:
    """Little-endian cursor over a memory-mapped GGUF header."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise UserError(f"truncated GGUF file: {self.path}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise UserError(f"truncated GGUF file: {self.path}")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype == _STRING:
                return [self.string() for _ in range(count)]
            if etype not in _NUMPY_DTYPES:
                raise UserError(f"unsupported GGUF metadata array type {etype} in {self.path}")
            import numpy as np

            dtype = np.dtype(_NUMPY_DTYPES[etype])
            end = self.pos + count * dtype.itemsize
            if end > len(self.buf):
                raise UserError(f"truncated GGUF file: {self.path}")
            arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
            self.pos = end
            return arr.tolist()
        if vtype not in _SCALAR_FORMATS:
            raise UserError(f"unsupported GGUF metadata value type {vtype} in {self.path}")
        return self.unpack(_SCALAR_FORMATS[vtype])


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor table (types and shapes), not its data."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise UserError(f"not a GGUF file (bad magic bytes): {path}")
            r = _Reader(buf, path)
            r.pos = 4
            version = r.unpack("<I")
            if version not in (2, 3):
                raise UserError(f"unsupported GGUF version {version} in {path} (supported: 2, 3)")
            n_tensors, n_kv = r.unpack("<Q"), r.unpack("<Q")
            metadata = {}
            for _ in range(n_kv):
                key = r.string()
                metadata[key] = r.value(r.unpack("<I"))
            header = GGUFHeader(version, metadata)
            for _ in range(n_tensors):
                name = r.string()
                dims = [r.unpack("<Q") for _ in range(r.unpack("<I"))]
                ggml_type = r.unpack("<I")
                r.unpack("<Q")  # data offset: mx.load reads the data
                header.tensor_types[name] = GGML_TYPE_NAMES.get(ggml_type, f"type {ggml_type}")
                header.tensor_shapes[name] = tuple(reversed(dims))  # ggml lists dims fastest-first
            return header
    except (OSError, ValueError) as err:  # ValueError: mmap of an empty file
        raise UserError(f"cannot read GGUF file {path}: {err}") from err
