"""kvgraph's own GGUF parser: exact round trips of every value and tensor type, the same view of a file as
`gguf.GGUFReader`, and hostile files (mutated, truncated, crafted with absurd counts) that must end in a
`KvgraphError` quickly and without big allocations - never another exception or a hang."""
from __future__ import annotations

import struct
import time
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgraph.errors import GGUFError, KvgraphError, UnsupportedModelError
from kvgraph.gguf.reader import GGUFFile, read_metadata

V, Q = gguf.GGUFValueType, gguf.GGMLQuantizationType

SCALARS = [  # (key, value type, value written, value read back)
    ("t.u8", V.UINT8, 255, 255), ("t.i8", V.INT8, -128, -128), ("t.u16", V.UINT16, 65535, 65535),
    ("t.i16", V.INT16, -32768, -32768), ("t.u32", V.UINT32, 2**32 - 1, 2**32 - 1), ("t.i32", V.INT32, -(2**31), -(2**31)),
    ("t.u64", V.UINT64, 2**64 - 1, 2**64 - 1), ("t.i64", V.INT64, -(2**63), -(2**63)),
    ("t.f32", V.FLOAT32, 0.1, float(np.float32(0.1))), ("t.f64", V.FLOAT64, 0.1, 0.1),
    ("t.true", V.BOOL, True, True), ("t.false", V.BOOL, False, False), ("t.str", V.STRING, "héllo ▁ 🙂", "héllo ▁ 🙂"),
]
ARRAYS = [  # (key, element type, values)
    ("a.u8", V.UINT8, [0, 1, 255]), ("a.i8", V.INT8, [-128, 0, 127]), ("a.u16", V.UINT16, [0, 65535]),
    ("a.i16", V.INT16, [-32768, 32767]), ("a.u32", V.UINT32, [0, 2**32 - 1]), ("a.i32", V.INT32, [-(2**31), 7]),
    ("a.u64", V.UINT64, [0, 2**64 - 1]), ("a.i64", V.INT64, [-(2**63), 2**63 - 1]), ("a.f32", V.FLOAT32, [0.5, -2.0, 1e30]),
    ("a.f64", V.FLOAT64, [0.1, -1e300]), ("a.bool", V.BOOL, [True, False, True]), ("a.str", V.STRING, ["", "a", "ü🙂"]),
]
NESTED = [[1, 2], [3]], [["x"], ["y", "z"]]


def write_tiny(path: Path, alignment: int | None = None, nested: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """A small GGUF with every value type and F32/F16/Q8_0/Q4_0 tensors; returns what each tensor holds on disk."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment:
        w.add_custom_alignment(alignment)
    for key, vtype, value, _ in SCALARS:
        w.add_key_value(key, value, vtype)
    for key, vtype, values in ARRAYS:
        w.add_key_value(key, values, V.ARRAY, sub_type=vtype)
    if nested:
        w.add_key_value("a.nested_int", NESTED[0], V.ARRAY)
        w.add_key_value("a.nested_str", NESTED[1], V.ARRAY)
    stored = {"f32": rng.standard_normal((3, 5)).astype(np.float32), "f16": rng.standard_normal((2, 4)).astype(np.float16)}
    for name, arr in stored.items():
        w.add_tensor(name, arr)
    for name, qtype in [("q8", Q.Q8_0), ("q4", Q.Q4_0)]:
        stored[name] = gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), qtype)
        w.add_tensor(name, stored[name], raw_shape=stored[name].shape, raw_dtype=qtype)
    w.add_tensor("vec", np.arange(7, dtype=np.float32))
    stored["vec"] = np.arange(7, dtype=np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("reader") / "tiny.gguf"
    return path, write_tiny(path)


@pytest.mark.parametrize("alignment", [None, 1, 64])
def test_round_trip_every_value_and_tensor_type(tmp_path, alignment):
    path = tmp_path / "rt.gguf"
    stored = write_tiny(path, alignment)
    gf = GGUFFile(path)
    assert gf.version == 3 and gf.file_size == path.stat().st_size and gf.architecture == "llama"
    md = gf.metadata
    for key, _, _, expected in SCALARS:
        assert md[key] == expected and type(md[key]) is type(expected), key
    for key, vtype, values in ARRAYS:
        expected = [float(np.float32(v)) for v in values] if vtype == V.FLOAT32 else values
        assert md[key] == expected and [type(v) for v in md[key]] == [type(v) for v in expected], key
    assert md["a.nested_int"] == NESTED[0] and md["a.nested_str"] == NESTED[1]
    assert read_metadata(path) == md
    types = {"f32": "F32", "f16": "F16", "q8": "Q8_0", "q4": "Q4_0", "vec": "F32"}
    assert {n: t.type_name for n, t in gf.tensors.items()} == types
    for name, raw in stored.items():
        info, qtype = gf.tensors[name], Q[types[name]]
        assert isinstance(info.data, np.memmap) and not info.data.flags.writeable
        assert info.n_bytes == raw.nbytes and np.array_equal(np.asarray(info.data).view(np.uint8), raw.view(np.uint8))
        expected = gguf.quants.dequantize(raw, qtype).astype(np.float32)
        out = gf.dequantize(name)
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.shape == info.shape == expected.shape
        assert np.array_equal(out, expected)
    assert gf.tensors["q8"].shape == (2, 64) and gf.tensors["q8"].data.shape == (2, 2 * 34)


def test_same_view_as_gguf_reader(tmp_path):
    path = tmp_path / "cmp.gguf"
    write_tiny(path, alignment=16, nested=False)  # GGUFReader flattens nested arrays
    gf, reader = GGUFFile(path), gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(gf.metadata) == list(expected)
    for key, value in expected.items():
        assert gf.metadata[key] == value and type(gf.metadata[key]) is type(value), key
    assert list(gf.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = gf.tensors[t.name]
        assert (info.type_name, info.shape, info.n_bytes) == (t.tensor_type.name, tuple(reversed(t.shape.tolist())), t.n_bytes)
        assert (info.data.dtype, info.data.shape) == (t.data.dtype, t.data.shape)
        assert info.data.tobytes() == t.data.tobytes()


@pytest.mark.real_model
@pytest.mark.parametrize("model, vocab", [("smollm2_path", 49152), ("gemma3_path", 262144)])
def test_real_models_open_fast(request, model, vocab):
    path = request.getfixturevalue(model)
    t0 = time.perf_counter()
    gf = GGUFFile(path)
    elapsed = time.perf_counter() - t0
    assert len(gf.metadata["tokenizer.ggml.tokens"]) == vocab and gf.tensors
    assert elapsed < 5, f"opening {path.name} took {elapsed:.2f} s"  # ~0.15 s / ~0.35 s; GGUFReader took 5 / 22 s


# ------------------------------------------------------------------ crafted hostile files


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _arr(elem_type: int, count: int, payload: bytes = b"") -> bytes:
    return struct.pack("<IQ", elem_type, count) + payload


def _tensor(name: str, ne: tuple[int, ...], ggml_type: int = 0, offset: int = 0) -> bytes:
    return _s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, ggml_type, offset)


ARCH = _kv("general.architecture", V.STRING, _s("llama"))
W = _tensor("w", (4,))


def _file(kvs=(ARCH,), tensors=(W,), data=bytes(16), n_kv=None, n_tensors=None, version=3, align=32) -> bytes:
    n_t, n_k = len(tensors) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv
    body = b"GGUF" + struct.pack("<IQQ", version, n_t, n_k) + b"".join(kvs) + b"".join(tensors)
    return body + bytes(-len(body) % align) + data


def _nested(depth: int) -> bytes:
    return _arr(V.ARRAY, 1, _nested(depth - 1)) if depth else _arr(V.UINT8, 1, b"\x01")


CRAFTED = {
    "empty file": (b"", "too small"),
    "short file": (b"GGUF\x03\0\0", "too small"),
    "wrong magic": (b"GGML" + _file()[4:], "not a GGUF file"),
    "big-endian version": (_file(version=3 << 24), "version 50331648 is not supported"),
    "2^60 tensors": (_file(n_tensors=2**60), "more than a .*-byte file can hold"),
    "2^64-1 kv pairs": (_file(n_kv=2**64 - 1), "more than a .*-byte file can hold"),
    "more kv pairs than present": (_file(n_kv=3, tensors=(), data=b"", align=1), "metadata key #1 needs 8 bytes"),
    "2^40-byte key": (_file(kvs=[struct.pack("<Q", 2**40) + b"abc"]), "needs 1099511627776 bytes"),
    "2^60-byte string": (_file(kvs=[_kv("k", V.STRING, struct.pack("<Q", 2**60))]), "needs 1152921504606846976 bytes"),
    "2^40 uint32s": (_file(kvs=[_kv("k", V.ARRAY, _arr(V.UINT32, 2**40))]), "array of 1099511627776"),
    "2^40 strings": (_file(kvs=[_kv("k", V.ARRAY, _arr(V.STRING, 2**40))]), "array of 1099511627776"),
    "2^62 arrays": (_file(kvs=[_kv("k", V.ARRAY, _arr(V.ARRAY, 2**62))]), "array of"),
    "string array past EOF": (_file(kvs=[_kv("k", V.ARRAY, _arr(V.STRING, 2, _s("a") + struct.pack("<Q", 2**50)))]),
                              r"k'\[1\] runs past the end"),
    "arrays nested 9 deep": (_file(kvs=[_kv("k", V.ARRAY, _nested(9))]), "more than 8 deep"),
    "unknown value type": (_file(kvs=[_kv("k", 13, b"\0" * 8)]), "unknown value type 13"),
    "unknown array type": (_file(kvs=[_kv("k", V.ARRAY, _arr(99, 1, b"\0"))]), "unknown value type 99"),
    "bool of 2": (_file(kvs=[_kv("k", V.BOOL, b"\x02")]), "must be 0 or 1"),
    "bool array of 7": (_file(kvs=[_kv("k", V.ARRAY, _arr(V.BOOL, 2, b"\x01\x07"))]), "bool that is not 0 or 1"),
    "invalid UTF-8 key": (_file(kvs=[_kv(b"\xff\xfe", V.UINT8, b"\0")]), "not valid UTF-8"),
    "invalid UTF-8 value": (_file(kvs=[_kv("k", V.STRING, _s(b"a\xc3"))]), "not valid UTF-8"),
    "surrogate in a string array": (_file(kvs=[_kv("k", V.ARRAY, _arr(V.STRING, 1, _s(b"\xed\xa0\x80")))]),
                                    "not valid UTF-8"),
    "duplicate key": (_file(kvs=[ARCH, ARCH]), "'general.architecture' appears twice"),
    "alignment 48": (_file(kvs=[ARCH, _kv("general.alignment", V.UINT32, struct.pack("<I", 48))]), "48, not a power"),
    "alignment 0": (_file(kvs=[ARCH, _kv("general.alignment", V.UINT32, struct.pack("<I", 0))]), "0, not a power"),
    "alignment as a string": (_file(kvs=[ARCH, _kv("general.alignment", V.STRING, _s("32"))]), "not uint32"),
    "duplicate tensor": (_file(tensors=[W, W], data=bytes(64)), "'w' appears twice"),
    "0 dimensions": (_file(tensors=[_tensor("w", ())]), "0 dimensions"),
    "5 dimensions": (_file(tensors=[_tensor("w", (1, 1, 1, 1, 1))]), "5 dimensions"),
    "a zero dimension": (_file(tensors=[_tensor("w", (4, 0))]), "a zero"),
    "element count overflow": (_file(tensors=[_tensor("w", (2**32, 2**32, 2**32))]), "more elements than"),
    "unknown ggml type": (_file(tensors=[_tensor("w", (4,), ggml_type=4)]), "unknown ggml type 4"),
    "Q8_0 row of 31": (_file(tensors=[_tensor("w", (31,), ggml_type=Q.Q8_0)]), "row length 31"),
    "offset past EOF": (_file(tensors=[_tensor("w", (4,), offset=2**63)]), "the file ends"),
    "data past EOF": (_file(tensors=[_tensor("w", (1 << 40,))]), "needs 4398046511104 bytes of data"),
    "truncated data": (_file(data=bytes(15)), "needs 16 bytes of data"),
    "unaligned offset": (_file(tensors=[_tensor("w", (4,), offset=4)], data=bytes(20)), "not a multiple of the alignment"),
    "overlapping data": (_file(tensors=[_tensor("a", (16,)), _tensor("b", (4,), offset=32)], data=bytes(64)),
                         "'a' and 'b' overlap"),
    "tensor name past EOF": (_file(tensors=[struct.pack("<Q", 2**62)], data=b""), "needs"),
    "dims past EOF": (_file(tensors=[_s("w") + struct.pack("<I", 4)], data=b""), "needs"),
}


@pytest.mark.parametrize("case", list(CRAFTED))
def test_crafted_hostile_files(tmp_path, case):
    data, match = CRAFTED[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(GGUFError, match=match) as err:
            GGUFFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1
    assert peak < 2 << 20, f"{case}: peak allocation {peak} bytes"
    assert err.type is GGUFError and str(path) in str(err.value)
    assert err.value.args[0].count("\n") == 0


def test_crafted_baseline_is_valid_and_unsupported_type_is_named(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(_file())
    gf = GGUFFile(path)
    assert gf.metadata == {"general.architecture": "llama"} and gf.tensors["w"].shape == (4,)
    path.write_bytes(_file(tensors=[_tensor("w", (32,), ggml_type=Q.IQ4_NL)], data=bytes(18)))
    with pytest.raises(UnsupportedModelError, match=r"type IQ4_NL, which kvgraph does not support .*Q8_0"):
        GGUFFile(path)


# ------------------------------------------------------------------ fuzzing


def _open_or_clean_error(path: Path, data: bytes) -> None:
    """Open `data` as a GGUF file: it must open (and dequantize) or raise KvgraphError, within a second."""
    path.unlink(missing_ok=True)  # a fresh inode: never truncate a file an earlier case may still map
    path.write_bytes(data)
    t0 = time.perf_counter()
    try:
        gf = GGUFFile(path)
        with np.errstate(all="ignore"):
            for name in gf.tensors:
                gf.dequantize(name)
    except KvgraphError as exc:
        assert str(exc) and "\n" not in str(exc)
    assert time.perf_counter() - t0 < 1


@pytest.fixture(scope="module")
def fuzz_base(tmp_path_factory) -> tuple[Path, bytes, int]:
    """(scratch path, a small valid file, where its tensor data starts) for the fuzzers."""
    d = tmp_path_factory.mktemp("fuzz")
    write_tiny(d / "base.gguf")
    return d / "case.gguf", (d / "base.gguf").read_bytes(), gguf.GGUFReader(d / "base.gguf").data_offset


INTERESTING = [0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 31, 32, 33, 63, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
               2**60, 2**62, 2**63 - 1, 2**63, 2**64 - 1]

_edit = st.one_of(
    st.tuples(st.just("byte"), st.integers(0, 1 << 16), st.integers(0, 255)),
    st.tuples(st.just("u32"), st.integers(0, 1 << 16), st.sampled_from(INTERESTING).map(lambda v: v & 0xFFFFFFFF)),
    st.tuples(st.just("u64"), st.integers(0, 1 << 16), st.sampled_from(INTERESTING)),
    st.tuples(st.just("cut"), st.integers(0, 1 << 16), st.just(0)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 16), st.integers(1, 16)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 16), st.integers(0, 255)),
)


@settings(max_examples=1000, deadline=None, database=None)
@given(edits=st.lists(_edit, min_size=1, max_size=4), in_header=st.booleans())
def test_fuzz_mutated_files(fuzz_base, edits, in_header):
    path, base, header_end = fuzz_base
    data = bytearray(base)
    for kind, pos, value in edits:
        pos %= (header_end if in_header else len(data)) or 1  # mostly hit the header, metadata and tensor infos
        if kind == "byte":
            data[pos : pos + 1] = bytes([value])
        elif kind in ("u32", "u64"):
            data[pos : pos + (4 if kind == "u32" else 8)] = struct.pack("<I" if kind == "u32" else "<Q", value)
        elif kind == "cut":
            del data[pos:]
        elif kind == "delete":
            del data[pos : pos + value]
        else:
            data[pos:pos] = bytes([value])
    _open_or_clean_error(path, bytes(data))


_count = st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1))


def _rarely(strategy):  # None (keep the true count) 3 times in 4
    return st.integers(0, 3).flatmap(lambda i: strategy if i == 0 else st.none())


_kv_entry = st.builds(
    _kv, st.sampled_from(["k", "general.alignment", "general.architecture"]) | st.binary(max_size=6),
    st.integers(0, 14),
    st.one_of(st.binary(max_size=24),
              st.builds(_arr, st.integers(0, 14), _count, st.binary(max_size=24)),
              st.builds(lambda c, p: struct.pack("<Q", c) + p, _count, st.binary(max_size=16))),
)
_tensor_entry = st.builds(
    lambda name, ne, t, off: _s(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t, off),
    st.sampled_from(["w", "v", ""]), st.lists(st.sampled_from(INTERESTING[1:10] + [2**32, 2**63]), max_size=6).map(tuple),
    st.sampled_from([0, 1, 2, 8, 30, 4, 99, 2**32 - 1]), st.sampled_from([0, 32, 64, 4, 2**63]),
)


@settings(max_examples=500, deadline=None, database=None)
@given(kvs=st.lists(_kv_entry, max_size=4), tensors=st.lists(_tensor_entry, max_size=3),
       n_kv=_rarely(_count), n_tensors=_rarely(_count), data_len=st.sampled_from([0, 16, 64, 100]))
def test_fuzz_crafted_structures(fuzz_base, kvs, tensors, n_kv, n_tensors, data_len):
    path, _, _ = fuzz_base
    _open_or_clean_error(path, _file(kvs, tensors, bytes(data_len), n_kv=n_kv, n_tensors=n_tensors))


def test_fuzz_building_blocks_make_valid_files(fuzz_base):
    """The fuzzers' raw building blocks write files that open, so the fuzzers reach deep into the parser."""
    path, base, header_end = fuzz_base
    cases = {"nested 8 deep": (_nested(7), [[[[[[[[1]]]]]]]]), "no strings": (_arr(V.STRING, 0), []),
             "strings": (_arr(V.STRING, 2, _s("ab") + _s("")), ["ab", ""]),
             "int64s": (_arr(V.INT64, 2, struct.pack("<2q", -1, 5)), [-1, 5])}
    for data, expected in [(base, None)] + [(_file([ARCH, _kv("k", V.ARRAY, p)]), e) for p, e in cases.values()]:
        path.unlink(missing_ok=True)
        path.write_bytes(data)
        gf = GGUFFile(path)
        assert gf.tensors and (expected is None or gf.metadata["k"] == expected)
    assert 0 < header_end < len(base)


def test_the_format_type_tables_agree_with_the_gguf_package():
    """kvgraph opens files without importing gguf (startup time): its own tables must be the format's."""
    from kvgraph.gguf import types

    for q in gguf.GGMLQuantizationType:
        if int(q) in types.GGML_TYPES:
            assert types.GGML_TYPES[int(q)] == (q.name, *gguf.GGML_QUANT_SIZES[q])
        assert types.ggml_type(int(q)) == (q.name, *gguf.GGML_QUANT_SIZES[q])   # newer ids: asked of gguf
    assert all(types.ggml_type(i) is not None for i in types.GGML_TYPES)
    assert types.ggml_type(9999) is None
    for v in gguf.GGUFValueType:
        assert getattr(types, v.name) == int(v)
    for f in gguf.LlamaFileType:
        if int(f) in types.FILE_TYPES:
            assert types.FILE_TYPES[int(f)] == f.name.replace("MOSTLY_", "")
    assert set(types.FILE_TYPES) >= set(range(19)) - {4, 5, 6}   # every type llama.cpp still makes up to Q6_K


def test_long_arrays_are_read_from_the_file_when_asked_for_and_checked_then(tmp_path):
    """A vocabulary-sized array costs no Python objects until read (a benchmark never reads it), reads back
    the same every time, and a bad string in it is still one clear GGUFError, at the read."""
    from kvgraph.gguf.reader import LAZY_ARRAY_MIN, array_length

    n = LAZY_ARRAY_MIN + 3
    words = [f"w{i}▁" for i in range(n)]
    path = tmp_path / "long.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_key_value("long.str", words, V.ARRAY, sub_type=V.STRING)
    w.add_key_value("long.f32", [float(i) / 2 for i in range(n)], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("long.bool", [i % 3 == 0 for i in range(n)], V.ARRAY, sub_type=V.BOOL)
    w.add_key_value("after", 7, V.UINT32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    gf = GGUFFile(path)
    assert array_length(gf.metadata, "long.str") == n and array_length(gf.metadata, "after") is None
    assert gf.metadata["long.str"] == words == gf.metadata["long.str"]
    assert gf.metadata["long.f32"] == [i / 2 for i in range(n)]
    assert gf.metadata["long.bool"] == [i % 3 == 0 for i in range(n)] and gf.metadata["after"] == 7
    assert read_metadata(path) == dict(gf.metadata) and type(read_metadata(path)) is dict

    data = bytearray(path.read_bytes())
    at = data.index("w1234▁".encode())
    data[at: at + 2] = b"\xff\xfe"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    gf = GGUFFile(bad)                                   # opens: the strings are only walked
    with pytest.raises(GGUFError, match=r"long\.str'\[1234\] is not valid UTF-8"):
        gf.metadata["long.str"]
