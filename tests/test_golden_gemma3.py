"""Gemma3-270M (Q4_K_M) on the numpy backend against HF transformers f32 reference outputs, including
prompts longer than the 512-token sliding window: prompt ids exact (SPM, BOS), greedy ids per design.md §8,
top-5 logits within 1e-2, and the graph cache changing nothing."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import load_reference
from golden import compare_greedy, prompt_ids_for, trace_cases

pytestmark = pytest.mark.real_model
REF = load_reference("gemma3_public.json")
CASES = REF["cases"]
IDS = [f"{c['kind']}{i}" for i, c in enumerate(CASES)]


@pytest.fixture(scope="module")
def gemma3_numpy(gemma3_path):
    from kvgraph.backends import get_backend
    from kvgraph.engine.loader import load_model

    return load_model(gemma3_path, get_backend("numpy"))


@pytest.fixture(scope="module")
def traces(gemma3_numpy):
    return trace_cases(gemma3_numpy, CASES, {"on": {}, "off": {"graph_cache": False}})


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_prompt_ids_match_reference_exactly(gemma3_numpy, i):
    assert prompt_ids_for(gemma3_numpy.tokenizer, CASES[i]) == CASES[i]["prompt_ids"]


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_greedy_continuation_matches_reference(traces, i):
    ids, logits = traces["on"][i]
    compare_greedy(CASES[i], ids, logits, margin_limit=0.05, top5_atol=1e-2)


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_graph_cache_on_off_bit_identical(traces, i):
    assert traces["on"][i][0] == traces["off"][i][0]
    assert np.array_equal(traces["on"][i][1], traces["off"][i][1])


def test_long_prompts_exceed_the_window_and_both_memories_are_used(gemma3_numpy, traces):
    assert max(len(c["prompt_ids"]) for c in CASES if c["kind"] == "long") > 512
    assert traces["on_stats"].hits > 200


def test_builtin_chat_template_is_used_and_reported(gemma3_numpy):
    assert gemma3_numpy.tokenizer.chat_template_source == "builtin:gemma"
