"""The graph cache: hits replay without building, misses say why, and results never depend on it."""
from __future__ import annotations

import numpy as np
import pytest

import kvgraph.engine.context as context_mod
from kvgraph.backends import get_backend
from kvgraph.engine.context import Context
from kvgraph.engine.loader import load_model
from kvgraph.errors import GraphCacheVerifyError
from kvgraph.graph.cache import GraphCache
from kvgraph.graph.inputs import UBatch
from kvgraph.graph.key import GraphKey
from kvgraph.memory.kv_cache import PAGE, cells_for

PROMPT = [10, 20, 30, 40, 50]


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    return load_model(tiny_llama[0], get_backend("numpy"))


def greedy_run(ctx: Context, n_new: int = 12, prompt=PROMPT) -> tuple[list[int], np.ndarray]:
    logits = ctx.decode(UBatch.single(prompt, 0))
    ids, all_logits = [], [logits]
    for i in range(n_new):
        tok = int(np.argmax(logits[0]))
        ids.append(tok)
        logits = ctx.decode(UBatch.single([tok], len(prompt) + i))
        all_logits.append(logits)
    return ids, np.concatenate(all_logits)


class Counting:
    """Counts graph builds, plans and compiles done through the engine."""

    def __init__(self, monkeypatch, ctx):
        self.builds = self.plans = self.compiles = 0
        real_plan, real_compile, real_build = context_mod.plan_graph, ctx.backend.compile, ctx.model.build

        def plan(graph):
            self.plans += 1
            return real_plan(graph)

        def compile_(*a, **k):
            self.compiles += 1
            return real_compile(*a, **k)

        def build(*a, **k):
            self.builds += 1
            return real_build(*a, **k)
        monkeypatch.setattr(context_mod, "plan_graph", plan)
        monkeypatch.setattr(ctx.backend, "compile", compile_)
        monkeypatch.setattr(ctx.model, "build", build)


def test_decode_steps_hit_and_do_no_build_plan_or_compile(loaded, monkeypatch):
    ctx = Context(loaded, n_ctx=64)
    count = Counting(monkeypatch, ctx)
    ctx.decode(UBatch.single(PROMPT, 0))
    ctx.decode(UBatch.single([1], 5))
    assert (count.builds, count.plans, count.compiles) == (2, 2, 2)
    program = next(reversed(ctx.cache.entries.values())).program
    for p in range(6, 30):
        ctx.decode(UBatch.single([1], p))
    assert (count.builds, count.plans, count.compiles) == (2, 2, 2)
    assert ctx.stats.hits == 24 and ctx.stats.misses == 2
    assert dict(ctx.stats.reasons) == {"new key": 2}
    assert next(reversed(ctx.cache.entries.values())).program is program


def test_cache_on_and_off_are_bit_identical(loaded, monkeypatch):
    ids_on, logits_on = greedy_run(Context(loaded, n_ctx=64))
    off = Context(loaded, n_ctx=64, graph_cache=False)
    ids_off, logits_off = greedy_run(off)
    assert ids_on == ids_off
    assert np.array_equal(logits_on, logits_off)
    assert off.stats.hits == 0 and off.stats.reasons["disabled"] == off.stats.misses == 13


def test_env_var_disables_the_cache(loaded, monkeypatch):
    monkeypatch.setenv("KVGRAPH_NO_GRAPH_CACHE", "1")
    ctx = Context(loaded, n_ctx=64)
    greedy_run(ctx, 3)
    assert ctx.stats.hits == 0 and ctx.stats.reasons["disabled"] == 4


@pytest.mark.parametrize("flash_attn", [False, True])
def test_flash_attention_layouts_give_the_same_tokens_and_both_cache(loaded, flash_attn):
    ctx = Context(loaded, n_ctx=64, flash_attn=flash_attn)
    ids, _ = greedy_run(ctx)
    ref, _ = greedy_run(Context(loaded, n_ctx=64, flash_attn=not flash_attn))
    assert ids == ref
    assert ctx.stats.hits == 11
    kv = ctx.memories["kv"]
    assert kv.n_cells == cells_for(64, ctx.n_seq_max) and kv.n_cells % PAGE == 0
    assert kv.buffers["kv.v.0"].shape == ((kv.n_cells, 16) if flash_attn else (16, kv.n_cells))


def test_verify_mode_accepts_a_correct_cache(loaded, monkeypatch):
    monkeypatch.setenv("KVGRAPH_GRAPH_CACHE_VERIFY", "1")
    ctx = Context(loaded, n_ctx=64)
    greedy_run(ctx, 4)
    assert ctx.stats.verified == ctx.stats.hits == 3


def test_verify_mode_fails_loudly_when_the_key_misses_a_topology_change(loaded, monkeypatch):
    ctx = Context(loaded, n_ctx=64, verify=True)
    real_build = ctx.model.build
    calls = {"n": 0}

    def drifting_build(g, io):  # a model whose graph depends on something the key does not hold
        calls["n"] += 1
        real_build(g, io)
        if calls["n"] > 2:
            g.output("extra", g.scale(g.graph.outputs["logits"], 2.0))
    monkeypatch.setattr(ctx.model, "build", drifting_build)
    ctx.decode(UBatch.single(PROMPT, 0))
    ctx.decode(UBatch.single([1], 5))
    with pytest.raises(GraphCacheVerifyError, match="differs from the cached one"):
        ctx.decode(UBatch.single([1], 6))


def test_window_padding_keeps_the_key_stable_then_grows(loaded):
    ctx = Context(loaded, n_ctx=256 + 64)
    ctx.decode(UBatch.single(list(range(1, 251)), 0))
    keys = set()
    for p in range(250, 262):
        ctx.decode(UBatch.single([7], p))
        keys.add(ctx.key_for(UBatch.single([7], p)).windows)
    assert ctx.stats.reasons["new key"] == 3  # the prompt, decode at window 256, decode at window 320
    assert ctx.stats.hits == 10


def test_lru_evicts_the_oldest_and_says_so():
    cache = GraphCache(capacity=2)
    keys = [GraphKey(n, 1, True, (("kv", 256),), 1) for n in (1, 2, 3)]
    from kvgraph.graph.cache import CacheEntry
    for k in keys:
        assert cache.lookup(k) is None
        cache.record_miss(k)
        cache.insert(CacheEntry(k, None, None, None, []))
    assert cache.lookup(keys[0]) is None
    cache.record_miss(keys[0])
    assert cache.stats.reasons == {"new key": 3, "evicted": 1}
    assert cache.lookup(keys[2]) is not None and len(cache) == 2


def test_different_batch_shapes_get_different_entries(loaded):
    ctx = Context(loaded, n_ctx=64, cache_capacity=4)
    ctx.decode(UBatch.single([1, 2, 3], 0))
    ctx.decode(UBatch.single([4, 5], 3))
    ctx.decode(UBatch.single([6], 5))
    ctx.clear()
    ctx.decode(UBatch.single([1, 2, 3], 0))
    assert ctx.stats.misses == 3 and ctx.stats.hits == 1
    assert len(ctx.cache) == 3


def test_stats_time_split_is_recorded(loaded):
    ctx = Context(loaded, n_ctx=64)
    greedy_run(ctx, 3)
    d = ctx.stats.as_dict()
    assert d["hits"] == 2 and d["misses"] == 2  # the prompt and the first decode step build
    for field in ("build_ms", "plan_ms", "compile_ms", "set_inputs_ms", "compute_ms"):
        assert d[field] > 0
    assert "2 hits, 2 misses (new key: 2)" in ctx.stats.summary()


@pytest.mark.parametrize("backend", ["numpy", "native"])
def test_a_contexts_programs_share_one_compute_buffer_without_changing_a_bit(tiny_llama, backend, monkeypatch):
    """Programs of one context run one at a time, so they compute in one buffer (the largest graph's, not the
    sum over the cached graphs); graphs of growing size interleaved with cached smaller ones give exactly
    what programs with buffers of their own give."""
    from kvgraph.backends import native

    if backend == "native" and native.library() is None:
        pytest.skip(native.why_not())
    loaded = load_model(tiny_llama[0], get_backend(backend))

    def run(ctx: Context) -> np.ndarray:
        out = []
        for prompt in ([7, 8], list(range(10, 50)), [7, 8], list(range(60, 130)), [9], list(range(20, 25))):
            ctx.clear()
            ids, logits = greedy_run(ctx, 3, prompt)
            out.append(logits)
        return np.concatenate(out)

    shared_ctx = Context(loaded, n_ctx=128)
    shared = run(shared_ctx)
    entries = list(shared_ctx.cache.entries.values())
    plans = sum(e.plan.arena_size for e in entries)
    buffers = {id(o.base if o.base is not None else o): o for e in entries for o in e.program.outputs.values()}
    assert len(entries) >= 4 and len(buffers) < len(entries)           # programs share buffers
    assert shared_ctx._arena.size < plans and shared_ctx._arena.size <= 2 * max(e.plan.arena_size for e in entries)

    own_ctx = Context(loaded, n_ctx=128)
    monkeypatch.setattr(own_ctx, "_arena_for", lambda plan: np.empty(plan.arena_size, np.uint8))
    np.testing.assert_array_equal(shared, run(own_ctx))


@pytest.mark.parametrize("backend", ["numpy", "native", "torch"])
def test_in_place_buffers_change_no_logit(tiny_llama, backend, monkeypatch):
    """The planner's in-place reuse (a SwiGLU over its gate, a residual add over its sum) next to the
    compilers' fusions (norm x weight, stacked q/k/v and gate/up) gives the logits of separate buffers."""
    from functools import partial

    from kvgraph.backends import native, torch_available

    if backend == "native" and native.library() is None:
        pytest.skip(native.why_not())
    if backend == "torch" and not torch_available():
        pytest.skip("torch is not installed")
    loaded = load_model(tiny_llama[0], get_backend(backend))
    prompts = ([7, 8], list(range(10, 50)))
    inplace = [greedy_run(Context(loaded, n_ctx=96), 4, p)[1] for p in prompts]
    monkeypatch.setattr(context_mod, "plan_graph", partial(context_mod.plan_graph, inplace=False))
    separate = [greedy_run(Context(loaded, n_ctx=96), 4, p)[1] for p in prompts]
    for a, b in zip(inplace, separate):
        np.testing.assert_array_equal(a, b)
