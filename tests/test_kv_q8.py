"""The q8_0 KV cache (llama.cpp's -ctk/-ctv q8_0): ggml's Q8_0 blocks along each head's dimensions. Greedy
text and logits close to an f16 cache's, the numpy reference reading the same cache, the flags, and clear
errors where a backend or a model cannot keep it. (Bit-for-bit invariance: test_invariance.py and
test_batching.py; the kernels against numpy: test_native_kernels.py.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from kvgraph.api import LLM
from kvgraph.backends import native
from kvgraph.backends.reference import Q8_0_BLOCK
from kvgraph.cli.main import main
from kvgraph.errors import InvalidArgumentError
from tiny_models import TinySpec, write_tiny_llama

needs_native = pytest.mark.skipif(native.library() is None, reason=f"native kernels unavailable: {native.why_not()}")


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """A tiny llama whose heads have 32 dimensions (one Q8_0 block each)."""
    path = tmp_path_factory.mktemp("q8kv") / "llama.gguf"
    write_tiny_llama(path, TinySpec(weight_type="Q4_1", n_embd=128, n_ff=256))
    return str(path)


def _tokens(llm: LLM, n: int, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(5, llm.n_vocab, n)]


@needs_native
@pytest.mark.parametrize("backend", ["native", "numpy"])
def test_q8_0_cache_is_blocks_and_close_to_f16(llama32, backend):
    """K and V held as Q8_0 blocks (34 bytes per 32 values); the logits of a prompt close to an f16 cache's,
    and greedy text the same for its first tokens."""
    f16 = LLM(llama32, backend=backend, n_ctx=256, flash_attn=True, cache_type="f16")
    q8 = LLM(llama32, backend=backend, n_ctx=256, flash_attn=True, cache_type="q8_0")
    assert q8.ctx.cache_type == "q8_0"
    kv = [b for b in q8.ctx.states.values()]
    assert kv and all(b.dtype == Q8_0_BLOCK for b in kv)
    assert sum(b.nbytes for b in kv) * 64 == sum(b.nbytes for b in f16.ctx.states.values()) * 34
    tokens = _tokens(f16, 60)
    a, b = f16.logits(tokens), q8.logits(tokens)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    prompt = tokens[:20]
    f16.session.reset()
    q8.session.reset()
    assert (q8.generate(prompt, max_tokens=8, ignore_eos=True).ids[:4]
            == f16.generate(prompt, max_tokens=8, ignore_eos=True).ids[:4])


@needs_native
def test_the_numpy_reference_reads_the_native_backends_q8_0_cache_alike(llama32):
    """The reference (set_rows quantizes, flash_attn dequantizes) writes the same blocks as the C kernels and
    its logits are within the query's int8 rounding of theirs."""
    ref = LLM(llama32, backend="numpy", n_ctx=256, flash_attn=True, cache_type="q8_0")
    nat = LLM(llama32, backend="native", n_ctx=256, cache_type="q8_0")
    tokens = _tokens(ref, 30, seed=2)
    a, b = ref.logits(tokens), nat.logits(tokens)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


@needs_native
def test_torch_with_the_c_kernels_keeps_q8_0_too(llama32):
    pytest.importorskip("torch")
    t = LLM(llama32, backend="torch", n_ctx=64, cache_type="q8_0")
    n = LLM(llama32, backend="native", n_ctx=64, cache_type="q8_0")
    assert t.ctx.cache_type == "q8_0"
    tokens = _tokens(n, 20, seed=3)
    a, b = t.logits(tokens), n.logits(tokens)
    assert np.abs(a - b).max() < 0.05 * np.abs(b).max()


def test_a_backend_without_q8_0_says_which_have_it(llama32, monkeypatch):
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_why_not", "disabled for this test")
    pytest.importorskip("torch")
    with pytest.raises(InvalidArgumentError, match=r"the torch backend keeps the KV cache as f32, not 'q8_0' "
                                                   r"\(q8_0 is read by the native backend.*; use --cache-type f32"):
        LLM(llama32, backend="torch", n_ctx=64, cache_type="q8_0")


def test_heads_that_are_not_whole_blocks_are_refused(tiny_llama, tmp_path):
    with pytest.raises(InvalidArgumentError, match=r"q8_0 KV cache keeps each head's values in blocks of 32, but "
                                                   r"this model's rows of 16 values are no whole blocks"):
        LLM(str(tiny_llama[0]), backend="numpy", n_ctx=64, flash_attn=True, cache_type="q8_0")
    path = tmp_path / "llama.gguf"                                  # 4 KV heads of 16: rows of 64, heads no blocks
    write_tiny_llama(path, TinySpec(n_embd=64, n_head=4, n_head_kv=4))
    with pytest.raises(InvalidArgumentError, match=r"this model's heads have 16 \(K\) and 16 \(V\) dimensions; "
                                                   r"use --cache-type f16"):
        LLM(str(path), backend="numpy", n_ctx=64, flash_attn=True, cache_type="q8_0")


def test_without_flash_attention_the_cache_stays_float32(llama32):
    """-fa off keeps ggml's transposed float32 V (and K), whatever type is asked, as for f16."""
    llm = LLM(llama32, backend="numpy", n_ctx=64, flash_attn=False, cache_type="q8_0")
    assert llm.ctx.cache_type == "f32"


@needs_native
def test_cli_takes_llama_cpps_ctk_ctv_q8_0(llama32, capsys):
    args = ["generate", "-m", llama32, "the cat", "-n", "6", "--temp", "0", "--ignore-eos", "--json"]
    assert main(args + ["-ctk", "q8_0", "-ctv", "q8_0"]) == 0
    q8 = json.loads(capsys.readouterr().out)
    assert main(args + ["--cache-type", "q8_0"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == q8["ids"] and len(q8["ids"]) == 6
    assert main(args + ["-ctk", "q8_0", "-ctv", "f16"]) != 0
    assert "K and V share one cache type here; got -ctk q8_0, -ctv f16" in capsys.readouterr().err
