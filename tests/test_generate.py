"""The generation loop: streaming, stop strings, end tokens, max tokens, prefix reuse, context limits."""
from __future__ import annotations

import pytest

from kvgraph.api import LLM
from kvgraph.engine.generate import GenerationResult
from kvgraph.engine.sampling import GREEDY
from kvgraph.errors import ContextOverflowError, InvalidArgumentError

PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama[0]), n_ctx=96)


def run(llm, prompt=PROMPT, **kw):
    res = GenerationResult([])
    chunks = list(llm.stream(prompt, result=res, **kw))
    return res, chunks


def test_streamed_chunks_concatenate_to_the_result_text(llm):
    res, chunks = run(llm, max_tokens=20, ignore_eos=True)
    assert "".join(chunks) == res.text == llm.detokenize(res.ids)
    assert len(res.ids) == 20 and res.finish_reason == "length"


def test_stop_string_truncates_and_is_never_emitted(llm):
    full, _ = run(llm, max_tokens=30, ignore_eos=True)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert stop
    res, chunks = run(llm, max_tokens=30, ignore_eos=True, stop=[stop])
    assert res.finish_reason == "stop"
    assert res.text == full.text[: full.text.index(stop)] == "".join(chunks)


def test_end_of_generation_token_stops_unless_ignored(llm, monkeypatch):
    full, _ = run(llm, max_tokens=12, ignore_eos=True)
    eog = full.ids[4]
    monkeypatch.setattr(llm.tokenizer, "eog_ids", frozenset({eog}))
    res, _ = run(llm, max_tokens=12)
    assert res.finish_reason == "stop" and res.ids == full.ids[: full.ids.index(eog)]
    res, _ = run(llm, max_tokens=12, ignore_eos=True)
    assert res.ids == full.ids


def test_same_prompt_twice_reuses_the_cached_prefix(llm):
    llm.session.reset()
    first = llm.generate(PROMPT, max_tokens=5, ignore_eos=True)
    again = llm.generate(PROMPT, max_tokens=5, ignore_eos=True)
    assert again.ids == first.ids
    assert first.timings.n_prompt == len(first.prompt_ids) and again.timings.n_prompt == 1


def test_prompt_plus_max_tokens_beyond_the_context_is_a_clear_error(llm):
    with pytest.raises(ContextOverflowError, match="context size is 96"):
        llm.generate(PROMPT, max_tokens=200)


def test_negative_max_tokens_and_empty_prompt(llm):
    with pytest.raises(InvalidArgumentError):
        llm.generate(PROMPT, max_tokens=-1)
    with pytest.raises(InvalidArgumentError, match="empty"):
        llm.generate([], max_tokens=3)


def test_greedy_generation_is_deterministic_and_sampling_is_seeded(llm):
    from kvgraph.engine.sampling import SamplingParams
    a = llm.generate(PROMPT, max_tokens=8, ignore_eos=True, sampling=GREEDY).ids
    assert llm.generate(PROMPT, max_tokens=8, ignore_eos=True, sampling=GREEDY).ids == a
    p = SamplingParams(temperature=1.0, seed=7)
    assert llm.generate(PROMPT, max_tokens=8, ignore_eos=True, sampling=p).ids == \
        llm.generate(PROMPT, max_tokens=8, ignore_eos=True, sampling=p).ids


def test_ctx_shift_keeps_generating_past_the_context(tiny_llama):
    for cache in (True, False):
        llm = LLM(str(tiny_llama[0]), n_ctx=32, graph_cache=cache)
        res = llm.generate(PROMPT, max_tokens=80, ignore_eos=True, ctx_shift=True, n_keep=2)
        assert len(res.ids) == 80 and llm.session.n_shifts >= 3
        assert len(llm.session.cached) <= 32
        if cache:
            ids_on, misses_on = res.ids, llm.stats.misses
        else:
            assert res.ids == ids_on          # shifting never makes the graph cache change results
    assert misses_on < 10                     # shapes, not positions, pick graphs: shifts add no rebuilds


def test_after_a_shift_the_cache_equals_a_fresh_run_on_the_kept_tokens(tiny_llama):
    import numpy as np
    llm = LLM(str(tiny_llama[0]), n_ctx=32)
    s = llm.session
    s.eval_prompt(list(range(40, 72)))
    s.shift_context(n_keep=4)
    kept = list(s.cached)
    assert kept == list(range(40, 44)) + list(range(58, 72))
    shifted = s.step(7)
    fresh = LLM(str(tiny_llama[0]), n_ctx=32).session
    fresh.eval_prompt(kept)
    assert np.array_equal(shifted, fresh.step(7))


def test_without_ctx_shift_a_full_context_is_an_error_up_front(tiny_llama):
    llm = LLM(str(tiny_llama[0]), n_ctx=32)
    with pytest.raises(ContextOverflowError, match="--ctx-shift|context size is 32"):
        llm.generate(PROMPT, max_tokens=80)
