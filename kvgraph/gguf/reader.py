"""Open and validate a GGUF file: header, key/value metadata and tensor descriptors.

kvgraph parses the GGUF container itself instead of going through `gguf.GGUFReader`, for two reasons:

* speed: `GGUFReader` builds a numpy view per string, so opening Gemma3 (a 262k-token vocabulary) took
  ~25 s; a tight `struct.unpack_from` + slice loop over the memory-mapped file takes a fraction of a second;
* robustness: every length and count in the file is checked against the bytes that remain *before*
  anything is allocated or looped over, so a hostile file (an array of 2^40 entries, a 2^60-byte string,
  overlapping or out-of-file tensor data) fails at once with one clear `GGUFError`.

The `gguf` package still supplies what it is good at, the dequantizers (`gguf.quants.dequantize`); the
format's type numbers are in `types.py` (checked against gguf's by a test). `TensorInfo.data` is a
read-only `np.memmap` view shaped as `GGUFReader` shapes it: typed elements for F32/F16/F64/I8..I64,
`(rows..., bytes_per_row)` uint8 else.

Layout (little-endian): b'GGUF', u32 version, u64 tensor_count, u64 kv_count; kv_count x (string key,
u32 value type, value); tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml type, u64 offset);
then the data section at the next multiple of `general.alignment` (default 32). A string is u64 length +
UTF-8 bytes; an array is u32 element type + u64 count + elements (arrays may nest).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import GGUFError, UnsupportedModelError
from . import types as _V

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# Tensor types kvgraph can dequantize (through gguf.quants) and that its tests cover.
SUPPORTED_TENSOR_TYPES = frozenset(
    {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
)

DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8

# Scalar value types: struct format (for single values) and numpy dtype (for arrays).
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    int(t): (struct.Struct("<" + c), np.dtype("<" + c))
    for t, c in [(_V.UINT8, "B"), (_V.INT8, "b"), (_V.UINT16, "H"), (_V.INT16, "h"), (_V.UINT32, "I"),
                 (_V.INT32, "i"), (_V.FLOAT32, "f"), (_V.BOOL, "B"), (_V.UINT64, "Q"), (_V.INT64, "q"),
                 (_V.FLOAT64, "d")]
}
_STRING, _ARRAY, _BOOL, _UINT32 = _V.STRING, _V.ARRAY, _V.BOOL, _V.UINT32
# The fewest bytes one array element of each type takes: bounds a claimed count by the bytes left.
_MIN_ELEM_BYTES = {**{t: s.size for t, (s, _) in _SCALARS.items()}, _STRING: 8, _ARRAY: 12}
_MIN_KV_BYTES = 8 + 4 + 1  # key length (empty key), value type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length (empty name), n_dims, one dim, type, offset
_HEADER = struct.Struct("<4sIQQ")
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")

# Element dtypes of the types GGUFReader exposes as typed arrays; every other type is exposed as raw bytes.
_TYPED_DATA = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
               "I32": np.int32, "I64": np.int64}
_PAGE = mmap.PAGESIZE
_FIX = "The file is corrupt or truncated; re-download it (or re-convert the model with a current llama.cpp)."


def same_shape(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """Whether two numpy-order shapes are the same tensor shape as ggml sees it (`ggml_are_same_shape`, and
    llama.cpp's check of a file's tensors): equal once both are padded to GGML_MAX_DIMS with ones. ggml's
    `ne` is the reverse of numpy's order and llama-quantize writes a tensor's `ne` without its trailing ones
    (`ggml_n_dims`), so numpy shapes may differ only by LEADING ones: (1536,) is (1, 1536), never (1536, 1)."""
    a, b = tuple(a), tuple(b)
    n = max(len(a), len(b))
    return (1,) * (n - len(a)) + a == (1,) * (n - len(b)) + b


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

    def reshaped(self, shape: tuple[int, ...]) -> "TensorInfo":
        """The tensor seen with shape, which must be the same shape as its own up to leading ones
        (`same_shape`): a file that llama-quantize wrote without trailing ggml dimensions of one, presented
        with the dimensions its architecture names. A view of the same memory-mapped bytes."""
        shape = tuple(shape)
        assert same_shape(shape, self.shape), (shape, self.shape)
        # quantized data is (rows..., bytes_per_row); the row length, last, is the same in both shapes
        view = shape if self.type_name in _TYPED_DATA else (*shape[:-1], self.data.shape[-1])
        return TensorInfo(self.name, self.type_name, shape, self.n_bytes, self.data.reshape(view))


def _corrupt(path: Path, what: str) -> GGUFError:
    return GGUFError(f"{path}: {what}. {_FIX}")


class _Parser:
    """A cursor over the memory-mapped file that checks every read against the end of the file."""

    def __init__(self, path: Path, mm: np.memmap):
        self.path, self.mm, self.buf, self.pos = path, mm, memoryview(mm), 24
        self.size = len(self.buf)

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

    def array(self, what: str, depth: int) -> Any:
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
            return [_loaded(self.array(f"{what}[{i}]", depth + 1)) for i in range(count)]
        arr = np.frombuffer(self.buf, dtype=_SCALARS[itype][1], count=count, offset=self.pos)
        self.pos += arr.nbytes
        if itype == _BOOL and count and int(arr.max()) > 1:
            raise self.fail(f"{what} holds a bool that is not 0 or 1")
        lazy = _LazyNumbers(arr, itype == _BOOL)
        return lazy if count >= LAZY_ARRAY_MIN else lazy.load()

    def strings(self, count: int, what: str) -> list[str] | _LazyStrings:
        """`count` strings; a long array (a vocabulary) is only walked here and decoded when it is read."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        done = 0
        try:
            for done in range(count):
                (n,) = unpack(buf, pos)
                if n > size - pos - 8:
                    break
                pos += 8 + n
            else:
                done = count
        except struct.error:
            pass
        if done != count:
            self.pos = pos
            raise self.fail(f"{what}[{done}] runs past the end of the file")
        self.pos, first = pos, self.pos
        lazy = _LazyStrings(self.path, what, self.mm[first:pos], count)
        return lazy if count >= LAZY_ARRAY_MIN else lazy.decode()


LAZY_ARRAY_MIN = 4096   # arrays this long (vocabularies, merges, scores) stay in the file until read


class _LazyStrings:
    """A long string array: its place in the file, walked at open and decoded only when the metadata key is
    read (and not kept: Gemma3's 262k tokens are ~40 MB of Python strings, and only the tokenizer build
    needs them)."""

    def __init__(self, path: Path, what: str, region: np.ndarray, count: int):
        self.path, self.what, self.region, self.count = path, what, region, count

    def __len__(self) -> int:
        return self.count

    def load(self) -> list[str]:
        """The strings, read when the key is; their pages are handed back after (read again, they fault back
        in), so reading a vocabulary after the model has loaded leaves none of the file resident."""
        out = self.decode()
        release_pages(self.region)
        return out

    def decode(self) -> list[str]:
        region, unpack, out, pos = self.region.tobytes(), _U64.unpack_from, [], 0
        append = out.append
        for i in range(self.count):       # the lengths were checked against the region when it was walked
            (n,) = unpack(region, pos)
            pos += 8
            try:
                append(region[pos:pos + n].decode())
            except UnicodeDecodeError:
                raise _corrupt(self.path, f"{self.what}[{i}] is not valid UTF-8") from None
            pos += n
        return out


class _LazyNumbers:
    """A long numeric array: a view of the file, made a list only when read (as `_LazyStrings`)."""

    def __init__(self, values: np.ndarray, as_bool: bool):
        self.values, self.as_bool = values, as_bool

    def __len__(self) -> int:
        return len(self.values)

    def load(self) -> list:
        return (self.values.astype(bool) if self.as_bool else self.values).tolist()


def _loaded(value: Any) -> Any:
    return value.load() if isinstance(value, (_LazyStrings, _LazyNumbers)) else value


# The format's value type names (gguf-py's GGUFValueType, lower-cased), for messages about a key's type.
TYPE_NAMES = {_V.UINT8: "uint8", _V.INT8: "int8", _V.UINT16: "uint16", _V.INT16: "int16", _V.UINT32: "uint32",
              _V.INT32: "int32", _V.FLOAT32: "float32", _V.BOOL: "bool", _V.STRING: "string", _V.ARRAY: "array",
              _V.UINT64: "uint64", _V.INT64: "int64", _V.FLOAT64: "float64"}


class Metadata(Mapping[str, Any]):
    """A file's key -> value metadata as plain Python values. Long arrays are decoded from the file each time
    they are read, so what nobody reads (a benchmark never builds the tokenizer) costs no memory. `gguf_type`
    says how the file stores a value (a plain Python int may have been a uint32 or an int32 there)."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}
        self._types: dict[str, str] = {}

    def gguf_type(self, key: str) -> str | None:
        """The key's value type in the file: 'uint32', 'float32', 'string', ..., or 'array of <element type>'
        ('array of array' for nested ones); None for a key the file does not have."""
        return self._types.get(key)

    def __getitem__(self, key: str) -> Any:
        return _loaded(self._values[key])

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __repr__(self) -> str:
        return f"Metadata({len(self)} keys)"


def gguf_type(md: Mapping[str, Any], key: str) -> str | None:
    """How a file stores the value at key (Metadata.gguf_type); None for a key it lacks, or for metadata that
    did not come from a file (a dict a test built), whose values are then checked by their Python type alone."""
    return md.gguf_type(key) if isinstance(md, Metadata) else None


def array_length(md: Mapping[str, Any], key: str) -> int | None:
    """The length of the array at key (None where there is none), without decoding a long one."""
    value = md._values.get(key) if isinstance(md, Metadata) else md.get(key)
    return len(value) if isinstance(value, (list, _LazyStrings, _LazyNumbers)) else None


def release_pages(arr: np.ndarray) -> None:
    """Drop the resident pages of a read-only memory-mapped array from this process (MADV_DONTNEED).
    The data stays in the page cache and is faulted back in if read again; a no-op for other arrays."""
    mm = getattr(arr, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    base = np.frombuffer(mm, np.uint8) if not mm.closed else None
    if base is None:
        return
    start = arr.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    end = start + arr.nbytes
    del base
    if start < 0 or end > len(mm):
        return
    lo = start // _PAGE * _PAGE
    hi = min(len(mm), -(-end // _PAGE) * _PAGE)
    try:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError):
        pass


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
        self._mm = mm
        p = _Parser(self.path, mm)
        self.metadata = Metadata()
        values, types = self.metadata._values, self.metadata._types
        for i in range(n_kv):
            key = p.string(f"metadata key #{i}")
            if key in self.metadata:
                raise p.fail(f"metadata key {key!r} appears twice")
            vtype = p.u32(f"the value type of {key!r}")
            if key == "general.alignment" and vtype != _UINT32:
                raise _corrupt(self.path, f"general.alignment has value type {vtype}, not uint32 ({_UINT32})")
            elem = _U32.unpack_from(p.buf, p.pos)[0] if vtype == _ARRAY and p.size - p.pos >= 4 else None
            values[key] = p.value(vtype, f"metadata {key!r}")
            types[key] = f"array of {TYPE_NAMES[elem]}" if vtype == _ARRAY else TYPE_NAMES[vtype]
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
        release_pages(mm[:data_start])    # the header is parsed; long arrays fault their pages back if read

    def _tensor(self, mm: np.memmap, name: str, ne: tuple[int, ...], ggml_type: int, data_start: int, offset: int,
                alignment: int) -> TensorInfo:
        def bad(what: str) -> GGUFError:
            return _corrupt(self.path, f"tensor {name!r} {what}")

        known = _V.ggml_type(ggml_type)
        if known is None:
            raise bad(f"has unknown ggml type {ggml_type}")
        type_name, block, block_bytes = known
        n_elements = int(np.prod(ne, dtype=object))
        if 0 in ne or n_elements >= 2**63:
            raise bad(f"has dimensions {list(ne)} (a zero, or more elements than ggml can count)")
        if ne[0] % block:
            raise bad(f"has row length {ne[0]}, not a multiple of the {type_name} block size {block}")
        if offset % alignment:
            raise bad(f"has data offset {offset}, not a multiple of the alignment {alignment}")
        n_bytes = n_elements // block * block_bytes
        start = data_start + offset
        if start + n_bytes > self.file_size:
            raise bad(f"needs {n_bytes} bytes of data at byte {start}, but the file ends at byte {self.file_size}")
        shape = tuple(reversed(ne))
        dtype = _TYPED_DATA.get(type_name)
        view_shape = shape if dtype else (*shape[:-1], shape[-1] // block * block_bytes)
        data = mm[start : start + n_bytes].view(dtype or np.uint8).reshape(view_shape)
        return TensorInfo(name, type_name, shape, n_bytes, data)

    # ---- metadata helpers -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if arch is not None and not isinstance(arch, str):
            raise _corrupt(self.path, f"metadata key 'general.architecture' is stored as "
                                      f"{self.metadata.gguf_type('general.architecture')}, not as a string")
        if not isinstance(arch, str):
            raise GGUFError(f"{self.path}: metadata has no 'general.architecture'; not a model file.")
        return arch

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def add_view(self, info: TensorInfo) -> None:
        """Present a part of a file tensor under its own name (TensorInfo.row_range); `tensors` stays the
        file's own list."""
        self.views[info.name] = info

    def release_resident(self) -> None:
        """Drop every page of the file this process has resident (they stay in the page cache; whatever is
        read again faults back in). Once the weights are repacked, the file is mostly not read again."""
        release_pages(self._mm)

    def tensor(self, name: str) -> TensorInfo | None:
        """The tensor or view called name (None if there is none)."""
        return self.views.get(name) or self.tensors.get(name)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as a contiguous float32 array in numpy shape."""
        info = self.tensor(name)
        if info.type_name == "F32":
            arr = np.asarray(info.data, dtype=np.float32)
        else:
            arr = _V.dequantize(info.data, info.type_name).astype(np.float32, copy=False)
        return np.ascontiguousarray(arr.reshape(info.shape))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Just the metadata of a GGUF file as plain Python values (strings, ints, floats, bools, lists)."""
    return dict(GGUFFile(path).metadata)
