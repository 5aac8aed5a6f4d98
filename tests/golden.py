"""Comparing kvgraph with the HF transformers reference outputs in tests/data/reference (design.md §8)."""
from __future__ import annotations

import numpy as np

from kvgraph.engine.context import Context
from kvgraph.engine.generate import Session
from kvgraph.graph.inputs import UBatch


def prompt_ids_for(tokenizer, case: dict) -> list[int]:
    if case["kind"] == "chat":
        return tokenizer.encode_chat(case["prompt"], add_generation_prompt=True)
    return tokenizer.encode(case["prompt"])


def greedy_trace(ctx: Context, tokenizer, prompt_ids: list[int], n_new: int) -> tuple[list[int], np.ndarray]:
    """Exactly n_new argmax tokens (end tokens not stopped at), with the logits each was chosen from."""
    session = Session(ctx, tokenizer)
    session.reset()
    logits = session.eval_prompt(prompt_ids)[-1]
    ids, rows = [], []
    for i in range(n_new):
        rows.append(logits)
        tok = int(np.argmax(logits))
        ids.append(tok)
        if i + 1 < n_new:
            logits = session.step(tok)[-1]
    return ids, np.stack(rows)


def compare_greedy(case: dict, ids: list[int], logits: np.ndarray, margin_limit: float, top5_atol: float | None):
    """Assert the design.md §8 rule; returns the number of steps compared."""
    for i, step in enumerate(case["steps"]):
        if top5_atol is not None:
            got = logits[i][[t for t, _ in step["top5"]]]
            ref = np.array([v for _, v in step["top5"]], np.float32)
            assert np.max(np.abs(got - ref)) <= top5_atol, (
                f"{case['kind']} {case['prompt']!r:.40}: step {i} top-5 logits off by {np.max(np.abs(got - ref)):.4f}")
        if ids[i] != step["id"]:
            assert step["margin"] < margin_limit, (
                f"{case['kind']} {case['prompt']!r:.40}: diverged at step {i} (got {ids[i]}, want {step['id']}) "
                f"where the reference margin is {step['margin']}")
            return i
    return len(case["steps"])


def trace_cases(loaded, cases: list[dict], configs: dict[str, dict], n_ctx: int = 1024) -> dict:
    """Greedy traces of every case under each named Context configuration (e.g. cache on / off), plus
    each configuration's graph-cache stats under '<name>_stats'."""
    out = {}
    for name, kw in configs.items():
        ctx = Context(loaded, n_ctx=n_ctx, **kw)
        out[name] = [greedy_trace(ctx, loaded.tokenizer, c["prompt_ids"], len(c["steps"])) for c in cases]
        out[name + "_stats"] = ctx.stats
    return out


# ---- the rule for backends that compute with quantized weights / activations (design.md §8) -----------------
def teacher_forced_agreement(loaded, cases) -> float:
    agree = total = 0
    for case in cases:
        ids = case["prompt_ids"] + case["greedy_ids"]
        ctx = Context(loaded, n_ctx=1024, n_ubatch=1024)
        logits = ctx.decode(UBatch.single(ids, 0, all_outputs=True))
        p = len(case["prompt_ids"])
        pred = logits[p - 1: p - 1 + len(case["greedy_ids"])].argmax(-1)
        agree += int((pred == np.array(case["greedy_ids"])).sum())
        total += len(case["greedy_ids"])
    return agree / total


def first_divergence_margins(loaded, cases) -> list[float]:
    """Greedy-decode each case; the reference margin where it first diverges (none: it never does)."""
    margins = []
    ctx = Context(loaded, n_ctx=1024)
    for case in cases:
        ids, _ = greedy_trace(ctx, loaded.tokenizer, case["prompt_ids"], len(case["steps"]))
        for i, step in enumerate(case["steps"]):
            if ids[i] != step["id"]:
                margins.append(step["margin"])
                break
    return margins


def long_prompt_perplexity(loaded, case) -> float:
    from kvgraph.perplexity import perplexity

    tokens = case["prompt_ids"]
    n_ctx = len(tokens) // 2 * 2
    return perplexity(Context(loaded, n_ctx=n_ctx, n_ubatch=n_ctx), loaded.tokenizer, tokens, n_ctx).ppl
