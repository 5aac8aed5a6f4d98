"""Perplexity as llama-perplexity computes it, and KL divergence against saved baseline logits.

The text is tokenized once and cut into chunks of n_ctx tokens (the first token of each chunk becomes BOS
when the model adds one). Each chunk is evaluated from an empty cache with every position's logits; the
negative log-likelihood is summed over the second half of the chunk (positions n_ctx/2 .. n_ctx-2, each
predicting the next token), so every scored token has at least n_ctx/2 tokens of context.
PPL = exp(mean NLL), reported ± exp(mean) * stddev(NLL) / sqrt(count - 1), as llama.cpp does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .engine.context import Context
from .engine.generate import Session
from .errors import InvalidArgumentError, KvgraphError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@dataclass
class KLStats:
    mean_kld: float
    kld_err: float
    top1_agreement: float        # fraction of scored positions whose argmax agrees with the baseline
    max_abs_dlogit: float        # largest |logit - baseline logit| over every position and token
    ppl_base: float
    n: int

    def summary(self) -> str:
        return (f"KL divergence vs baseline: mean {self.mean_kld:.6f} ± {self.kld_err:.6f}, "
                f"top-1 agreement {100 * self.top1_agreement:.2f}%, max |dlogit| {self.max_abs_dlogit:.4f}, "
                f"baseline PPL {self.ppl_base:.4f} ({self.n} positions)")


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    n_ctx: int
    n_chunks: int
    n_scored: int
    running: list[float] = field(default_factory=list)    # estimate after each chunk
    kl: KLStats | None = None

    def as_dict(self) -> dict:
        d = {"ppl": self.ppl, "ppl_err": self.ppl_err, "n_ctx": self.n_ctx, "n_chunks": self.n_chunks,
             "n_scored": self.n_scored, "running": self.running}
        if self.kl is not None:
            d["kl"] = self.kl.__dict__
        return d


def chunk_tokens(tokens: Sequence[int], n_ctx: int, bos: int | None, max_chunks: int | None) -> list[list[int]]:
    if n_ctx < 4:
        raise InvalidArgumentError(f"perplexity needs a context of at least 4 tokens, got {n_ctx}.")
    n = len(tokens) // n_ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n == 0:
        raise InvalidArgumentError(f"the text has {len(tokens)} tokens; perplexity with -c {n_ctx} needs at least "
                                   f"{n_ctx}. Use a longer text or a smaller -c.")
    chunks = [list(tokens[i * n_ctx:(i + 1) * n_ctx]) for i in range(n)]
    if bos is not None:
        for c in chunks:
            c[0] = bos
    return chunks


def perplexity(ctx: Context, tokenizer, tokens: Sequence[int], n_ctx: int, max_chunks: int | None = None,
               save_logits: str | Path | None = None, kl_baseline: str | Path | None = None,
               on_chunk: Callable[[int, int, float], None] | None = None) -> PerplexityResult:
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    chunks = chunk_tokens(tokens, n_ctx, bos, max_chunks)
    first = n_ctx // 2
    base = _load_baseline(kl_baseline, chunks, n_ctx) if kl_baseline else None
    session = Session(ctx, tokenizer)
    nll_sum = nll2_sum = 0.0
    count = 0
    running: list[float] = []
    saved: list[np.ndarray] = []
    kld: list[np.ndarray] = []
    agree = 0
    max_dlogit = 0.0
    base_nll = 0.0
    for ci, chunk in enumerate(chunks):
        session.reset()
        logits = session.eval_prompt(chunk, all_logits=True)[first:n_ctx - 1]
        logp = log_softmax(logits)
        targets = np.asarray(chunk[first + 1:n_ctx])
        nll = -logp[np.arange(len(targets)), targets]
        nll_sum += float(nll.sum())
        nll2_sum += float((nll * nll).sum())
        count += len(targets)
        running.append(math.exp(nll_sum / count))
        if save_logits is not None:
            saved.append(logits.astype(np.float32))
        if base is not None:
            b = base[ci]
            blogp = log_softmax(b)
            kld.append((np.exp(blogp) * (blogp - logp)).sum(-1))
            agree += int((b.argmax(-1) == logits.argmax(-1)).sum())
            max_dlogit = max(max_dlogit, float(np.abs(logits - b).max()))
            base_nll += float(-blogp[np.arange(len(targets)), targets].sum())
        if on_chunk:
            on_chunk(ci + 1, len(chunks), running[-1])
    mean = nll_sum / count
    var = nll2_sum / count - mean * mean
    err = math.exp(mean) * math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    result = PerplexityResult(math.exp(mean), err, n_ctx, len(chunks), count, running)
    if save_logits is not None:
        np.savez_compressed(save_logits, tokens=np.asarray([t for c in chunks for t in c], np.int32),
                            n_ctx=n_ctx, logits=np.stack(saved))
    if base is not None:
        k = np.concatenate(kld)
        result.kl = KLStats(float(k.mean()), float(k.std() / math.sqrt(max(1, len(k) - 1))), agree / count,
                            max_dlogit, math.exp(base_nll / count), count)
    return result


def _load_baseline(path, chunks, n_ctx) -> np.ndarray:
    try:
        data = np.load(path)
        tokens, base_ctx, logits = data["tokens"], int(data["n_ctx"]), data["logits"]
    except (OSError, KeyError, ValueError) as exc:
        raise KvgraphError(f"--kl-divergence: cannot read baseline {path} ({exc}); create it with --save-logits.") from None
    if base_ctx != n_ctx:
        raise KvgraphError(f"--kl-divergence: baseline was saved with -c {base_ctx}; run with -c {base_ctx}.")
    ours = np.asarray([t for c in chunks for t in c], np.int32)
    if tokens.shape[0] < ours.shape[0] or not np.array_equal(tokens[: ours.shape[0]], ours):
        raise KvgraphError("--kl-divergence: the baseline was computed on different tokens (another text, "
                           "tokenizer or chunk count); use the same file, model vocabulary and --chunks.")
    return logits[: len(chunks)]
