"""Token sampling, in llama.cpp's order: repetition penalty -> logit bias -> top-k -> top-p -> min-p ->
temperature -> draw.

temperature 0 is greedy: the argmax of the (penalized, biased) logits, ties to the lowest id.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import InvalidArgumentError, KvgraphError, short_repr

# The accepted ranges. Each keeps the arithmetic finite: a repeat penalty of 5e-324 divides logits to inf and
# every probability to NaN, so "positive" alone is not a range.
TEMPERATURE_MAX = 100.0
REPEAT_PENALTY_RANGE = (0.01, 100.0)
LOGIT_BIAS_MAX = 100.0       # OpenAI's range for logit_bias values
INT31 = (1 << 31) - 1
SEED_RANDOM = -1             # llama.cpp's "pick a random seed"


class SamplingError(KvgraphError):
    """Sampling one sequence's next token failed (non-finite logits); ends that request only."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None                          # None or -1: random
    logit_bias: Mapping[int, float] | None = None    # token id -> added to its logit before sampling

    def validate(self, n_vocab: int | None = None) -> "SamplingParams":
        """self, or InvalidArgumentError listing every parameter out of range. n_vocab: also check the
        logit_bias token ids against the vocabulary."""
        problems = []

        def number(name, lo, hi, lo_open=False, integer=False):
            v = getattr(self, name)
            ok = (isinstance(v, (int, np.integer)) if integer else isinstance(v, (int, float, np.number))) \
                and not isinstance(v, bool) and math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi
            if not ok:
                problems.append(f"{name} must be {'an integer' if integer else 'a number'} in "
                                f"{'(' if lo_open else '['}{lo}, {hi}], got {short_repr(v)}")

        number("temperature", 0.0, TEMPERATURE_MAX)
        number("top_k", 0, INT31, integer=True)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("min_p", 0.0, 1.0)
        number("repeat_penalty", *REPEAT_PENALTY_RANGE)
        number("repeat_last_n", 0, INT31, integer=True)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or not SEED_RANDOM <= self.seed < 1 << 64):
            problems.append(f"seed must be an integer in [0, 2^64) or -1 for a random seed, got "
                            f"{short_repr(self.seed)}")
        if self.logit_bias is not None:
            problems += _logit_bias_problems(self.logit_bias, n_vocab)
        if problems:
            raise InvalidArgumentError("invalid sampling parameters: " + "; ".join(problems) + ".")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def _logit_bias_problems(bias, n_vocab: int | None) -> list[str]:
    if not isinstance(bias, Mapping):
        return [f"logit_bias must map token ids to numbers, got {short_repr(bias)}"]
    for tok, value in bias.items():
        if isinstance(tok, bool) or not isinstance(tok, (int, np.integer)) or tok < 0 or (
                n_vocab is not None and tok >= n_vocab):
            vocab = f"0..{n_vocab - 1}" if n_vocab is not None else "the vocabulary"
            return [f"logit_bias key {short_repr(tok)} is not a token id ({vocab})"]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not \
                -LOGIT_BIAS_MAX <= value <= LOGIT_BIAS_MAX:
            return [f"logit_bias[{tok}] must be a number in [-{LOGIT_BIAS_MAX:g}, {LOGIT_BIAS_MAX:g}], "
                    f"got {short_repr(value)}"]
    return []


GREEDY = SamplingParams(temperature=0.0)


class Sampler:
    def __init__(self, params: SamplingParams, n_vocab: int | None = None):
        self.params = params.validate(n_vocab)
        self.rng = np.random.default_rng(None if params.seed == SEED_RANDOM else params.seed)
        bias = params.logit_bias or {}
        self.bias_ids = np.fromiter(bias.keys(), np.int64, len(bias))
        self.bias_values = np.fromiter(bias.values(), np.float32, len(bias))

    def apply_penalty(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        p = self.params
        if p.repeat_penalty == 1.0 or p.repeat_last_n == 0 or not len(history):
            return logits
        recent = np.unique(np.asarray(history[-p.repeat_last_n:], dtype=np.int64))
        logits = logits.copy()
        vals = logits[recent]
        logits[recent] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        return logits

    def sample(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        p = self.params
        logits = self.apply_penalty(np.asarray(logits, dtype=np.float32), history)
        if self.bias_ids.shape[0]:
            logits = logits.copy()                  # never edit the caller's array
            logits[self.bias_ids] += self.bias_values
        if p.greedy:
            tok = int(np.argmax(logits))
            if not math.isfinite(logits[tok]):      # argmax is a NaN or +inf: nothing sensible to pick
                raise SamplingError(_NON_FINITE)
            return tok
        # Candidates sorted by logit, best first; top-k bounds the sort.
        cand = top_candidates(logits, logits.shape[0] if p.top_k <= 0 else min(p.top_k, logits.shape[0]))
        vals = logits[cand].astype(np.float64)
        if not math.isfinite(vals[0]):          # the best candidate is +inf, or every logit is NaN
            raise SamplingError(_NON_FINITE)
        with np.errstate(invalid="ignore"):     # a NaN among the candidates: caught below, no warning
            probs = np.exp(vals - vals[0])
            probs /= probs.sum()
            if p.top_p < 1.0:
                keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
                cand, vals, probs = cand[:keep], vals[:keep], probs[:keep]
            if p.min_p > 0.0:
                keep = max(1, int(np.count_nonzero(probs >= p.min_p * probs[0])))
                cand, vals = cand[:keep], vals[:keep]
            weights = np.exp((vals - vals[0]) / p.temperature)
            total = weights.sum()
        if not math.isfinite(total):
            raise SamplingError(_NON_FINITE)
        weights /= total
        return int(cand[self.rng.choice(cand.shape[0], p=weights)])


_NON_FINITE = ("the model produced non-finite logits (NaN or infinity) for this sequence, so no token can be "
               "sampled; the model file's weights are likely broken.")


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under the model's distribution (softmax of the raw logits) and the `top` most probable
    tokens with theirs, best first (ties to the lowest id)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    lse = m + math.log(np.exp(x - m).sum())
    best = [(int(i), float(x[i] - lse)) for i in top_candidates(x, min(top, x.shape[0]))] if top > 0 else []
    return float(x[token] - lse), best


def top_candidates(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits, best first, ties to the lowest id."""
    cand = np.argpartition(-logits, k - 1)[:k] if k < logits.shape[0] else np.arange(logits.shape[0])
    return cand[np.lexsort((cand, -logits[cand]))]
