"""Open and validate a GGUF file: header, key/value metadata and tensor descriptors.

kvgraph parses the GGUF container itself instead of going through `gguf.GGUFReader`, for two reasons:

* speed: `GGUFReader` builds a numpy view per string, so opening Gemma3 (a 262k-token vocabulary) took
  ~25 s; a tight `struct.unpack_from` + slice loop over the memory-mapped file takes a fraction of a second;
* robustness: every length and count in the file is checked against the bytes that remain *before*
  anything is allocated or looped over, so a hostile file (an array of 2^40 entries, a 2^60-byte string,
  overlapping or out-of-file tensor data) fails at once with one clear `GGUFError`.

The `gguf` package still supplies what it is good at: the value/tensor type enums, `GGML_QUANT_SIZES`
and the dequantizers (`gguf.quants.dequantize`). `TensorInfo.data` is a read-only `np.memmap` view shaped
as `GGUFReader` shapes it: typed elements for F32/F16/F64/I8..I64, `(rows..., bytes_per_row)` uint8 else.

Layout (little-endian): b'GGUF', u32 version, u64 tensor_count, u64 kv_count; kv_count x (string key,
u32 value type, value); tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset);
then the data section at the next multiple of `general.alignment` (default 32). A string is u64 length +
UTF-8 bytes; an array is u32 element type + u64 count + elements (arrays may nest).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..errors import GGUFError, UnsupportedModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# Tensor types kvgraph can dequantize (through gguf.quants) and that its tests cover.
SUPPORTED_TENSOR_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)

DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8

_V = gguf.GGUFValueType
# Scalar value types: struct format (for single values) and numpy dtype (for arrays).
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    int(t): (struct.Struct("<" + c), np.dtype("<" + c))
    for t, c in [(_V.UINT8, "B"), (_V.INT8, "b"), (_V.UINT16, "H"), (_V.INT16, "h"), (_V.UINT32, "I"),
                 (_V.INT32, "i"), (_V.FLOAT32, "f"), (_V.BOOL, "B"), (_V.UINT64, "Q"), (_V.INT64, "q"),
                 (_V.FLOAT64, "d")]
}
_STRING, _ARRAY, _BOOL, _UINT32 = int(_V.STRING), int(_V.ARRAY), int(_V.BOOL), int(_V.UINT32)
# The fewest bytes one array element of each type takes: bounds a claimed count by the bytes left.
_MIN_ELEM_BYTES = {**{t: s.size for t, (s, _) in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length (empty key), value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length (empty name), n_dims, one dim, type, offset
_HEADER = struct.Struct("<4sIQQ")
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

_Q = gguf.GGMLQuantizationType
# Element dtypes of the types GGUFReader exposes as typed arrays; every other type is exposed as raw bytes.
_TYPED_DATA = {_Q.F32: np.float32, _Q.F16: np.float16, _Q.F64: np.float64, _Q.I8: np.int8,
               _Q.I16: np.int16, _Q.I32: np.int32, _Q.I64: np.int64}
_FIX = "The file is corrupt or truncated; re-download it (or re-convert the model with a current llama.cpp)."


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the file. `shape` is in numpy order (the reverse of ggml's `ne`)."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_bytes: int
    data: np.ndarray  # read-only memmap view: typed elements (F32/F16/...) or (rows..., bytes_per_row) uint8

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def row_range(self, name: str, start: int, n: int) -> "TensorInfo":
        """Rows [start, start + n) of a 2-D tensor as a tensor of its own: a fused file tensor (Phi-3's
        attn_qkv) seen as the parts an architecture names. A view of the same memory-mapped bytes."""
        return TensorInfo(name, self.type_name, (n,) + self.shape[1:], self.n_bytes // self.shape[0] * n,
                          self.data[start:start + n])


def _corrupt(path: Path, what: str) -> GGUFError:
    return GGUFError(f"{path}: {what}. {_FIX}")


class _Parser:
    """A cursor over the memory-mapped file that checks every read against the end of the file."""

    def __init__(self, path: Path, buf: memoryview):
        self.path, self.buf, self.size, self.pos = path, buf, len(buf), 24

    def fail(self, what: str) -> GGUFError:
        return _corrupt(self.path, f"{what} (at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes but only {self.size - self.pos} remain")

    def u32(self, what: str) -> int:
        self.need(4, what)
        self.pos += 4
        return _U32.unpack_from(self.buf, self.pos - 4)[0]

    def u64(self, what: str) -> int:
        self.need(8, what)
        self.pos += 8
        return _U64.unpack_from(self.buf, self.pos - 8)[0]

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        self.need(n, f"{what} ({n} bytes)")
        try:
            s = str(self.buf[self.pos : self.pos + n], "utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None
        self.pos += n
        return s

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            return self.array(what, depth)
        scalar = _SCALARS.get(vtype)
        if scalar is None:
            raise self.fail(f"{what} has unknown value type {vtype}")
        st = scalar[0]
        self.need(st.size, what)
        (v,) = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        if vtype == _BOOL:
            if v > 1:
                raise self.fail(f"{what} is a bool with byte value {v} (must be 0 or 1)")
            v = bool(v)
        return v

    def array(self, what: str, depth: int) -> list[Any]:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        itype = self.u32(f"the element type of {what}")
        count = self.u64(f"the length of {what}")
        if itype not in _MIN_ELEM_BYTES:
            raise self.fail(f"{what} is an array of unknown value type {itype}")
        self.need(count * _MIN_ELEM_BYTES[itype], f"{what} (an array of {count} elements)")
        if itype == _STRING:
            return self.strings(count, what)
        if itype == _ARRAY:
            return [self.array(f"{what}[{i}]", depth + 1) for i in range(count)]
        arr = np.frombuffer(self.buf, dtype=_SCALARS[itype][1], count=count, offset=self.pos)
        self.pos += arr.nbytes
        if itype == _BOOL:
            if count and int(arr.max()) > 1:
                raise self.fail(f"{what} holds a bool that is not 0 or 1")
            return arr.astype(bool).tolist()
        return arr.tolist()

    def strings(self, count: int, what: str) -> list[str]:
        """`count` strings in one tight loop (Gemma3 has 262k of them)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        try:
            for i in range(count):
                (n,) = unpack(buf, pos)
                pos += 8
                if n > size - pos:
                    break
                append(str(buf[pos : pos + n], "utf-8"))
                pos += n
        except (struct.error, UnicodeDecodeError) as exc:
            self.pos = pos
            bad = "is not valid UTF-8" if isinstance(exc, UnicodeDecodeError) else "runs past the end of the file"
            raise self.fail(f"{what}[{i}] {bad}") from None
        self.pos = pos
        if len(out) != count:
            raise self.fail(f"{what}[{len(out)}] runs past the end of the file")
        return out


class GGUFFile:
    """A validated GGUF file: `metadata` (key -> Python value) and `tensors` (name -> TensorInfo)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise GGUFError(f"{self.path}: no such file. Pass a path to a .gguf file or a known model name.")
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: not a regular file. Pass a path to a .gguf file.")
        try:
            self.file_size = size = self.path.stat().st_size
            if size < _HEADER.size:
                raise GGUFError(f"{self.path}: file is {size} bytes, too small to be GGUF (truncated or not a "
                                "model file). Re-download it, or pass a .gguf model file.")
            mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except OSError as exc:
            raise GGUFError(f"{self.path}: cannot read the file ({exc.strerror or exc}).") from None
        magic, self.version, n_tensors, n_kv = _HEADER.unpack_from(mm[:24])
        if magic != GGUF_MAGIC:
            raise GGUFError(
                f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF'). "
                "Pass a .gguf model file, or a known model name (see `kvgraph models`)."
            )
        if self.version not in SUPPORTED_VERSIONS:
            raise GGUFError(
                f"{self.path}: GGUF version {self.version} is not supported (supported: "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}). Re-convert the model with a current llama.cpp."
            )
        if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > size - _HEADER.size:
            raise GGUFError(
                f"{self.path}: header claims {n_tensors} tensors and {n_kv} metadata entries, more than a "
                f"{size}-byte file can hold; the file is corrupt or truncated. Re-download it."
            )
        p = _Parser(self.path, memoryview(mm))
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = p.string(f"metadata key #{i}")
            if key in self.metadata:
                raise p.fail(f"metadata key {key!r} appears twice")
            vtype = p.u32(f"the value type of {key!r}")
            if key == "general.alignment" and vtype != _UINT32:
                raise _corrupt(self.path, f"general.alignment has value type {vtype}, not uint32 ({_UINT32})")
            self.metadata[key] = p.value(vtype, f"metadata {key!r}")
        raw = [self._read_tensor_info(p, i) for i in range(n_tensors)]
        self.tensors: dict[str, TensorInfo] = {}
        self.views: dict[str, TensorInfo] = {}
        self._build_tensors(p, mm, raw)

    def _read_tensor_info(self, p: _Parser, i: int) -> tuple[str, tuple[int, ...], int, int]:
        name = p.string(f"the name of tensor #{i}")
        n_dims = p.u32(f"the dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise p.fail(f"tensor {name!r} has {n_dims} dimensions (must be 1 to {MAX_DIMS})")
        p.need(8 * n_dims + 12, f"the descriptor of tensor {name!r}")
        ne = struct.unpack_from(f"<{n_dims}Q", p.buf, p.pos)
        ggml_type, offset = struct.unpack_from("<IQ", p.buf, p.pos + 8 * n_dims)
        p.pos += 8 * n_dims + 12
        return name, ne, ggml_type, offset

    def _build_tensors(self, p: _Parser, mm: np.memmap, raw: list[tuple[str, tuple[int, ...], int, int]]) -> None:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):
            raise _corrupt(self.path, f"general.alignment is {alignment}, not a power of two")
        data_start = -(-p.pos // alignment) * alignment
        ranges: list[tuple[int, int, str]] = []  # (start, end, name) of each tensor's data
        for name, ne, ggml_type, offset in raw:
            if name in self.tensors:
                raise _corrupt(self.path, f"tensor {name!r} appears twice")
            info = self.tensors[name] = self._tensor(mm, name, ne, ggml_type, data_start, offset, alignment)
            ranges.append((data_start + offset, data_start + offset + info.n_bytes, name))
        ranges.sort()
        for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
            if start < end:
                raise _corrupt(self.path, f"the data of tensors {a!r} and {b!r} overlap")
        for info in self.tensors.values():
            if info.type_name not in SUPPORTED_TENSOR_TYPES:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {info.name!r} has type {info.type_name}, which kvgraph does not "
                    f"support (supported: {', '.join(sorted(SUPPORTED_TENSOR_TYPES))}). "
                    "Use a file quantized to one of those types."
                )

    def _tensor(self, mm: np.memmap, name: str, ne: tuple[int, ...], ggml_type: int, data_start: int, offset: int,
                alignment: int) -> TensorInfo:
        def bad(what: str) -> GGUFError:
            return _corrupt(self.path, f"tensor {name!r} {what}")

        try:
            qtype = _Q(ggml_type)
        except ValueError:
            raise bad(f"has unknown ggml type {ggml_type}") from None
        n_elements = int(np.prod(ne, dtype=object))
        if 0 in ne or n_elements >= 2**63:
            raise bad(f"has dimensions {list(ne)} (a zero, or more elements than ggml can count)")
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        if ne[0] % block:
            raise bad(f"has row length {ne[0]}, not a multiple of the {qtype.name} block size {block}")
        if offset % alignment:
            raise bad(f"has data offset {offset}, not a multiple of the alignment {alignment}")
        n_bytes = n_elements // block * block_bytes
        start = data_start + offset
        if start + n_bytes > self.file_size:
            raise bad(f"needs {n_bytes} bytes of data at byte {start}, but the file ends at byte {self.file_size}")
        shape = tuple(reversed(ne))
        dtype = _TYPED_DATA.get(qtype)
        view_shape = shape if dtype else (*shape[:-1], shape[-1] // block * block_bytes)
        data = mm[start : start + n_bytes].view(dtype or np.uint8).reshape(view_shape)
        return TensorInfo(name, qtype.name, shape, n_bytes, data)

    # ---- metadata helpers -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata has no 'general.architecture'; not a model file.")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def add_view(self, info: TensorInfo) -> None:
        """Present a part of a file tensor under its own name (TensorInfo.row_range); `tensors` stays the
        file's own list."""
        self.views[info.name] = info

    def tensor(self, name: str) -> TensorInfo | None:
        """The tensor or view called name (None if there is none)."""
        return self.views.get(name) or self.tensors.get(name)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a contiguous float32 array in numpy shape."""
        info = self.tensor(name)
        if info.type_name == "F32":
            arr = np.asarray(info.data, dtype=np.float32)
        else:
            arr = gguf.quants.dequantize(info.data, _Q[info.type_name]).astype(np.float32, copy=False)
        return np.ascontiguousarray(arr.reshape(info.shape))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Just the metadata of a GGUF file as plain Python values (strings, ints, floats, bools, lists)."""
    return GGUFFile(path).metadata
