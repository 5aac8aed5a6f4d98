"""Open and validate a GGUF file through `gguf.GGUFReader`.

The `gguf` package does the parsing; this module turns every way a file can be broken into a `GGUFError`
with one clear message, and exposes the file as plain Python metadata plus tensor descriptors.
A cheap header pre-check runs before `GGUFReader`, so absurd counts in a hostile header are rejected
against the file size instead of being trusted.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GGUFError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# Tensor types kvgraph can dequantize (through gguf.quants) and that its tests cover.
SUPPORTED_TENSOR_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)

# The smallest a key/value pair or a tensor descriptor can be on disk; used to bound counts by file size.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, 1-char key, value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, name, n_dims, one dim, type, offset


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is in numpy order (the reverse of ggml's `ne`)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_bytes: int
    data: np.ndarray  # the raw (memory-mapped) bytes or elements as gguf exposes them

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _precheck_header(path: Path, size: int) -> None:
    """Reject a broken header before `GGUFReader` trusts any count in it."""
    if size < 24:
        raise GGUFError(f"{path}: file is {size} bytes, too small to be GGUF (truncated or not a model file).")
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != GGUF_MAGIC:
        raise GGUFError(
            f"{path}: not a GGUF file (magic {head[:4]!r}, expected b'GGUF'). "
            "Pass a .gguf model file, or a known model name (see `kvgraph models`)."
        )
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(
            f"{path}: GGUF version {version} is not supported (supported: "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}). Re-convert the model with a current llama.cpp."
        )
    if n_kv * _MIN_KV_BYTES > size or n_tensors * _MIN_TENSOR_INFO_BYTES > size:
        raise GGUFError(
            f"{path}: header claims {n_tensors} tensors and {n_kv} metadata entries, more than a "
            f"{size}-byte file can hold; the file is corrupt or truncated."
        )


def _field_value(field: Any) -> Any:
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


class GGUFFile:
    """A validated GGUF file: `metadata` (key -> Python value) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike[str]):
        import gguf

        self.path = Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path}: no such file. Pass a path to a .gguf file or a known model name.")
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: not a regular file. Pass a path to a .gguf file.")
        self.file_size = self.path.stat().st_size
        _precheck_header(self.path, self.file_size)
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, KeyError, IndexError, OverflowError, struct.error, UnicodeDecodeError,
                MemoryError, TypeError) as exc:
            raise GGUFError(f"{self.path}: malformed GGUF file ({exc}). The file is corrupt or truncated.") from None
        self.version = int(reader.fields["GGUF.version"].parts[0][0])
        try:
            self.metadata: dict[str, Any] = {
                k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")
            }
        except (ValueError, UnicodeDecodeError, IndexError) as exc:
            raise GGUFError(f"{self.path}: malformed metadata ({exc}).") from None
        self.tensors: dict[str, TensorInfo] = {}
        for t in reader.tensors:
            type_name = t.tensor_type.name
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            self.tensors[t.name] = TensorInfo(t.name, type_name, shape, int(t.n_bytes), t.data)
        self._check_tensor_data()

    def _check_tensor_data(self) -> None:
        import gguf

        for info in self.tensors.values():
            if info.type_name not in SUPPORTED_TENSOR_TYPES:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {info.name!r} has type {info.type_name}, which kvgraph does not "
                    f"support (supported: {', '.join(sorted(SUPPORTED_TENSOR_TYPES))}). "
                    "Use a file quantized to one of those types."
                )
            qtype = gguf.GGMLQuantizationType[info.type_name]
            block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            if info.shape and info.shape[-1] % block:
                raise GGUFError(
                    f"{self.path}: tensor {info.name!r} has row length {info.shape[-1]}, not a multiple of "
                    f"the {info.type_name} block size {block}; the file is corrupt."
                )
            expected = info.n_elements // block * block_bytes
            if info.data.nbytes != expected:
                raise GGUFError(
                    f"{self.path}: tensor {info.name!r} holds {info.data.nbytes} bytes but its shape needs "
                    f"{expected}; the file is truncated or corrupt."
                )

    # ---- metadata helpers -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata has no 'general.architecture'; not a model file.")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a contiguous float32 array in numpy shape."""
        import gguf

        info = self.tensors[name]
        qtype = gguf.GGMLQuantizationType[info.type_name]
        if info.type_name == "F32":
            arr = np.asarray(info.data, dtype=np.float32)
        else:
            arr = gguf.quants.dequantize(info.data, qtype).astype(np.float32, copy=False)
        return np.ascontiguousarray(arr.reshape(info.shape))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Just the metadata of a GGUF file as plain Python values (strings, ints, floats, bools, lists)."""
    return GGUFFile(path).metadata
