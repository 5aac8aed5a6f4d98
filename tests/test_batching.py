"""Continuous batching: several sequences share decode ubatches padded to bucket sizes; every request's
greedy output equals running it alone; cancellation, queue limits and draining behave."""
from __future__ import annotations

import threading

import pytest

from kvgraph.api import LLM
from kvgraph.engine.batching import BatchScheduler, QueueFullError, Request, ShuttingDownError, bucket_sizes
from kvgraph.engine.context import Context
from kvgraph.errors import ContextOverflowError, InvalidArgumentError
from kvgraph.memory.kv_cache import PAGE

PROMPTS = ["the cat", "a dog ran in the sun", "then", "the the the", "sat on the mat and", "x", "in an hour",
           "hello world"]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama[0]), n_ctx=64)


def alone(llm, prompt, n):
    llm.session.reset()
    return llm.generate(prompt, max_tokens=n, ignore_eos=True).ids


def scheduler(llm, parallel, **kw):
    ctx = Context(llm.loaded, n_ctx=64 * parallel + parallel, n_ubatch=8, **kw)
    return BatchScheduler(ctx, llm.tokenizer, parallel=parallel, n_ctx_per_seq=64)


def test_bucket_sizes():
    assert bucket_sizes(1) == (1,) and bucket_sizes(8) == (1, 2, 4, 8) and bucket_sizes(6) == (1, 2, 4, 6)


def test_every_request_in_a_batch_equals_running_it_alone(llm):
    n = [5, 17, 9, 12, 3, 20, 8, 14]
    expected = [alone(llm, p, k) for p, k in zip(PROMPTS, n)]
    sched = scheduler(llm, 4)
    reqs = [sched.submit(Request(llm.tokenize(p), max_tokens=k, ignore_eos=True)) for p, k in zip(PROMPTS, n)]
    got = [r.wait(timeout=60).ids for r in reqs]
    sched.shutdown()
    assert got == expected
    st = sched.stats
    assert st.requests_finished == 8 and st.generated_tokens_total == sum(n)
    assert st.batch_rows_total / st.decode_steps > 1.5        # really batched
    # a handful of graphs: one per prompt-chunk shape and per decode bucket (x window growth: each slot's
    # sequence takes a page of its own, after the padding rows' page 0, and windows are powers of two pages)
    assert sched.ctx.stats.misses <= 16 and sched.ctx.stats.hits > sched.ctx.stats.misses
    assert {w for k in sched.ctx.cache.entries for _, w in k.windows} <= {PAGE, 2 * PAGE, 4 * PAGE, 8 * PAGE}


def test_requests_join_and_leave_while_others_run(llm):
    sched = scheduler(llm, 2)
    first = sched.submit(Request(llm.tokenize("the cat"), max_tokens=30, ignore_eos=True))
    chunks = first.stream(timeout=60)
    next(chunks)                                   # first is decoding now
    second = sched.submit(Request(llm.tokenize("a dog"), max_tokens=4, ignore_eos=True))
    assert second.wait(timeout=60).ids == alone(llm, "a dog", 4)
    list(chunks)
    assert first.result.ids == alone(llm, "the cat", 30)
    sched.shutdown()


def test_cancel_frees_the_slot(llm):
    sched = scheduler(llm, 1)
    req = sched.submit(Request(llm.tokenize("the cat"), max_tokens=50, ignore_eos=True))
    it = req.stream(timeout=60)
    next(it)
    req.cancel()
    list(it)
    assert req.result.finish_reason == "cancelled"
    nxt = sched.submit(Request(llm.tokenize("then"), max_tokens=3, ignore_eos=True))
    assert nxt.wait(timeout=60).ids == alone(llm, "then", 3)
    assert sched.active == 0 and sched.stats.requests_cancelled == 1
    sched.shutdown()


def test_queue_limit_and_context_limit(llm):
    ctx = Context(llm.loaded, n_ctx=130, n_ubatch=8)
    gate = threading.Event()
    sched = BatchScheduler(ctx, llm.tokenizer, parallel=1, n_ctx_per_seq=64, max_queue=1)
    orig = sched._prefill_one
    sched._prefill_one = lambda: (gate.wait(10), orig())[1]   # hold the engine so the queue fills
    sched.submit(Request(llm.tokenize("a"), max_tokens=2))
    import time
    deadline = time.time() + 5
    while sched.queue_depth and time.time() < deadline:
        time.sleep(0.01)
    sched.submit(Request(llm.tokenize("b"), max_tokens=2))
    with pytest.raises(QueueFullError):
        sched.submit(Request(llm.tokenize("c"), max_tokens=2))
    with pytest.raises(ContextOverflowError):
        sched.submit(Request(llm.tokenize("d"), max_tokens=100))
    gate.set()
    sched.shutdown(drain=True, timeout=30)
    assert sched.stats.requests_finished == 2
    with pytest.raises(ShuttingDownError):
        sched.submit(Request(llm.tokenize("e"), max_tokens=2))


def test_recurrent_models_decode_their_sequences_together(tmp_path):
    """Each sequence of a decode ubatch reads and writes its own state slot (attention + recurrent layers)."""
    from tiny_models import write_tiny_hybrid
    path = tmp_path / "hybrid.gguf"
    write_tiny_hybrid(path)
    llm = LLM(str(path), n_ctx=64)
    expected = [alone(llm, p, 6) for p in PROMPTS[:3]]
    sched = scheduler(llm, 3)
    reqs = [sched.submit(Request(llm.tokenize(p), max_tokens=6, ignore_eos=True)) for p in PROMPTS[:3]]
    assert [r.wait(timeout=60).ids for r in reqs] == expected
    sched.shutdown()
    assert sched.stats.batch_rows_total > sched.stats.decode_steps


def _sequential(sched, prompts_ids, n):
    out = []
    for ids in prompts_ids:
        out.append(sched.submit(Request(ids, max_tokens=n, ignore_eos=True)).wait(timeout=60))
    return out


def _conversation(llm, sched, n_turns=3, n=5):
    """Each turn's prompt is the previous prompt, its reply and a new user line (a chat client's pattern)."""
    ids, results = llm.tokenize("the cat sat on the mat"), []
    for turn in range(n_turns):
        res = sched.submit(Request(list(ids), max_tokens=n, ignore_eos=True)).wait(timeout=60)
        results.append((list(ids), res))
        ids = ids + res.ids + llm.tokenize(f" and then {turn}", add_bos=False)
    return results


@pytest.mark.parametrize("model", ["llama", "hybrid"])
def test_prefix_cache_reuses_an_idle_slots_cells_and_changes_nothing(llm, tmp_path, model):
    """A follow-up prompt runs only its new tokens (the prompt and reply so far stay in the slot's cells;
    a recurrent state goes on from where it stopped) and the reply equals running the whole prompt cold."""
    if model == "hybrid":
        from tiny_models import write_tiny_hybrid
        write_tiny_hybrid(tmp_path / "hybrid.gguf")
        llm = LLM(str(tmp_path / "hybrid.gguf"), n_ctx=64)
    sched = scheduler(llm, 2)
    turns = _conversation(llm, sched)
    sched.shutdown()
    for i, (ids, res) in enumerate(turns):
        assert res.ids == alone(llm, ids, 5)
        assert res.timings.n_cached + res.timings.n_prompt == len(ids)
        if i:    # the previous turn's prompt and reply were in the cells (all but the last reply token, never fed)
            prev_ids, prev = turns[i - 1]
            assert res.timings.n_cached == len(prev_ids) + len(prev.ids) - 1
    assert sched.stats.prompt_tokens_cached == sum(r.timings.n_cached for _, r in turns) > 0
    assert sched.stats.prompt_tokens_total == sum(r.timings.n_prompt for _, r in turns)


@pytest.fixture(scope="module")
def hybrid_llm(tmp_path_factory):
    from tiny_models import write_tiny_hybrid
    path = tmp_path_factory.mktemp("hybrid") / "hybrid.gguf"
    write_tiny_hybrid(path)
    return LLM(str(path), n_ctx=64)


def test_state_checkpoints_restart_a_regenerated_or_edited_prompt(hybrid_llm):
    """A recurrent state cannot rewind: a checkpoint taken before each prompt's last token lets a prompt
    that leaves the cached one (the same prompt again, as a regenerated reply; an edited last message) start
    from there instead of from zero, with the reply a cold run gives."""
    llm = hybrid_llm
    sched = scheduler(llm, 1)
    p1 = llm.tokenize("the cat sat on the mat")
    first, again = _sequential(sched, [p1, list(p1)], 5)
    assert first.timings.n_cached == 0 and again.timings.n_cached == len(p1) - 1 and again.ids == first.ids
    base = p1 + first.ids
    p2, p2_edit = base + llm.tokenize(" and then", add_bos=False), base + llm.tokenize(" or else", add_bos=False)
    second, edited = _sequential(sched, [p2, p2_edit], 5)
    assert second.timings.n_cached == len(base) - 1          # goes on where the cells stop: no checkpoint needed
    assert edited.timings.n_cached == len(p1) - 1            # leaves p2 before its checkpoint: p1's is the latest
    (slot,) = sched.slot_info()
    # p2's checkpoint went with the cells after p1's; the edited prompt left its own
    assert slot["checkpoints"]["positions"] == [len(p1) - 1, len(p2_edit) - 1] and slot["checkpoints"]["bytes"] > 0
    sched.shutdown()
    for ids, res in [(p1, first), (p1, again), (p2, second), (p2_edit, edited)]:
        assert res.ids == alone(llm, ids, 5)
    off = BatchScheduler(Context(llm.loaded, n_ctx=65, n_ubatch=8), llm.tokenizer, parallel=1, n_ctx_per_seq=64,
                         checkpoints=0)
    assert [r.timings.n_cached for r in _sequential(off, [p1, list(p1)], 5)] == [0, 0]
    off.shutdown()


def test_a_checkpoint_budget_that_cannot_hold_one_is_a_clear_error(hybrid_llm, llm):
    with pytest.raises(InvalidArgumentError, match="one state checkpoint of this model takes .* MiB, more than"):
        BatchScheduler(Context(hybrid_llm.loaded, n_ctx=65), hybrid_llm.tokenizer, parallel=1, n_ctx_per_seq=64,
                       checkpoint_bytes=16)
    plain = BatchScheduler(Context(llm.loaded, n_ctx=65), llm.tokenizer, parallel=1, n_ctx_per_seq=64,
                           checkpoint_bytes=16)     # attention only: nothing to checkpoint, any budget will do
    assert plain.checkpoints == 0
    plain.shutdown()


def test_prefix_cache_keeps_a_shared_prefix_and_drops_the_rest(llm):
    """A prompt that shares only its start with a cached one keeps those cells, drops the others, and still
    matches a cold run; the last prompt token always runs (its logits pick the first reply token)."""
    a, b = llm.tokenize("the cat sat on the mat and"), llm.tokenize("the cat sat in an hour")
    sched = scheduler(llm, 1)
    first, second, again = _sequential(sched, [a, b, list(b)], 4)
    sched.shutdown()
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert first.timings.n_cached == 0 and second.timings.n_cached == common
    assert again.timings.n_cached == len(b) - 1 and again.timings.n_prompt == 1
    for ids, res in [(a, first), (b, second), (b, again)]:
        assert res.ids == alone(llm, ids, 4)


def test_prefix_cache_prefers_the_matching_slot_and_can_be_turned_off(llm):
    a, b = llm.tokenize("the cat sat on the mat"), llm.tokenize("a dog ran in the sun")
    sched = scheduler(llm, 2)
    _sequential(sched, [a, b], 3)                  # slot 0 holds a, slot 1 holds b
    res_b, res_a = _sequential(sched, [b + [5], a + [6]], 3)
    assert res_b.timings.n_cached == len(b) and res_a.timings.n_cached == len(a)
    assert {s["n_cached_tokens"] for s in sched.slot_info()} == {len(a) + 3, len(b) + 3}
    no = sched.submit(Request(a + [6], max_tokens=3, ignore_eos=True, cache_prompt=False)).wait(timeout=60)
    assert no.timings.n_cached == 0 and no.ids == res_a.ids
    sched.shutdown()
    off = BatchScheduler(Context(llm.loaded, n_ctx=130, n_ubatch=8), llm.tokenizer, parallel=2,
                         n_ctx_per_seq=64, prefix_cache=False)
    assert [r.timings.n_cached for r in _sequential(off, [a, a + [6]], 3)] == [0, 0]
    off.shutdown()


def test_a_sliding_window_cache_holds_a_window_for_every_slot():
    """Nine slots of a 32-token-window model each keep up to a window of cells at once (288 cells, more
    than one window cache's 256): the window cache is sized per slot, nothing overflows, and every reply
    equals its run alone."""
    from pathlib import Path

    from kvgraph.engine.batching import scheduler_context
    gemma2 = LLM(str(Path(__file__).parent / "data" / "arch" / "gemma2.gguf"), n_ctx=64)
    ctx = scheduler_context(gemma2.loaded, 9, 40, n_ubatch=8)
    assert ctx.memories["kv_swa"].n_cells >= 9 * 32
    sched = BatchScheduler(ctx, gemma2.tokenizer, parallel=9, n_ctx_per_seq=40)
    prompts = [[(7 * i + j) % 200 + 1 for j in range(24)] for i in range(9)]
    pending = [sched.submit(Request(p, max_tokens=16, ignore_eos=True)) for p in prompts]
    results = [r.wait(timeout=120) for r in pending]
    sched.shutdown()
    for p, res in zip(prompts, results):
        assert res.ids == alone(gemma2, p, 16)


def test_a_sliding_window_slot_keeps_its_cells_for_the_next_turn():
    """Sliding-window layers keep only the window before a sequence's last tokens: a prompt that goes on where
    the cells stop (a chat's next turn) reuses them, one that leaves them earlier than the window reaches
    starts over; every reply equals its cold run."""
    from pathlib import Path
    gemma2 = LLM(str(Path(__file__).parent / "data" / "arch" / "gemma2.gguf"), n_ctx=96)
    window = gemma2.loaded.config.sliding_window
    sched = BatchScheduler(Context(gemma2.loaded, n_ctx=194, n_ubatch=8), gemma2.tokenizer, parallel=2,
                           n_ctx_per_seq=96)
    first_ids = [(5 * j) % 200 + 1 for j in range(window + 10)]      # longer than the window: cells get pruned
    (first,) = _sequential(sched, [first_ids], 4)
    turn = first_ids + first.ids + [7, 8, 9]
    again = first_ids[:12] + [3, 3]                                 # leaves the cells long before their window
    (second,) = _sequential(sched, [turn], 4)
    (third,) = _sequential(sched, [again], 4)
    sched.shutdown()
    assert second.timings.n_cached == len(first_ids) + len(first.ids) - 1
    assert third.timings.n_cached == 0
    for ids, res in [(first_ids, first), (turn, second), (again, third)]:
        assert res.ids == alone(gemma2, ids, 4)


@pytest.mark.parametrize("flash_attn", [True, False])
def test_sliding_window_checkpoints_restart_a_prompt_whose_window_was_pruned(flash_attn):
    """A prompt longer than the window, and a reply after it, leave the window cells before the prompt's end
    pruned: regenerating the reply (the same prompt again) or editing the next turn restarts from the
    window's snapshot taken before the prompt's last token -- not from zero -- with the replies of cold runs,
    in both V layouts."""
    from pathlib import Path
    gemma2 = LLM(str(Path(__file__).parent / "data" / "arch" / "gemma2.gguf"), n_ctx=160, flash_attn=flash_attn)
    window = gemma2.loaded.config.sliding_window
    sched = BatchScheduler(Context(gemma2.loaded, n_ctx=161, n_ubatch=8, flash_attn=flash_attn), gemma2.tokenizer,
                           parallel=1, n_ctx_per_seq=160)
    p1 = [(5 * j) % 200 + 1 for j in range(window + 10)]
    first, again = _sequential(sched, [p1, list(p1)], window)        # the reply prunes p1's last cells' window
    base = p1 + first.ids
    second, edited = _sequential(sched, [base + [7, 8, 9], base + [9, 8]], 4)
    (slot,) = sched.slot_info()
    sched.shutdown()
    assert first.timings.n_cached == 0 and again.timings.n_cached == len(p1) - 1
    assert second.timings.n_cached == len(base) - 1            # goes on where the cells stop
    assert edited.timings.n_cached == len(p1) - 1              # the window before base's end is gone: p1's snapshot
    assert slot["checkpoints"]["bytes"] > 0
    for ids, res, n in [(p1, first, window), (p1, again, window), (base + [7, 8, 9], second, 4),
                        (base + [9, 8], edited, 4)]:
        assert res.ids == alone(gemma2, ids, n)
    off = BatchScheduler(Context(gemma2.loaded, n_ctx=161, n_ubatch=8, flash_attn=flash_attn), gemma2.tokenizer,
                         parallel=1, n_ctx_per_seq=160, checkpoints=0)
    assert [r.timings.n_cached for r in _sequential(off, [p1, list(p1)], window)] == [0, 0]
    off.shutdown()


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0", "f32 transposed V"])
def test_a_window_snapshot_restores_the_cells_it_took_in_every_cache_layout(kind):
    """KVCache.snapshot keeps a sequence's last window of cells (positions, every layer's K and V rows) and
    restore puts them back, in pages of the sequence's own, bit for bit, for each storage type and V layout;
    the cache can then go on from the snapshot's position."""
    import numpy as np

    from kvgraph.backends.reference import Q8_0_BLOCK
    from kvgraph.graph.inputs import UBatch
    from kvgraph.memory.kv_cache import KVCache

    rng = np.random.default_rng(5)
    dtype = {"f16": np.float16, "q8_0": Q8_0_BLOCK}.get(kind, np.float32)

    def alloc(shape, cache=True):
        if dtype is Q8_0_BLOCK and cache:
            return np.zeros((shape[0], shape[1] // 32), Q8_0_BLOCK)
        return np.zeros(shape, dtype if cache else np.float32)

    kv = KVCache("kv", [0, 3], 1024, 2, 32, 32, kind.endswith("transposed V"), alloc, sliding_window=40)
    kv.prepare(UBatch.single(np.zeros(300, np.int32), 0, seq=1))
    for b in kv.buffers.values():
        b.view(np.uint8)[...] = rng.integers(0, 256, b.view(np.uint8).shape, dtype=np.uint8)

    def rows_by_pos():
        cells = np.flatnonzero(kv.cell_seq == 1)
        order = cells[np.argsort(kv.cell_pos[cells])]
        return kv.cell_pos[order].tolist(), {n: (b[:, order] if kv.v_trans and ".v." in n else b[order]).copy()
                                             for n, b in kv.buffers.items()}

    snap = kv.snapshot(1)
    assert snap["pos"].tolist() == list(range(260, 300))
    kept_pos, kept = rows_by_pos()
    kv.seq_rm(1)
    kv.prepare(UBatch.single(np.zeros(700, np.int32), 0, seq=2))       # another sequence takes the pages
    kv.seq_rm(2, 0, 10)
    kv.restore(1, snap, 300)
    pos, rows = rows_by_pos()
    assert pos == list(range(260, 300)) and kv.can_keep(1, 300)
    for name, want in kept.items():
        got = rows[name]
        np.testing.assert_array_equal(got.view(np.uint8), (want[:, -40:] if kv.v_trans and ".v." in name
                                                           else want[-40:]).view(np.uint8))
    assert kv.snapshot_bytes() >= sum(a.nbytes for n, a in snap.items() if n != "pos")


def test_every_request_in_a_batch_equals_running_it_alone_over_a_q8_0_cache(tmp_path):
    """A q8_0 KV cache (the tiny llama with 32-dimensional heads: whole Q8_0 blocks): each request's greedy
    text in a batch is its text alone, as for f16."""
    from tiny_models import TinySpec, write_tiny_llama

    path = tmp_path / "llama.gguf"
    write_tiny_llama(path, TinySpec(weight_type="Q4_1", n_embd=128, n_ff=256))
    q8 = LLM(str(path), n_ctx=64, cache_type="q8_0")
    if q8.ctx.cache_type != "q8_0":
        pytest.skip(f"the {q8.loaded.backend.name} backend keeps {q8.ctx.cache_type} by default here")
    n = [5, 17, 9, 12, 3, 20]
    expected = [alone(q8, p, k) for p, k in zip(PROMPTS, n)]
    sched = scheduler(q8, 4, cache_type="q8_0")
    got = [r.wait(timeout=60).ids for r in
           [sched.submit(Request(q8.tokenize(p), max_tokens=k, ignore_eos=True)) for p, k in zip(PROMPTS, n)]]
    sched.shutdown()
    assert got == expected and sched.ctx.cache_type == "q8_0"
