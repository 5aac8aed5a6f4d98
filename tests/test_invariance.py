"""The same bits wherever a token runs, on every build of the C kernels this CPU runs (portable C, AVX2 and,
where the CPU has it, AVX-512 VNNI: an AVX-512 machine tests the AVX2 and portable paths too).

A token's logits do not depend on the ubatch it is split into, on the other sequences decoded with it, on
where its sequence's KV pages lie, on whether its prefix came from cached cells, nor on the graph cache;
greedy text alone == batched == prefix-cached through the server's scheduler. Checked bit for bit on the
tiny llama (quantized), gemma3 (sliding window) and kvgraph-hybrid models, the hybrid and recurrent
architecture fixtures (float32 as converted and Q8_0 copies; Jamba's experts stay float32), and the real
SmolLM2 and Gemma3."""
from __future__ import annotations

import numpy as np
import pytest

from arch_fixtures import fixture, quantized_copy
from kvgraph.api import LLM
from kvgraph.backends import native
from kvgraph.engine.batching import BatchScheduler, Request, scheduler_context
from kvgraph.graph.inputs import UBatch
from tiny_models import TinySpec, write_tiny_gemma3, write_tiny_hybrid, write_tiny_llama

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"native kernels unavailable: {native.why_not()}")


@pytest.fixture(params=native.runnable_isas())
def isa(request, monkeypatch):
    """Each build of the C kernels this CPU runs, in turn (the programs compiled while it is in use call it)."""
    monkeypatch.setattr(native, "_lib", native.build(request.param))
    native.set_threads(2)
    return request.param


TINY = ["llama-Q4_1", "gemma3", "gemma3-Q8_0", "hybrid"]
FIXTURES = [f"{name}{suffix}" for name in ("mamba2", "jamba", "falcon-h1", "granitehybrid", "granitehybrid-moe", "lfm2",
                                           "qwen3next", "qwen35", "qwen35moe")
            for suffix in ("", "-Q8_0")]
KV_Q8 = ["llama-Q4_1:q8_0"]      # name:cache type -- the tiny llama (32-dimensional heads) over a q8_0 KV cache


def _model(model_path, name: str) -> tuple[str, dict]:
    """The model's path and the Context options its name asks for (a KV cache type after a colon)."""
    base, _, cache_type = name.partition(":")
    return model_path(base), ({"cache_type": cache_type} if cache_type else {})


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    made = {}

    def get(name: str) -> str:
        if name not in made:
            base, _, qtype = name.partition("-Q")
            folder = tmp_path_factory.mktemp(name)
            if base == "llama":
                path = folder / "llama.gguf"
                write_tiny_llama(path, TinySpec(weight_type="Q4_1", n_embd=128, n_ff=256))
            elif base in ("gemma3", "hybrid"):
                path = folder / f"{base}.gguf"
                (write_tiny_gemma3 if base == "gemma3" else write_tiny_hybrid)(path)
            else:
                path = fixture(base)[0]
            if qtype and base != "llama":
                path = quantized_copy(path, folder / f"q{qtype}.gguf", "Q" + qtype)
            made[name] = str(path)
        return made[name]
    return get


def test_a_kv_page_is_the_attention_kernels_segment():
    from kvgraph.backends.native import ops
    from kvgraph.memory.kv_cache import PAGE

    assert PAGE == ops.SEG


def _tokens(llm: LLM, n: int, seed: int = 1) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(5, llm.n_vocab, n)]


@pytest.mark.parametrize("name", TINY + FIXTURES + KV_Q8)
def test_logits_do_not_depend_on_the_ubatch_nor_on_the_graph_cache(isa, model_path, name):
    path, kv = _model(model_path, name)
    llm = LLM(path, backend="native", n_ctx=128, **kv)
    tokens = _tokens(llm, 40)
    whole = llm.logits(tokens)
    for ubatch in (7, 1):
        np.testing.assert_array_equal(llm.logits(tokens, ubatch_size=ubatch), whole)
    off = LLM(path, backend="native", n_ctx=128, graph_cache=False, **kv)
    np.testing.assert_array_equal(off.logits(tokens, ubatch_size=5), whole)
    # a prompt continued from cached cells: its last token's logits equal the cold prompt's
    llm.session.reset()
    llm.session.eval_prompt(tokens[:23])
    warm = llm.session.eval_prompt(tokens)
    assert llm.session.n_processed == len(tokens) - 23     # recurrent states too: the prompt goes on where they stopped
    np.testing.assert_array_equal(warm[0], whole[-1])


@pytest.mark.parametrize("name", TINY + FIXTURES + KV_Q8)
def test_a_sequence_decoded_with_others_equals_it_decoded_alone(isa, model_path, name):
    """Four sequences of different lengths prefilled one after another into the pages of a server's
    context, then one decode step for all of them in one ubatch with padding rows: each row's logits are
    the bits of that sequence run alone."""
    path, kv = _model(model_path, name)
    llm = LLM(path, backend="native", n_ctx=64, **kv)
    tokens = _tokens(llm, 60, seed=2)
    prompts = [tokens[i * 11: i * 11 + 3 + 2 * i] for i in range(4)]
    nxt = tokens[50:54]
    alone = []
    for p, t in zip(prompts, nxt):
        llm.session.reset()
        llm.session.eval_prompt(p)
        alone.append(llm.session.step(t)[0])
    ctx = scheduler_context(llm.loaded, 5, 64, n_ubatch=8, **kv)
    ctx.use_scratch(5)
    for seq, p in zip((3, 0, 2, 4), prompts):          # pages taken in another order than the sequences'
        for start in range(0, len(p), 8):
            ctx.decode(UBatch.single(p[start: start + 8], start, seq))
    seqs = [3, 0, 2, 4]
    ub = UBatch(np.array(nxt + [0] * 4, np.int32), np.array([len(p) for p in prompts] + [0] * 4, np.int32),
                np.array(seqs + [5, 6, 7, 8], np.int32), np.arange(8, dtype=np.int32))
    batched = ctx.decode(ub)
    for i in range(4):
        np.testing.assert_array_equal(batched[i], alone[i])


@pytest.mark.parametrize("name", TINY + ["granitehybrid-Q8_0"] + KV_Q8)
def test_a_sequence_whose_pages_lie_out_of_order_equals_it_alone(isa, model_path, name):
    """A sequence that goes on into a page another one freed (its blocks 0, 1, 2 in pages 1, 2, 0 of the
    window): attention merges the pages in block order, so its logits are the bits of the sequence alone."""
    path, kv = _model(model_path, name)
    llm = LLM(path, backend="native", n_ctx=600, **kv)
    tokens = _tokens(llm, 540, seed=4)
    alone = llm.logits(tokens)
    ctx = scheduler_context(llm.loaded, 2, 600, n_ubatch=64, **kv)
    ctx.decode(UBatch.single(tokens[:5], 0, 1))                 # another sequence takes page 0
    for start in range(0, 500, 64):
        ctx.decode(UBatch.single(tokens[start: min(start + 64, 500)], start, 0))
    ctx.seq_rm(1)                                               # and leaves it
    got = [ctx.decode(UBatch.single([t], p, 0))[0] for p, t in enumerate(tokens[500:], 500)]
    kv = next(m for m in ctx.memories.values() if hasattr(m, "page_of"))
    assert [kv.page_of[0, b] for b in range(3)] == [1, 2, 0]
    np.testing.assert_array_equal(np.stack(got), alone[500:])


def _greedy_alone_batched_cached(llm: LLM, prompts: list[list[int]], n: int):
    kv = {"cache_type": llm.ctx.cache_type}
    alone = []
    for p in prompts:
        llm.session.reset()
        alone.append(llm.generate(p, max_tokens=n, ignore_eos=True).ids)
    sched = BatchScheduler(scheduler_context(llm.loaded, 4, 256, n_ubatch=16, **kv), llm.tokenizer, parallel=4,
                           n_ctx_per_seq=256)
    try:
        batched = [r.wait(timeout=300).ids for r in
                   [sched.submit(Request(p, max_tokens=n, ignore_eos=True)) for p in prompts]]
        cached = [r.wait(timeout=300).ids for r in
                  [sched.submit(Request(p, max_tokens=n, ignore_eos=True)) for p in prompts]]
        reused = sched.stats.prompt_tokens_cached
    finally:
        sched.shutdown()
    return alone, batched, cached, reused


@pytest.mark.parametrize("name", TINY + FIXTURES + KV_Q8)
def test_greedy_text_alone_equals_batched_equals_prefix_cached(isa, model_path, name):
    path, kv = _model(model_path, name)
    llm = LLM(path, backend="native", n_ctx=256, **kv)
    tokens = _tokens(llm, 80, seed=3)
    prompts = [tokens[i * 9: i * 9 + 4 + i] for i in range(6)]
    alone, batched, cached, _ = _greedy_alone_batched_cached(llm, prompts, 16)
    assert batched == alone and cached == alone


@pytest.mark.real_model
@pytest.mark.parametrize("model", ["smollm2-135m", "gemma3-270m"])
def test_real_models_alone_equal_batched_equal_prefix_cached(isa, model):
    from kvgraph.registry import resolve_model

    llm = LLM(str(resolve_model(model, progress=False)), backend="native", n_ctx=256)
    texts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "My favourite colour is",
             "The meaning of life is", "In 1492, Columbus", "Water boils at"]
    if isa == "portable":        # plain C runs a real vocabulary's projection slowly: the same check, shorter
        texts, n = texts[:3], 6
    else:
        n = 24
    alone, batched, cached, reused = _greedy_alone_batched_cached(llm, [llm.tokenize(t) for t in texts], n)
    assert batched == alone and cached == alone
    if model == "smollm2-135m":                     # gemma3's sliding window frees a finished slot's cells
        assert reused > 0
