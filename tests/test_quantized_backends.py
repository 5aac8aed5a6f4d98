"""The backends that compute with quantized weights and activations -- torch and native -- on the real
models, by design.md §8's rule for quantized-compute backends; and the native backend (C kernels over numpy,
no torch) on tiny models against the numpy reference."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from conftest import load_reference
from golden import first_divergence_margins, greedy_trace, long_prompt_perplexity, teacher_forced_agreement
from tiny_models import TINY_CASES, TinySpec, assert_tiny_case_matches_numpy, logits_trace, write_tiny_llama

from kvgraph.backends import get_backend, native, torch_available
from kvgraph.engine.context import Context
from kvgraph.engine.loader import load_model
from kvgraph.graph.inputs import UBatch

needs_native = pytest.mark.skipif(native.library() is None, reason=f"no native kernels: {native.why_not()}")
REAL = {"smollm2": ("smollm2_path", "smollm2_public.json"), "gemma3": ("gemma3_path", "gemma3_public.json")}
BACKENDS = [pytest.param("torch", marks=pytest.mark.skipif(not torch_available(), reason="torch not installed")),
            pytest.param("native", marks=needs_native)]


@pytest.fixture(scope="module", params=[(m, b) for m in REAL for b in ("torch", "native")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def real(request):
    model, backend = request.param
    if backend == "torch" and not torch_available():
        pytest.skip("torch not installed")
    if backend == "native" and native.library() is None:
        pytest.skip(f"no native kernels: {native.why_not()}")
    fixture, ref = REAL[model]
    path = request.getfixturevalue(fixture)
    return model, path, load_model(path, get_backend(backend)), load_reference(ref)["cases"]


@pytest.mark.real_model
def test_real_model_greedy_diverges_only_where_the_reference_margin_is_small(real):
    name, _, loaded, cases = real
    margins = first_divergence_margins(loaded, cases)
    assert all(m < 0.5 for m in margins), f"{name}: diverged at reference margins {margins}"


@pytest.mark.real_model
def test_real_model_teacher_forced_argmax_agrees_on_90_percent(real):
    name, _, loaded, cases = real
    assert teacher_forced_agreement(loaded, cases) >= 0.9


@pytest.mark.real_model
def test_real_model_perplexity_within_1_percent_of_numpy(real, request):
    name, path, loaded, cases = real
    long_case = next(c for c in cases if c["kind"] == "long")
    ppl = long_prompt_perplexity(loaded, long_case)
    reference = (request.getfixturevalue("smollm2_numpy") if name == "smollm2"     # shared with other tests
                 else load_model(path, get_backend("numpy")))
    ppl_numpy = long_prompt_perplexity(reference, long_case)
    assert math.isfinite(ppl) and abs(ppl / ppl_numpy - 1) <= 0.01, (ppl, ppl_numpy)


@pytest.mark.real_model
def test_real_model_logits_identical_with_graph_cache_on_and_off(real):
    name, _, loaded, cases = real
    prompt = cases[0]["prompt_ids"]
    traces = [greedy_trace(Context(loaded, n_ctx=256, graph_cache=on), loaded.tokenizer, prompt, 8)[1]
              for on in (True, False)]
    np.testing.assert_array_equal(traces[0], traces[1])


@pytest.mark.real_model
def test_real_model_weights_stay_compact(real):
    """Repacked weights take about the file's size (no float32 copies; the embedding table stays raw)."""
    name, path, loaded, _ = real
    assert loaded.backend.weights_nbytes(loaded.weights) <= 1.1 * path.stat().st_size


# ---- the native backend on tiny models ----------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("flash", [False, True], ids=["vtrans", "flash"])
@pytest.mark.parametrize("name", list(TINY_CASES))
def test_native_backend_tiny_model_logits_match_numpy(tmp_path, name, flash):
    assert_tiny_case_matches_numpy(tmp_path, name, "native", flash)


@needs_native
@pytest.mark.parametrize("weight_type", ["F16", "BF16"])
def test_float16_and_bfloat16_weights_run_as_stored(tmp_path, weight_type):
    """F16 / BF16 matrices are read as the file stores them (no re-quantization): against the numpy float32
    reference of the same file, within float32 summation noise, as F32 files are; the output matrix too."""
    from kvgraph.backends import get_backend
    from kvgraph.engine.loader import load_model

    path = tmp_path / f"{weight_type}.gguf"
    write_tiny_llama(path, TinySpec(weight_type=weight_type, tied_output=False))
    loaded = load_model(path, get_backend("native"), tokenizer=False)
    mats = [w.matrix() for name, w in loaded.weights.items() if len(w.shape) == 2 and name != "token_embd.weight"]
    assert mats and all(m.exact and m.w.dtype == (np.float16 if weight_type == "F16" else np.uint16) for m in mats)
    assert all(not m.w.flags.owndata for m in mats)                  # the file's own bytes, mapped
    ref = logits_trace(path, "numpy", True, cache_type="f32")
    assert np.abs(logits_trace(path, "native", True, cache_type="f32") - ref).max() <= 1e-4


@needs_native
def test_a_re_quantization_is_named_at_load_and_in_info(tmp_path, capfd):
    from kvgraph.backends import get_backend
    from kvgraph.backends.native.mats import REQUANTIZED, runs_as
    from kvgraph.cli.main import main

    backend = get_backend("native")
    rng = np.random.default_rng(0)
    q2k = rng.integers(0, 256, (32, 84), dtype=np.uint8)           # Q2_K: 84 bytes per 256 weights, d and dmin last
    q2k[:, 80:84] = np.frombuffer(np.float16(0.01).tobytes() * 2, np.uint8)
    for name in ("a", "b"):
        assert not backend.matrix_form(q2k, "Q2_K", (32, 256), name).exact
    backend.finish_load()
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "2 Q2_K matrices re-quantized to 8 bits" in err
    assert runs_as("Q2_K") == REQUANTIZED and runs_as("Q4_K") != REQUANTIZED and runs_as("F16") == "float16, as stored"
    path = tmp_path / "f16.gguf"
    write_tiny_llama(path, TinySpec(weight_type="F16"))
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capfd.readouterr().out)
    assert info["tensor_types"]["F16"]["runs_as"] == "float16, as stored"


@needs_native
def test_native_backend_is_bit_identical_with_the_graph_cache_off(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny_llama(path, TinySpec(weight_type="Q4_1", n_embd=128, n_ff=256))
    np.testing.assert_array_equal(logits_trace(path, "native", True),
                                  logits_trace(path, "native", True, graph_cache=False))


@needs_native
def test_native_backend_defaults_to_flash_attention_and_replays_the_layers_as_one_c_call(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny_llama(path, TinySpec(weight_type="Q4_0"))
    ctx = Context(load_model(path, get_backend("native")), n_ctx=32)
    assert ctx.flash_attn is True
    ctx.decode(UBatch.single([1, 2, 3], 0))
    ctx.decode(UBatch.single([4], 3))
    decode = next(e for k, e in ctx.cache.entries.items() if k.n_tokens == 1)
    names = [k.__qualname__ for k in decode.program.kernels]
    # This tiny file keeps its embedding and output in F32 (numpy kernels); every layer op is one C call.
    assert sum(n.startswith("kvg_run") for n in names) == 1 and len(names) <= 4, names


@needs_native
def test_the_kv_cache_is_float16_where_the_c_kernels_run_attention_and_float32_on_request(tmp_path):
    """llama.cpp's default f16 K/V: half the bytes attention reads per token of context. The transposed
    (non-flash) V layout, the numpy reference's default and torch without the C kernels stay float32."""
    from kvgraph.errors import InvalidArgumentError

    path = tmp_path / "t.gguf"
    write_tiny_llama(path, TinySpec(weight_type="Q4_0"))
    loaded = load_model(path, get_backend("native"))

    def kv_dtypes(ctx):
        return {buf.dtype.type for buf in ctx.memories["kv"].buffers.values()}

    ctx = Context(loaded, n_ctx=32)
    assert ctx.cache_type == "f16" and kv_dtypes(ctx) == {np.float16}
    assert kv_dtypes(Context(loaded, n_ctx=32, cache_type="f32")) == {np.float32}
    no_flash = Context(loaded, n_ctx=32, flash_attn=False)
    assert kv_dtypes(no_flash) == {np.float32} and no_flash.cache_type == "f32"      # reported as stored
    half = logits_trace(path, "native", True)
    single = logits_trace(path, "native", True, cache_type="f32")
    # f16 rounding of K and V (grown a little by the int8 activations of this random model), nothing more
    assert 0 < np.abs(half - single).max() < 0.03 * np.ptp(single)
    numpy_loaded = load_model(path, get_backend("numpy"))
    assert Context(numpy_loaded, n_ctx=32).cache_type == "f32"
    assert kv_dtypes(Context(numpy_loaded, n_ctx=32, flash_attn=True, cache_type="f16")) == {np.float16}
    with pytest.raises(InvalidArgumentError, match="--cache-type f16"):
        Context(loaded, n_ctx=32, cache_type="q8_0")
    if torch_available():
        from kvgraph.backends.torch_backend import TorchBackend

        with pytest.raises(InvalidArgumentError, match="keeps the KV cache as f32"):
            Context(load_model(path, TorchBackend(native_kernels=False)), n_ctx=32, cache_type="f16")


@needs_native
def test_native_backend_never_imports_torch(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny_llama(path, TinySpec(weight_type="Q4_0"))
    code = ("import sys; from kvgraph import LLM; "
            f"llm = LLM({str(path)!r}, backend='native', n_ctx=32); llm.generate([1, 2, 3], max_tokens=3); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


@needs_native
def test_every_backend_meets_the_backend_protocol_and_compiles_through_one_loop(tmp_path):
    from kvgraph.backends import Backend

    path = tmp_path / "t.gguf"
    write_tiny_llama(path, TinySpec(weight_type="Q4_0"))
    for name in ["numpy", "native"] + (["torch"] if torch_available() else []):
        backend = get_backend(name)
        assert isinstance(backend, Backend), name
        ctx = Context(load_model(path, backend), n_ctx=32)
        ctx.decode(UBatch.single([1, 2, 3], 0))
        assert ctx.stats.misses == 1
        assert isinstance(ctx.cache.entries[next(iter(ctx.cache.entries))].program.kernels, list)


@needs_native
def test_backends_describe_the_kernels_they_run():
    assert "C kernels" in get_backend("native").describe()
    assert get_backend("numpy").describe().startswith("numpy")
    if torch_available():
        assert "C kernels" in get_backend("torch").describe()


@needs_native
def test_the_default_backend_is_native_where_the_c_kernels_build_then_torch_then_numpy(monkeypatch):
    import kvgraph.backends as backends

    assert backends.default_backend() == "native" and backends.get_backend(None).name == "native"
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_why_not", "no C compiler found")
    monkeypatch.setattr(backends, "torch_available", lambda: True)
    assert backends.default_backend() == "torch"
    monkeypatch.setattr(backends, "torch_available", lambda: False)
    assert backends.default_backend() == "numpy"
