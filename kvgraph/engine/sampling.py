"""Token sampling, in llama.cpp's order: repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.

temperature <= 0 is greedy: the argmax of the (penalized) logits, ties to the lowest id.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import InvalidArgumentError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        problems = []
        if not np.isfinite(self.temperature):
            problems.append(f"temperature must be a finite number, got {self.temperature}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            problems.append(f"min_p must be in [0, 1], got {self.min_p}")
        if not (self.repeat_penalty > 0 and np.isfinite(self.repeat_penalty)):
            problems.append(f"repeat_penalty must be > 0 (1 disables it), got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            problems.append(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")
        if problems:
            raise InvalidArgumentError("invalid sampling parameters: " + "; ".join(problems) + ".")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


GREEDY = SamplingParams(temperature=0.0)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)

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
        if p.greedy:
            return int(np.argmax(logits))
        # Candidates sorted by logit, best first; top-k bounds the sort.
        k = logits.shape[0] if p.top_k <= 0 else min(p.top_k, logits.shape[0])
        cand = np.argpartition(-logits, k - 1)[:k] if k < logits.shape[0] else np.arange(logits.shape[0])
        cand = cand[np.lexsort((cand, -logits[cand]))]
        vals = logits[cand].astype(np.float64)
        probs = np.exp(vals - vals[0])
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = int(np.searchsorted(np.cumsum(probs), p.top_p) + 1)
            cand, vals, probs = cand[:keep], vals[:keep], probs[:keep]
        if p.min_p > 0.0:
            keep = max(1, int(np.count_nonzero(probs >= p.min_p * probs[0])))
            cand, vals = cand[:keep], vals[:keep]
        weights = np.exp((vals - vals[0]) / p.temperature)
        weights /= weights.sum()
        return int(cand[self.rng.choice(cand.shape[0], p=weights)])
