"""SmolLM2-135M-Instruct (Q4_1) on the numpy backend against HF transformers f32 reference outputs:
prompt ids exact, greedy ids per design.md §8, top-5 logits within 1e-2, and the graph cache changing nothing."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import load_reference
from golden import compare_greedy, prompt_ids_for, trace_cases

pytestmark = pytest.mark.real_model
REF = load_reference("smollm2_public.json")
CASES = REF["cases"]
IDS = [f"{c['kind']}{i}" for i, c in enumerate(CASES)]


@pytest.fixture(scope="module")
def traces(smollm2_numpy):
    """Greedy traces of every case with the graph cache on and off (non-flash layout), and flash-attn on."""
    return trace_cases(smollm2_numpy, CASES, {"on": {}, "off": {"graph_cache": False}, "fa": {"flash_attn": True}})


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_prompt_ids_match_reference_exactly(smollm2_numpy, i):
    assert prompt_ids_for(smollm2_numpy.tokenizer, CASES[i]) == CASES[i]["prompt_ids"]


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_greedy_continuation_matches_reference(traces, i):
    ids, logits = traces["on"][i]
    compare_greedy(CASES[i], ids, logits, margin_limit=0.05, top5_atol=1e-2)


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_flash_attention_layout_matches_reference(traces, i):
    ids, logits = traces["fa"][i]
    compare_greedy(CASES[i], ids, logits, margin_limit=0.05, top5_atol=1e-2)


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_graph_cache_on_off_bit_identical(traces, i):
    ids_on, logits_on = traces["on"][i]
    ids_off, logits_off = traces["off"][i]
    assert ids_on == ids_off
    assert np.array_equal(logits_on, logits_off)


def test_cache_was_really_used(traces):
    on, off = traces["on_stats"], traces["off_stats"]
    assert on.hits > 200 and on.misses < 20
    assert off.hits == 0 and off.reasons["disabled"] == off.misses


def test_greedy_text_decodes_like_reference(smollm2_numpy):
    tok = smollm2_numpy.tokenizer
    for case in CASES:
        assert tok.decode(case["greedy_ids"]) == case["greedy_text"]
