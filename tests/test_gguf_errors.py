"""Every way a model file can be wrong ends in one clear KvgraphError, and the CLI prints it without a traceback."""
from __future__ import annotations

import re
import struct

import gguf
import numpy as np
import pytest

from kvgraph.cli.main import main
from kvgraph.engine.loader import open_model
from kvgraph.errors import GGUFError, UnsupportedModelError
from tiny_models import TinySpec, write_tiny_llama


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.gguf"
    write_tiny_llama(path, TinySpec(n_layer=1))
    return path


def test_a_valid_tiny_file_opens(good_file):
    gf, cfg, model = open_model(good_file)
    assert cfg.arch == "llama" and cfg.n_layer == 1 and "blk.0.attn_q.weight" in gf.tensors


def test_wrong_magic(tmp_path, good_file):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + good_file.read_bytes()[4:])
    with pytest.raises(GGUFError, match="not a GGUF file"):
        open_model(bad)


def test_unsupported_version(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    bad = tmp_path / "v99.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="version 99 is not supported"):
        open_model(bad)


def test_truncated_anywhere_is_a_clean_error(tmp_path, good_file):
    data = good_file.read_bytes()
    cuts = sorted(set(np.linspace(0, len(data) - 1, 60).astype(int)) | {1, 4, 8, 23, 24, 30, len(data) - 1})
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError):
            open_model(bad)


def test_absurd_counts_are_rejected_before_parsing(tmp_path, good_file):
    data = bytearray(good_file.read_bytes())
    data[8:16] = struct.pack("<Q", 2 ** 60)
    bad = tmp_path / "huge.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="more than a .*file can hold"):
        open_model(bad)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        open_model(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="not a regular file"):
        open_model(tmp_path)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    path = tmp_path / "arch.gguf"
    write_tiny_llama(path, TinySpec(arch="mamba9", n_layer=1))
    with pytest.raises(UnsupportedModelError, match=r"'mamba9' is not supported.*llama"):
        open_model(path)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.IQ4_NL]
    w.add_tensor("token_embd.weight", np.zeros((4, 256 // block * nbytes), np.uint8), raw_shape=(4, 256 // block * nbytes),
                 raw_dtype=gguf.GGMLQuantizationType.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="type IQ4_NL.*not support"):
        open_model(path)


def test_missing_tensor(tmp_path):
    path = tmp_path / "missing.gguf"
    write_tiny_llama(path, TinySpec(n_layer=1, drop_tensors=("blk.0.ffn_up.weight",)))
    with pytest.raises(GGUFError, match="'blk.0.ffn_up.weight' is missing"):
        open_model(path)


def test_shape_that_contradicts_hyperparameters(tmp_path):
    path = tmp_path / "shape.gguf"
    write_tiny_llama(path, TinySpec(n_layer=1, override_shapes={"blk.0.attn_k.weight": (32, 32)}))
    with pytest.raises(GGUFError, match="'blk.0.attn_k.weight' has shape .* hyper-parameters"):
        open_model(path)


def test_shapes_are_the_same_up_to_leading_ones_in_numpy_order():
    """ggml's ne is numpy's order reversed and llama-quantize drops its trailing ones (ggml_n_dims), so a
    numpy shape may gain or lose LEADING ones and be the same tensor, never trailing ones or a regrouping."""
    from kvgraph.gguf.reader import same_shape
    assert same_shape((1536,), (1, 1536)) and same_shape((1, 1536), (1536,)) and same_shape((1, 1, 64), (64,))
    assert same_shape((8, 1), (8, 1)) and same_shape((1,), (1, 1))
    assert not same_shape((1536, 1), (1536,)) and not same_shape((2, 768), (1536,))
    assert not same_shape((1, 64), (1, 65)) and not same_shape((2, 1, 64), (64,))


@pytest.mark.parametrize("backend", ["numpy", "native"])
def test_a_tensor_written_with_extra_leading_ones_loads_with_the_architectures_shape(tmp_path, backend):
    """A norm stored as (1, 32) (ggml ne [32, 1]) is the architecture's (32,) to ggml: it loads, and every
    backend is handed the tensor in the shape the architecture names, a view of the file's bytes."""
    from kvgraph.api import LLM
    path = tmp_path / "ones.gguf"
    tensors = write_tiny_llama(path, TinySpec(n_layer=1, override_shapes={"blk.0.attn_norm.weight": (1, 32)}))
    gf, _, _ = open_model(path)
    info = gf.tensor("blk.0.attn_norm.weight")
    assert gf.tensors["blk.0.attn_norm.weight"].shape == (1, 32) and info.shape == info.data.shape == (32,)
    assert np.array_equal(gf.dequantize("blk.0.attn_norm.weight"), tensors["blk.0.attn_norm.weight"][0])
    llm = LLM(str(path), backend=backend, n_ctx=32)
    assert np.isfinite(llm.logits([1, 2, 3])).all()


@pytest.mark.parametrize("shape", [(32, 1), (2, 16), (1, 33)])
def test_a_shape_that_differs_by_more_than_leading_ones_is_refused(tmp_path, shape):
    path = tmp_path / "bad-norm.gguf"
    write_tiny_llama(path, TinySpec(n_layer=1, override_shapes={"blk.0.attn_norm.weight": shape}))
    with pytest.raises(GGUFError, match=rf"'blk.0.attn_norm.weight' has shape \({shape[0]}, {shape[1]}\) but the "
                                        r"hyper-parameters say \(32,\); the file is inconsistent"):
        open_model(path)


def test_metadata_of_the_wrong_type(tmp_path):
    path = tmp_path / "meta.gguf"
    write_tiny_llama(path, TinySpec(n_layer=1, extra_kv={"llama.attention.key_length": "lots"}))
    with pytest.raises(GGUFError, match="'llama.attention.key_length' is stored as string, but it is read as uint32"):
        open_model(path)


def retype(path, key: str, new_type: int) -> None:
    """Change the stored value type of key in place, bytes untouched (what a corrupted type id does): for an
    array, the type of its elements."""
    data = bytearray(path.read_bytes())
    at = data.index(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key)
    if struct.unpack_from("<I", data, at)[0] == gguf.GGUFValueType.ARRAY:
        at += 4
    data[at:at + 4] = struct.pack("<I", new_type)
    path.write_bytes(bytes(data))


V = gguf.GGUFValueType
RETYPED = [  # (key, the type it is given, as reported, as it is read) -- each keeps the bytes of the right type
    ("llama.rope.freq_base", V.INT32, "int32", "float32"),                # 10000.0 would be 1176256512
    ("llama.attention.layer_norm_rms_epsilon", V.UINT32, "uint32", "float32"),
    ("llama.vocab_size", V.INT32, "int32", "uint32"),
    ("llama.block_count", V.FLOAT32, "float32", "uint32"),
    ("tokenizer.ggml.token_type", V.UINT32, "array of uint32", "array of int32"),
    ("tokenizer.ggml.bos_token_id", V.INT32, "int32", "uint32"),
    ("tokenizer.ggml.add_bos_token", V.UINT8, "uint8", "bool"),
]


@pytest.mark.parametrize("key, new_type, found, expected", RETYPED, ids=[r[0] for r in RETYPED])
def test_a_value_stored_with_another_type_is_refused_as_llama_cpp_refuses_it(tmp_path, capsys, key, new_type,
                                                                               found, expected):
    """A fuzzed type id keeps the value's bytes: kvgraph once ran such files with the bits reinterpreted (a
    float32 rope base read as an int32); llama.cpp refuses a key whose type is not the one it reads, and so
    does kvgraph, with one line naming the key and both types."""
    path = tmp_path / "retyped.gguf"
    write_tiny_llama(path, TinySpec(n_layer=1))
    retype(path, key, new_type)
    assert main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(key)}'?:? (is )?stored as {found}, but (it is )?read as {expected} ", err), err
    assert err.count("\n") == 1 and "Traceback" not in err and "Warning" not in err


def corrupt(src, dst, key: str, *, tensor_type: int | None = None, f32: float | None = None, u32: int | None = None):
    """A copy of src with one field's bytes changed in place, as a fuzzer changes them: the type id of tensor
    key, or the value of the float32 (or uint32) metadata key."""
    data = bytearray(src.read_bytes())
    at = data.index(struct.pack("<Q", len(key)) + key.encode()) + 8 + len(key)
    if tensor_type is not None:
        at += 4 + 8 * struct.unpack_from("<I", data, at)[0]       # n_dims, ne[]: then the ggml type
        data[at:at + 4] = struct.pack("<I", tensor_type)
    elif u32 is not None:
        assert struct.unpack_from("<I", data, at)[0] == V.UINT32
        data[at + 4:at + 8] = struct.pack("<I", u32)
    else:
        assert struct.unpack_from("<I", data, at)[0] == V.FLOAT32
        data[at + 4:at + 8] = struct.pack("<f", f32)
    dst.write_bytes(bytes(data))
    return dst


def run_cli_without_warnings(capsys, argv) -> tuple[int, str]:
    """main(argv) with every warning an error (a numpy RuntimeWarning would end it in an exception, not a
    line); (exit status, stderr)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rc = main(argv)
    return rc, capsys.readouterr().err


Q = gguf.GGMLQuantizationType
CHANGED_TYPES = [  # (weights, tensor, its type id changed to): the data of the right size, read as other numbers
    ("F32", "blk.0.ffn_down.weight", Q.F16), ("F32", "token_embd.weight", Q.BF16), ("F32", "token_embd.weight", Q.F16),
    ("F32", "blk.0.attn_norm.weight", Q.Q4_0), ("Q8_0", "token_embd.weight", Q.Q4_0),
    ("Q8_0", "blk.0.ffn_down.weight", Q.Q5_0), ("Q8_0", "blk.0.attn_q.weight", Q.Q5_0),
]


@pytest.mark.parametrize("backend", ["native", "numpy"])
@pytest.mark.parametrize("weights, tensor, new_type", CHANGED_TYPES, ids=[f"{w}-{t}-{n.name}" for w, t, n in CHANGED_TYPES])
def test_a_changed_tensor_type_id_prints_no_warnings(tmp_path, capsys, backend, weights, tensor, new_type):
    """18 fuzzed files printed numpy's RuntimeWarning lines (overflow, invalid value in a cast or a matmul)
    as their garbage was repacked and run: now the run says only what it says (one line when the logits are
    not finite), whichever backend runs it."""
    src = tmp_path / "good.gguf"
    write_tiny_llama(src, TinySpec(n_layer=1, weight_type=weights))
    bad = corrupt(src, tmp_path / "retyped.gguf", tensor, tensor_type=new_type)
    rc, err = run_cli_without_warnings(capsys, ["generate", "-m", str(bad), "--backend", backend, "-n", "3", "hi"])
    assert "Warning" not in err and "Traceback" not in err
    # the load's own notice where a garbage scale made the C kernels re-quantize a matrix (and say so)
    err = "".join(line for line in err.splitlines(keepends=True) if "re-quantized to 8 bits" not in line)
    if rc:
        assert rc == 1 and err.count("\n") == 1 and err.startswith("kvgraph: error: "), err


@pytest.mark.parametrize("cap", [float("nan"), float("inf"), -5.0])
@pytest.mark.parametrize("key", ["gemma2.final_logit_softcapping", "gemma2.attn_logit_softcapping"])
def test_a_soft_capping_value_that_is_no_cap_is_refused_in_one_line(tmp_path, capsys, key, cap):
    """A NaN or negative cap ended in a ValueError traceback from the graph builder, an infinite one in
    RuntimeWarnings and non-finite logits: refused at load, naming the key."""
    from arch_fixtures import fixture
    bad = corrupt(fixture("gemma2")[0], tmp_path / "cap.gguf", key, f32=cap)
    rc, err = run_cli_without_warnings(capsys, ["generate", "-m", str(bad), "-n", "3", "hi"])
    assert rc == 1 and err.count("\n") == 1, err
    assert f"{key} = {cap} is not a soft-capping value (a positive number, or 0 for none)" in err


@pytest.mark.parametrize("key, value", [("ssm.inner_size", 48), ("ssm.time_step_rank", 3), ("ssm.state_size", 8)])
def test_gated_delta_net_sizes_that_do_not_fit_are_refused_in_one_line(tmp_path, capsys, key, value):
    """Qwen3-Next's value heads must be a multiple of its key heads, and all of them state_size wide
    (inner_size): a file that says otherwise is refused at load with its numbers, not in the graph builder."""
    from arch_fixtures import fixture
    bad = corrupt(fixture("qwen3next")[0], tmp_path / "sizes.gguf", f"qwen3next.{key}", u32=value)
    rc, err = run_cli_without_warnings(capsys, ["generate", "-m", str(bad), "-n", "3", "hi"])
    assert rc == 1 and err.count("\n") == 1, err
    assert "inconsistent gated delta-net sizes" in err


@pytest.mark.parametrize("arch, key, value", [("qwen3next", "attention.value_length", 16),
                                              ("qwen3next", "expert_used_count", 5),
                                              ("qwen35", "attention.value_length", 16),
                                              ("qwen35moe", "attention.value_length", 16),
                                              ("qwen35moe", "expert_used_count", 5)])
def test_qwen3next_heads_or_experts_that_do_not_fit_are_refused_in_one_line(tmp_path, capsys, arch, key, value):
    from arch_fixtures import fixture
    bad = corrupt(fixture(arch)[0], tmp_path / "heads.gguf", f"{arch}.{key}", u32=value)
    rc, err = run_cli_without_warnings(capsys, ["generate", "-m", str(bad), "-n", "3", "hi"])
    assert rc == 1 and err.count("\n") == 1, err
    assert f"{arch} needs equal key and value head sizes" in err


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe"])
def test_qwen35_delta_net_sizes_that_do_not_fit_are_refused_in_one_line(tmp_path, capsys, arch):
    from arch_fixtures import fixture
    bad = corrupt(fixture(arch)[0], tmp_path / "sizes.gguf", f"{arch}.ssm.time_step_rank", u32=3)
    rc, err = run_cli_without_warnings(capsys, ["generate", "-m", str(bad), "-n", "3", "hi"])
    assert rc == 1 and err.count("\n") == 1, err
    assert "inconsistent gated delta-net sizes" in err


@pytest.mark.parametrize("sections", [None, [0, 0, 0, 0], [2, 1, 1], [40, 0, 0, 0], [2, -1, 1, 0]])
def test_qwen35_rope_sections_that_do_not_fit_are_refused_in_one_line(tmp_path, capsys, sections):
    """llama.cpp requires qwen35's rope.dimension_sections (four pair counts, their sum at most the head size,
    32 here; a file without it does not load there either): refused at load, naming the key."""
    from arch_fixtures import fixture, with_metadata
    bad = with_metadata(fixture("qwen35")[0], tmp_path / "sections.gguf", "qwen35.rope.dimension_sections", sections)
    rc, err = run_cli_without_warnings(capsys, ["generate", "-m", str(bad), "-n", "3", "hi"])
    assert rc == 1 and err.count("\n") == 1, err
    assert f"rope.dimension_sections {sections} is not four pair counts" in err


@pytest.mark.parametrize("value", [0, 5])
def test_qwen3moe_using_no_experts_or_more_than_it_has_is_refused_in_one_line(tmp_path, capsys, value):
    from arch_fixtures import fixture
    bad = corrupt(fixture("qwen3moe")[0], tmp_path / "experts.gguf", "qwen3moe.expert_used_count", u32=value)
    rc, err = run_cli_without_warnings(capsys, ["generate", "-m", str(bad), "-n", "3", "hi"])
    assert rc == 1 and err.count("\n") == 1, err
    assert "qwen3moe uses 1..4 of its 4 experts per token; the file says" in err


@pytest.mark.parametrize("backend", ["native", "numpy"])
@pytest.mark.parametrize("cap", [1e-38, 3e38])
def test_an_extreme_soft_capping_value_runs_without_warnings(tmp_path, capsys, backend, cap):
    """A positive cap is a cap, however extreme (x / 1e-38 overflows to inf, whose tanh is 1): it runs, and
    numpy says nothing about the overflow."""
    from arch_fixtures import fixture
    bad = corrupt(fixture("gemma2")[0], tmp_path / "cap.gguf", "gemma2.attn_logit_softcapping", f32=cap)
    rc, err = run_cli_without_warnings(capsys, ["generate", "-m", str(bad), "--backend", backend, "-n", "3", "hi"])
    assert rc == 0 and err == "", err


def test_integer_arrays_may_hold_int32_or_uint32_as_in_llama_cpp(tmp_path):
    """llama.cpp's get_arr reads int32 and uint32 arrays alike (per-layer head counts): so does kvgraph."""
    from kvgraph.gguf.config import MetadataView
    path = tmp_path / "arrays.gguf"
    write_tiny_llama(path, TinySpec(n_layer=1))
    w = gguf.GGUFWriter(str(path), "llama")
    for key, sub in (("llama.a", V.INT32), ("llama.b", V.UINT32), ("llama.c", V.FLOAT32)):
        w.add_key_value(key, [1, 2], V.ARRAY, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    from kvgraph.gguf.reader import GGUFFile
    m = MetadataView(GGUFFile(path).metadata, "llama", str(path))
    assert m.int_list("a") == m.int_list("b") == [1, 2]
    with pytest.raises(GGUFError, match="'llama.c' is stored as array of float32, but it is read as array of "
                                        "int32 or array of uint32"):
        m.int_list("c")


def test_cli_prints_one_line_and_exits_nonzero(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"hello world, not a model at all")
    assert main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "not a GGUF file" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


@pytest.mark.parametrize("delta", [-3, 5])
def test_vocabulary_size_that_disagrees_with_the_tokens(tmp_path, delta):
    """An embedding with fewer rows than the tokenizer has ids (or more) would let text reach a row that does
    not exist, or the model sample an id with no text: refused at load, as llama.cpp does."""
    from kvgraph.gguf.reader import read_metadata
    path = tmp_path / "vocab.gguf"
    write_tiny_llama(path, TinySpec(n_layer=1))
    n_tokens = len(read_metadata(path)["tokenizer.ggml.tokens"])
    write_tiny_llama(path, TinySpec(n_layer=1, extra_kv={"llama.vocab_size": n_tokens + delta}))
    with pytest.raises(GGUFError, match=f"vocab_size is {n_tokens + delta} but tokenizer.ggml.tokens has {n_tokens}"):
        open_model(path)


def test_rope_scaling_kvgraph_does_not_implement_is_refused(tmp_path):
    from kvgraph.errors import UnsupportedModelError
    path = tmp_path / "yarn.gguf"
    write_tiny_llama(path, TinySpec(n_layer=1, extra_kv={"llama.rope.scaling.type": "yarn"}))
    with pytest.raises(UnsupportedModelError, match="RoPE scaling 'yarn'"):
        open_model(path)
