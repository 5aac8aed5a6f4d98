"""Sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeds, parameter validation."""
from __future__ import annotations

import numpy as np
import pytest

from kvgraph.engine.sampling import GREEDY, Sampler, SamplingParams
from kvgraph.errors import InvalidArgumentError

LOGITS = np.array([1.0, 3.0, 3.0, 0.5, 2.0, -1.0], np.float32)


def draws(params, logits=LOGITS, n=2000, history=()):
    s = Sampler(params)
    return np.array([s.sample(logits, history) for _ in range(n)])


def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    assert Sampler(GREEDY).sample(LOGITS) == 1


def test_top_k_1_is_greedy_at_any_temperature():
    assert set(draws(SamplingParams(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=0), n=200)) == {1}


def test_same_seed_same_draws_and_other_seeds_differ():
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    a, b = draws(p, n=50), draws(p, n=50)
    c = draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=43), n=50)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_unfiltered_sampling_follows_the_softmax():
    freq = np.bincount(draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1), n=20000),
                       minlength=6) / 20000
    probs = np.exp(LOGITS - LOGITS.max())
    probs /= probs.sum()
    assert np.abs(freq - probs).max() < 0.015


def test_top_k_limits_candidates():
    assert set(draws(SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=2))) == {1, 2, 4}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # probabilities ~ [.06 .42 .42 .04 .16 .01]: p=0.5 needs the two tied best tokens
    assert set(draws(SamplingParams(temperature=1.0, top_k=0, top_p=0.5, min_p=0.0, seed=3))) == {1, 2}


def test_min_p_drops_tokens_below_a_fraction_of_the_best():
    assert set(draws(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.3, seed=4))) == {1, 2, 4}


def test_low_temperature_concentrates_on_the_best_tokens():
    hot = draws(SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=5))
    cold = draws(SamplingParams(temperature=0.1, top_k=0, top_p=1.0, min_p=0.0, seed=5))
    assert np.isin(cold, [1, 2]).mean() > 0.99 > np.isin(hot, [1, 2]).mean()


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    s = Sampler(SamplingParams(repeat_penalty=2.0, repeat_last_n=3))
    out = s.apply_penalty(LOGITS, history=[0, 5, 5, 1, 1])  # only the last 3 count: 5, 1
    assert out[1] == pytest.approx(1.5) and out[5] == pytest.approx(-2.0) and out[0] == LOGITS[0]
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=2.0)).sample(LOGITS, history=[1]) == 2


@pytest.mark.parametrize("kw", [dict(top_p=0.0), dict(top_p=1.5), dict(min_p=-0.1), dict(top_k=-1),
                                dict(repeat_penalty=0.0), dict(temperature=float("nan")), dict(repeat_last_n=-2)])
def test_invalid_parameters_are_clear_errors(kw):
    with pytest.raises(InvalidArgumentError, match="invalid sampling parameters"):
        SamplingParams(**kw).validate()
