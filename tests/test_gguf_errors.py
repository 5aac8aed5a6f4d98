"""Every way a model file can be wrong ends in one clear KvgraphError, and the CLI prints it without a traceback."""
from __future__ import annotations

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


def test_metadata_of_the_wrong_type(tmp_path):
    path = tmp_path / "meta.gguf"
    write_tiny_llama(path, TinySpec(n_layer=1, extra_kv={"llama.attention.key_length": "lots"}))
    with pytest.raises(GGUFError, match="key_length' should be an integer"):
        open_model(path)


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
