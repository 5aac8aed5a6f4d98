"""Models at real sizes (0.5B-1B, and the recurrent and hybrid shapes), made by tools/make_sized_models.py:
random weights at a real model's shapes, converted and quantized by llama.cpp's own tools. They are GBs and
live outside the repository, so each test here skips, naming the command that makes its file, where the
file is missing (as on CI). What they check that the tiny fixtures cannot: the K-quant kernels on every
recurrent and hybrid architecture (llama-quantize writes no K-quant tensor at the fixtures' width of 64), the
experts of a quantized mixture run from their tiles, and the weight cache at a real size."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kvgraph.api import LLM
from kvgraph.backends import native

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernels unavailable: {native.why_not()}")


def sized(shape: str, type_name: str = "Q4_K_M") -> Path:
    """The file tools/make_sized_models.py writes for shape (its default folder: $KVGRAPH_HOME/sized, else
    ~/.cache/kvgraph/sized), or a skip naming the command that makes it."""
    home = os.environ.get("KVGRAPH_HOME")
    path = (Path(home) if home else Path.home() / ".cache" / "kvgraph") / "sized" / f"{shape}-{type_name}.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is not there; make it with: python tools/make_sized_models.py --llama-cpp "
                    f"LLAMA_CPP_DIR --quantize LLAMA_QUANTIZE --types {type_name} {shape}")
    return path


PROMPT = list(range(100, 124))


HYBRIDS = ["mamba2-130m", "lfm2-350m", "granite-4.0-h-350m", "falcon-h1-0.5b", "jamba-tiny", "qwen3.5-0.8b",
           "granite-4.0-h-tiny"]


@pytest.mark.parametrize("shape", HYBRIDS)
def test_recurrent_and_hybrid_k_quant_files_give_the_same_bits_however_a_prompt_is_split(shape):
    """A Q4_K_M file of each recurrent and hybrid shape (K-quant tiles, the C scans, convolutions and gated
    delta rule at real widths, a mixture's experts from their tiles): one ubatch, ubatches of 7 and token by
    token give the
    same logits bit for bit. (Their logits are not compared with a float32 reference: a randomly initialised
    24-layer state-space model amplifies any rounding -- llama.cpp's own logits on these files differ from a
    float32 computation of the same weights by 20-40% of their range -- while the F16 file, below, agrees.)"""
    llm = LLM(str(sized(shape)), backend="native", n_ctx=64, tokenizer=False)
    whole = llm.logits(PROMPT)
    assert np.isfinite(whole).all()
    np.testing.assert_array_equal(llm.logits(PROMPT, ubatch_size=7), whole)
    np.testing.assert_array_equal(llm.logits(PROMPT, ubatch_size=1), whole)


def test_a_float16_mamba2_at_real_size_matches_the_float32_reference():
    """Mamba-2-130M's shape in F16 (weights as stored): the C kernels' logits at every position within 1e-3 of
    the numpy backend's float32 ones (measured: equal to 5 digits)."""
    path = sized("mamba2-130m", "F16")
    got, want = (LLM(str(path), backend=b, n_ctx=64, tokenizer=False).logits(PROMPT) for b in ("native", "numpy"))
    assert np.abs(got - want).max() <= 1e-3 * (want.max() - want.min())


def test_a_1b_model_mapped_from_its_weight_cache_gives_the_bits_of_a_fresh_repack(tmp_path, monkeypatch):
    """Llama-3.2-1B's shape in Q4_K_M: the first load packs its tiles into a new cache entry, the second maps
    that entry, a third packs in memory (cache off): the same logits, bit for bit, in one ubatch and token
    by token."""
    path = sized("llama-3.2-1b")
    monkeypatch.setenv("KVGRAPH_HOME", str(tmp_path))
    runs = []
    for cache in ("on", "on", "off"):
        monkeypatch.setenv("KVGRAPH_WEIGHT_CACHE", cache)
        llm = LLM(str(path), backend="native", n_ctx=64, tokenizer=False)
        runs.append((llm.loaded.backend.weights_origin(), llm.logits(PROMPT), llm.logits(PROMPT, ubatch_size=1)))
    assert [r[0].split(" ")[0] for r in runs] == ["repacked", "mapped", "repacked"], [r[0] for r in runs]
    for origin, whole, by_token in runs:
        np.testing.assert_array_equal(whole, runs[0][1])
        np.testing.assert_array_equal(by_token, runs[0][1])
