"""An 8-turn chat replayed through the server's scheduler with and without the prefix cache: per turn the
prompt length, the tokens taken from the cache, the time to the first token, and the graph-cache hits and
misses. Each turn sends the whole conversation so far (as a chat client does); the replies must be the same
both ways. --regenerate asks for each turn's reply twice (a chat UI's "regenerate"): the second time the
prompt leaves the cached conversation at its end, which a recurrent model can only reuse from a state
checkpoint; that second request is the one measured.
Usage: python tools/replay_conversation.py [model] [--turns N] [--max-tokens N] [--regenerate]
       [--ctx-checkpoints N]"""
from __future__ import annotations

import argparse

from kvgraph.api import LLM
from kvgraph.engine.batching import BatchScheduler, Request, scheduler_context
from kvgraph.registry import DEFAULT_MODEL, resolve_model

QUESTIONS = ["What is a graph cache?", "Why does it help decoding?", "And for prefill?", "Give an example.",
             "What can go wrong?", "How do you test it?", "Summarise in one line.", "Thanks, anything else?"]


def replay(llm: LLM, turns: int, max_tokens: int, prefix_cache: bool, parallel: int = 2, regenerate: bool = False,
           checkpoints: int = 8):
    per_seq = llm.ctx.n_ctx
    ctx = scheduler_context(llm.loaded, parallel, per_seq, n_ubatch=llm.ctx.n_ubatch, flash_attn=llm.ctx.flash_attn,
                            cache_type=llm.ctx.cache_type)
    sched = BatchScheduler(ctx, llm.tokenizer, parallel, per_seq, prefix_cache=prefix_cache, checkpoints=checkpoints)
    messages, rows = [{"role": "system", "content": "You are a concise assistant."}], []
    for i in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]})
        ids = llm.tokenizer.encode_chat(messages)
        if regenerate:      # the first reply, then the same prompt again: the second is the one measured
            sched.submit(Request(ids, max_tokens=max_tokens)).wait(timeout=600)
        hits, misses = ctx.stats.hits, ctx.stats.misses
        res = sched.submit(Request(ids, max_tokens=max_tokens)).wait(timeout=600)
        messages.append({"role": "assistant", "content": res.text})
        rows.append((len(ids), res.timings.n_cached, res.timings.prompt_s, ctx.stats.hits - hits,
                     ctx.stats.misses - misses, res.ids))
    sched.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--backend", default=None, help="native (default), numpy or torch")
    ap.add_argument("--regenerate", action="store_true", help="measure each turn's reply asked for a second time")
    ap.add_argument("--ctx-checkpoints", type=int, default=8, help="state checkpoints per slot (0: none)")
    args = ap.parse_args()
    llm = LLM(str(resolve_model(args.model, progress=False)), n_ctx=2048, backend=args.backend)
    replay(llm, 1, 4, False)     # warm the native kernels and page the weights in
    on = replay(llm, args.turns, args.max_tokens, True, regenerate=args.regenerate, checkpoints=args.ctx_checkpoints)
    off = replay(llm, args.turns, args.max_tokens, False, regenerate=args.regenerate)
    print(f"{'turn':>4} {'prompt':>6} {'cached':>6} {'TTFT on ms':>10} {'TTFT off ms':>11} {'ratio':>6} "
          f"{'hits/misses on':>14} {'off':>7}")
    for i, (a, b) in enumerate(zip(on, off)):
        print(f"{i + 1:>4} {a[0]:>6} {a[1]:>6} {a[2] * 1e3:>10.1f} {b[2] * 1e3:>11.1f} {b[2] / a[2]:>6.1f} "
              f"{a[3]:>7}/{a[4]:<6} {b[3]:>3}/{b[4]:<3}")
    same = all(a[5] == b[5] for a, b in zip(on, off))
    first = next((i + 1 for i, (a, b) in enumerate(zip(on, off)) if a[5] != b[5]), None)
    total_on, total_off = sum(r[2] for r in on), sum(r[2] for r in off)
    print(f"prompt time, all turns: {total_on * 1e3:.0f} ms with the prefix cache, {total_off * 1e3:.0f} ms "
          f"without ({total_off / total_on:.1f}x); replies identical: {same}"
          + ("" if same else f" (first difference in turn {first}: this backend rounds a prompt run in pieces "
                              "differently; see docs/design.md, prefix caching)"))


if __name__ == "__main__":
    main()
