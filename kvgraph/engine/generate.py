"""The generation loop: prompt in ubatches, then one token per step, streamed as text.

A `Session` owns one sequence of a Context and remembers which tokens its KV cache holds, so a chat turn
(or any prompt sharing a prefix with the previous one) only processes the new suffix.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np

from ..errors import InvalidArgumentError, check_token_ids
from ..graph.inputs import UBatch
from .context import Context
from .sampling import GREEDY, Sampler, SamplingParams


def reusable_prefix(cached: Sequence[int], ids: Sequence[int]) -> int:
    """How many leading tokens of ids are already in cells holding `cached`, in order: their common prefix,
    short of the last prompt token, which always runs (its logits pick the first new token)."""
    n, limit = 0, min(len(cached), len(ids) - 1)
    while n < limit and cached[n] == ids[n]:
        n += 1
    return n


@dataclass
class Timings:
    n_prompt: int = 0          # prompt tokens actually processed (after prefix reuse)
    n_cached: int = 0          # prompt tokens reused from the cache (not processed)
    prompt_s: float = 0.0
    n_decode: int = 0          # decode steps run
    decode_s: float = 0.0
    sample_s: float = 0.0
    constraint_s: float = 0.0  # computing grammar masks (structured output)

    @property
    def prompt_tps(self) -> float:
        return self.n_prompt / self.prompt_s if self.prompt_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.n_decode / self.decode_s if self.decode_s else 0.0


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""    # 'stop' (end token or stop string), 'length' (max tokens)
    stop_word: str = ""        # the stop string that ended it, if one did
    # With logprobs asked for: per generated token (logprob, [(id, logprob) of the top alternatives]); with
    # echo, the same for the prompt's tokens (None for the first, which nothing predicts).
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)


def _find_stop(text: str, stops: Sequence[str], emitted: int) -> int | None:
    """Index of the earliest stop string in text that ends after `emitted` (None if there is none)."""
    found = [i for s in stops if (i := text.find(s, max(0, emitted - len(s) + 1))) >= 0]
    return min(found) if found else None


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text that could still grow into a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class Session:
    """One sequence in a Context: prompt processing with prefix reuse, then token-by-token generation."""

    def __init__(self, ctx: Context, tokenizer, seq: int = 0):
        self.ctx, self.tokenizer, self.seq = ctx, tokenizer, seq
        self.cached: list[int] = []   # tokens whose K/V are in the cache for this sequence, in order
        self.n_processed = 0          # tokens the last eval_prompt actually ran (the rest were reused)
        self.n_shifts = 0             # context shifts done (ctx_shift mode)

    def reset(self) -> None:
        self.ctx.seq_rm(self.seq)
        self.cached = []

    def eval_prompt(self, ids: Sequence[int], all_logits: bool = False, ubatch_size: int | None = None) -> np.ndarray:
        """Bring the cache to exactly `ids`, reusing the longest cached prefix; returns the last token's
        logits ([1, n_vocab]) or, with all_logits, the logits of every token (then nothing is reused).
        ubatch_size: tokens per graph run (default and at most the context's n_ubatch)."""
        ids = check_token_ids(ids, self.ctx.n_vocab)
        step = self.ctx.n_ubatch if ubatch_size is None else ubatch_size
        if not 1 <= step <= self.ctx.n_ubatch:
            raise InvalidArgumentError(f"ubatch_size must be between 1 and n_ubatch={self.ctx.n_ubatch}, got {step}.")
        if not ids:
            raise InvalidArgumentError("the prompt is empty (no tokens); give some text.")
        common = self.ctx.keep_prefix(self.seq, 0 if all_logits else reusable_prefix(self.cached, ids))
        self.cached = self.cached[:common]
        self.n_processed = len(ids) - common
        outs = []
        for start in range(common, len(ids), step):
            chunk = ids[start:start + step]
            ub = UBatch.single(chunk, start, self.seq, all_outputs=all_logits)
            last = self.ctx.decode(ub)
            self.cached.extend(chunk)
            if all_logits:
                outs.append(last)
        return np.concatenate(outs) if all_logits else last

    def step(self, token: int) -> np.ndarray:
        logits = self.ctx.decode(UBatch.single([token], len(self.cached), self.seq))
        self.cached.append(token)
        return logits

    def shift_context(self, n_keep: int = 0) -> None:
        """Make room when the context is full: keep the first n_keep tokens, drop the older half of the rest,
        and re-evaluate what is kept at its new positions. Re-evaluation (rather than re-rotating cached keys)
        makes the shifted cache exactly what a fresh run on the kept tokens gives; the graph cache is untouched
        because shapes, not positions, pick graphs."""
        n_keep = min(n_keep, len(self.cached) - 2)
        n_discard = (len(self.cached) - n_keep) // 2
        kept = self.cached[:n_keep] + self.cached[n_keep + n_discard:]
        self.reset()
        self.eval_prompt(kept)
        self.n_shifts += 1

    def generate(self, prompt_ids: Sequence[int], max_tokens: int = 128, sampling: SamplingParams = GREEDY,
                 stop: Sequence[str] = (), ignore_eos: bool = False, result: GenerationResult | None = None,
                 ctx_shift: bool = False, n_keep: int = 0) -> Iterator[str]:
        """Yield text chunks as tokens are generated; fills `result` (ids, text, finish reason, timings).
        Stops at an end-of-generation token (unless ignore_eos), a stop string, or max_tokens. Without
        ctx_shift, prompt + max_tokens must fit the context; with it, only the prompt must, and a full
        context is shifted (see shift_context) instead."""
        res = result if result is not None else GenerationResult([])
        res.prompt_ids = check_token_ids(prompt_ids, self.ctx.n_vocab)
        self.ctx.check_fits(len(res.prompt_ids), check_max_tokens(max_tokens), ctx_shift)
        sampler = Sampler(sampling, self.ctx.n_vocab)
        out = OutputTracker(self.tokenizer, res, max_tokens, stop, ignore_eos)
        tm = res.timings
        t0 = time.perf_counter()
        logits = self.eval_prompt(res.prompt_ids)
        tm.prompt_s += time.perf_counter() - t0
        tm.n_prompt += self.n_processed
        while not out.done:
            t0 = time.perf_counter()
            tok = sampler.sample(logits[-1], out.history)
            tm.sample_s += time.perf_counter() - t0
            chunk = out.push(tok)
            if chunk:
                yield chunk
            if not out.done:   # the last token's logits are never needed
                t0 = time.perf_counter()
                if ctx_shift and len(self.cached) >= self.ctx.n_ctx:
                    self.shift_context(n_keep)
                logits = self.step(tok)
                tm.decode_s += time.perf_counter() - t0
                tm.n_decode += 1


def check_max_tokens(max_tokens: int) -> int:
    if max_tokens < 0:
        raise InvalidArgumentError(f"max tokens must be >= 0, got {max_tokens}.")
    return max_tokens


class OutputTracker:
    """Turns sampled tokens into streamed text for one request: end tokens, stop strings (text that could
    start one is held back until it cannot), max tokens. Fills the GenerationResult as it goes."""

    def __init__(self, tokenizer, result: GenerationResult, max_tokens: int, stop: Sequence[str] = (),
                 ignore_eos: bool = False):
        self.res = result
        self.max_tokens = max_tokens
        self.stops = [s for s in stop if s]
        self.eog = frozenset() if ignore_eos else tokenizer.eog_ids
        self.decoder = tokenizer.stream_decoder()
        self.history = list(result.prompt_ids)   # what the repetition penalty looks at
        self.text, self.emitted = "", 0
        self.done = max_tokens == 0
        result.finish_reason = "length"

    def push(self, tok: int) -> str:
        """Account for one sampled token; returns the text that may be shown now (possibly empty)."""
        if tok in self.eog:
            self.res.finish_reason = "stop"
            return self._finish(flush=True)
        self.res.ids.append(tok)
        self.history.append(tok)
        self.text += self.decoder.feed(tok)
        cut = _find_stop(self.text, self.stops, self.emitted)
        if cut is not None:
            self.res.stop_word = next(s for s in self.stops if self.text.startswith(s, cut))
            self.text, self.res.finish_reason = self.text[:cut], "stop"
            return self._finish(flush=False)
        if len(self.res.ids) >= self.max_tokens:
            return self._finish(flush=True)
        safe = len(self.text) - _stop_holdback(self.text, self.stops)
        chunk = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return chunk

    def _finish(self, flush: bool) -> str:
        if flush:
            self.text += self.decoder.flush()
        self.done = True
        self.res.text = self.text
        chunk, self.emitted = self.text[self.emitted:], len(self.text)
        return chunk

    def cancel(self, reason: str = "cancelled") -> None:
        self.res.finish_reason = reason
        self.res.text = self.text[: self.emitted]
        self.done = True
