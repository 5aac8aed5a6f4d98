"""Continuous batching: requests join and leave the running batch at any step.

One engine thread owns the Context. Each iteration it (1) admits queued requests into free sequence
slots, (2) runs at most one prompt ubatch of one admitted request (chunked prefill, so a long prompt never
stalls everyone else for long), and (3) runs one decode step for every sequence that is generating, as one
ubatch. The decode ubatch is padded to a bucket size (1, 2, 4, 8, ...) with throwaway rows, so a handful
of cached graphs serve every batch size, as vLLM does with CUDA graphs per batch-size bucket.

Each request's tokens arrive on its own queue as events; a cancelled request (client gone) frees its slot
at the next step.
"""
from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import ContextOverflowError, InvalidArgumentError, KvgraphError, check_token_ids
from ..graph.inputs import UBatch
from . import checkpoints as checkpoints_
from .context import Context
from .generate import GenerationResult, OutputTracker, check_max_tokens, reusable_prefix
from .sampling import GREEDY, Sampler, SamplingParams, token_logprobs


class QueueFullError(KvgraphError):
    """The server's request queue is full; retry later."""


class ShuttingDownError(KvgraphError):
    """The server is draining and takes no new requests."""


def _user_facing(exc: BaseException) -> KvgraphError:
    return exc if isinstance(exc, KvgraphError) else KvgraphError(f"internal error during a batch step: {exc!r}")


def _choice(req: "Request", i: int) -> "Request":
    """Choice i of a request: its own result and sampler seed (seed + i, so each choice is reproducible),
    the request's event queue (events carry the choice index)."""
    seed = req.sampling.seed
    sampling = req.sampling if seed is None or seed == -1 else dataclasses.replace(req.sampling,
                                                                                  seed=(seed + i) % (1 << 64))
    return Request(req.prompt_ids, req.max_tokens, sampling, req.stop, req.ignore_eos, id=f"{req.id}.{i}",
                   events=req.events, cancelled=req.cancelled, logprobs=req.logprobs, echo=req.echo, index=i,
                   constraint=req.constraint)


def bucket_sizes(parallel: int) -> tuple[int, ...]:
    sizes, b = [], 1
    while b < parallel:
        sizes.append(b)
        b *= 2
    return tuple(sizes) + (parallel,)


def scheduler_context(loaded, parallel: int, n_ctx_per_seq: int, **kw) -> Context:
    """The Context a BatchScheduler of `parallel` slots needs: a full n_ctx_per_seq context per slot, plus one
    KV cell and one recurrent state slot per padding row of the largest decode bucket (kw: Context's other
    options)."""
    pad = max(bucket_sizes(parallel))
    return Context(loaded, n_ctx=n_ctx_per_seq * parallel + pad, n_seq_max=parallel + pad, **kw)


@dataclass
class Event:
    kind: str                    # 'token' (text chunk), 'progress' (of the prompt), 'done', 'error'
    text: str = ""
    error: BaseException | None = None
    index: int = 0               # which choice of the request (n > 1)
    progress: dict | None = None  # 'progress': total, cache, processed (prompt tokens), time_ms


@dataclass
class Request:
    prompt_ids: list[int]
    max_tokens: int = 16
    sampling: SamplingParams = GREEDY
    stop: Sequence[str] = ()
    ignore_eos: bool = False
    id: str = ""
    # engine side
    result: GenerationResult = field(default_factory=lambda: GenerationResult([]))
    events: "queue.Queue[Event]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    cancel_reason: str = "cancelled"   # the finish reason a cancelled request reports
    logprobs: int | None = None        # None: off; k: each token's logprob and the k most probable tokens
    echo: bool = False                 # with logprobs: the prompt tokens' logprobs too (result.prompt_logprobs)
    n: int = 1                         # choices: the prompt is prefilled once, then forked into n sequences
    constraint: Any = None             # structured output: a maker of a fresh Constraint per sequence
    cache_prompt: bool = True          # may start from an idle slot's cells that share a prefix of the prompt
    progress: bool = False             # a 'progress' event as the prompt starts and after each of its chunks
    index: int = 0                     # this request's choice number (the others are in `choices`)
    choices: list["Request"] = field(default_factory=list)   # every choice, this one first (set by submit)

    def cancel(self, reason: str = "cancelled") -> None:
        for req in self.choices or [self]:
            if not req.cancelled.is_set():
                req.cancel_reason = reason
            req.cancelled.set()

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        """Text chunks until the request ends (every choice: their events share one queue); raises the
        request's error if it failed."""
        open_choices = max(1, len(self.choices))
        while open_choices:
            ev = self.events.get(timeout=timeout)
            if ev.kind == "token":
                yield ev.text
            elif ev.kind == "error":
                raise ev.error
            else:
                open_choices -= 1

    def wait(self, timeout: float | None = None) -> GenerationResult:
        for _ in self.stream(timeout):
            pass
        return self.result


class _Slot:
    """A request bound to a sequence id while it is prefilled and decoded."""

    def __init__(self, seq: int, req: Request, tokenizer, n_vocab: int):
        self.seq, self.req = seq, req
        self.req.result.prompt_ids = list(req.prompt_ids)
        self.sampler = Sampler(req.sampling, n_vocab)
        self.out = OutputTracker(tokenizer, req.result, req.max_tokens, req.stop, req.ignore_eos)
        self.prefilled = 0          # prompt tokens already in the cache
        self.admitted = time.perf_counter()
        self.pending_logprob = None     # the logprobs of the token being emitted
        self.followers: list["_Slot"] = []   # n > 1: the other choices, forked from this one after its prefill
        self.constraint = req.constraint() if req.constraint is not None else None   # its own grammar state
        self.waiting = False            # a follower whose leader has not finished the prompt yet
        self.first_token_at: float | None = None
        self.last_token: int | None = None
        self.n_past = 0


@dataclass
class SchedulerStats:
    requests_total: int = 0
    requests_finished: int = 0
    requests_failed: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    prompt_tokens_total: int = 0
    prompt_tokens_cached: int = 0       # prompt tokens found in an idle slot's cells (not run again)
    generated_tokens_total: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    batch_rows_total: int = 0
    started: float = field(default_factory=time.time)


class BatchScheduler:
    def __init__(self, ctx: Context, tokenizer, parallel: int, n_ctx_per_seq: int, max_queue: int = 64,
                 prefix_cache: bool = True, checkpoints: int = checkpoints_.DEFAULT_PER_SLOT,
                 checkpoint_bytes: int = checkpoints_.DEFAULT_BYTES):
        if parallel < 1:
            raise InvalidArgumentError(f"parallel must be >= 1, got {parallel}.")
        # State checkpoints where a memory cannot rewind (engine/checkpoints.py)
        one = 0 if ctx.can_rewind else ctx.checkpoint_bytes()
        if one and checkpoints and checkpoint_bytes < one:
            raise InvalidArgumentError(
                f"one state checkpoint of this model takes {one / 2**20:.1f} MiB, more than the "
                f"{checkpoint_bytes / 2**20:.1f} MiB allowed for them; allow more (--cache-ram MiB) or turn "
                "them off (--ctx-checkpoints 0).")
        self.checkpoints = checkpoints if one and prefix_cache else 0
        self._ckpts = checkpoints_.Checkpoints(max(self.checkpoints, 1), checkpoint_bytes)
        self.ctx, self.tokenizer = ctx, tokenizer
        self.parallel = parallel
        ctx.use_scratch(parallel)          # decode padding rows (see _decode_rows) share one KV page
        self.n_ctx_per_seq = n_ctx_per_seq
        self.max_queue = max_queue
        self.buckets = bucket_sizes(parallel)
        # Prefix caching: an idle slot keeps its cells, and a new prompt goes to the idle slot sharing its
        # longest prefix, running only the rest (llama.cpp's cache_prompt). Where a memory cannot keep any
        # prefix (a recurrent state, a sliding window's pruned cells) the usable part is smaller: see
        # _usable_prefix.
        self.prefix_cache = prefix_cache
        # idle slot -> the tokens its cells hold, in order; in release order (a slot leaves it when admitted)
        self._cached: dict[int, list[int]] = {}
        self.stats = SchedulerStats()
        self._queue: deque[Request] = deque()
        self._slots: dict[int, _Slot] = {}
        self._lock = threading.Condition()
        self._stopping = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="kvgraph-engine", daemon=True)
        self._thread.start()

    # ---- client side --------------------------------------------------------------------------------
    def submit(self, req: Request) -> Request:
        check_max_tokens(req.max_tokens)
        req.prompt_ids = check_token_ids(req.prompt_ids, self.ctx.n_vocab)
        if not req.prompt_ids:
            raise InvalidArgumentError("the prompt is empty (no tokens).")
        need = len(req.prompt_ids) + req.max_tokens
        if need > self.n_ctx_per_seq:
            raise ContextOverflowError(
                f"prompt of {len(req.prompt_ids)} tokens plus max_tokens {req.max_tokens} needs {need} tokens of "
                f"context, but each sequence has {self.n_ctx_per_seq}; shorten the prompt or lower max_tokens.",
                len(req.prompt_ids), self.n_ctx_per_seq)
        req.sampling.validate(self.ctx.n_vocab)   # now, in the caller's thread, not in the engine thread
        if not 1 <= req.n <= self.parallel:
            raise InvalidArgumentError(f"n = {req.n} choices need as many sequence slots; this server has "
                                       f"{self.parallel} (--parallel).")
        req.choices = [req] + [_choice(req, i) for i in range(1, req.n)]
        with self._lock:
            if self._stopping:
                self.stats.requests_rejected += 1
                raise ShuttingDownError("the server is shutting down; not accepting new requests.")
            if len(self._queue) >= self.max_queue:
                self.stats.requests_rejected += 1
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later.")
            req.id = req.id or f"req-{next(self._ids)}"
            self._queue.append(req)
            self.stats.requests_total += 1
            self._lock.notify()
        return req

    def slot_info(self) -> list[dict]:
        """What each sequence slot is doing (llama-server's /slots)."""
        running = dict(self._slots)          # a snapshot: the engine thread changes the dict as it goes
        cached = dict(self._cached)
        out = []
        for seq in range(self.parallel):
            slot = running.get(seq)
            info = {"id": seq, "n_ctx": self.n_ctx_per_seq, "is_processing": slot is not None,
                    "n_cached_tokens": len(cached.get(seq, ())), "checkpoints": self._ckpts.report(seq)}
            if slot is not None:
                info |= {"id_task": slot.req.id, "n_prompt_tokens": len(slot.req.prompt_ids),
                         "n_prompt_processed": slot.prefilled, "n_decoded": len(slot.req.result.ids)}
            out.append(info)
        return out

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active(self) -> int:
        return len(self._slots)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, finish the queued and running ones first; without, queued
        requests fail and running ones end now with finish reason 'shutdown' (what they generated stays)."""
        with self._lock:
            self._stopping = True
            if not drain:
                for req in self._queue:
                    req.events.put(Event("error", error=ShuttingDownError("the server shut down.")))
                self._queue.clear()
                for slot in self._slots.values():
                    slot.req.cancel("shutdown")
            self._lock.notify()
        self._thread.join(timeout)

    # ---- engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._slots and not self._stopping:
                    self._lock.wait()
                if self._stopping and not self._queue and not self._slots:
                    return
                self._admit()
            try:
                self._drop_cancelled()
                self._prefill_one()
                self._decode_step()
            except Exception as exc:  # a failure outside any one sequence's work: the running requests end
                for seq in list(self._slots):
                    self._fail(seq, exc)

    def _guarded(self, seq: int, work, *args):
        """work(*args) for one sequence; an error in it ends that request only (a bad sampling value or a
        broken constraint in one request must not fail the others in the batch)."""
        try:
            return work(*args)
        except Exception as exc:
            if seq in self._slots:
                self._fail(seq, exc)
            return None

    def _reuse(self, free: list[int], req: Request) -> tuple[int, int]:
        """(the free slot to prefill req in, how many of its prompt tokens are already in that slot's cells):
        the idle slot whose cached tokens share the longest prefix with the prompt."""
        # with no shared prefix, take a slot that caches nothing, else the one idle longest (every cached
        # slot is free, and the first in _cached was released first)
        unused = [s for s in free if s not in self._cached]
        best = (unused[0] if unused else next(iter(self._cached)), 0)
        if not self.prefix_cache or not req.cache_prompt or self._wants_prompt_logprobs(req):
            return best
        for seq, cached in self._cached.items():
            n = self._usable_prefix(seq, reusable_prefix(cached, req.prompt_ids), len(cached))
            if n > best[1]:
                best = (seq, n)
        return best

    def _usable_prefix(self, seq: int, n: int, n_cached: int) -> int:
        """How much of a shared prefix of n tokens seq can restart from: all of it where its memories can keep
        it (every memory when the prompt goes on exactly where the cells stop; a KV cache anywhere; a sliding
        window where its window before n is whole), else its latest checkpoint at or before n, else nothing."""
        if n == n_cached or self.ctx.can_keep(seq, n):
            return n
        ck = self._ckpts.latest_at_or_before(seq, n)
        return ck if ck and self.ctx.can_keep_from_checkpoint(seq, ck) else 0

    def _admit(self) -> None:
        free = [s for s in range(self.parallel) if s not in self._slots]
        while self._queue and len(free) >= len(self._queue[0].choices or [None]):
            req = self._queue.popleft()
            choices = req.choices or [req]
            first, reused = self._reuse(free, req)
            free.remove(first)
            seqs, free = [first] + free[:len(choices) - 1], free[len(choices) - 1:]
            try:
                slots = [_Slot(seq, choice, self.tokenizer, self.ctx.n_vocab) for seq, choice in zip(seqs, choices)]
            except Exception as exc:
                self.stats.requests_failed += 1
                req.events.put(Event("error", error=_user_facing(exc)))
                free[:0] = seqs
                continue
            for slot in slots:
                self._cached.pop(slot.seq, None)
                self._slots[slot.seq] = slot
            leader = slots[0]
            # Keep the reused prefix, drop the rest (a recurrent state cannot rewind: unless the prompt goes on
            # exactly where it stopped, that sequence starts over).
            reused = leader.prefilled = self.ctx.keep_prefix(leader.seq, reused, self._ckpts.of(leader.seq))
            self._ckpts.keep_until(leader.seq, reused)
            leader.req.result.timings.n_cached = reused
            self.stats.prompt_tokens_cached += reused
            for follower in slots[1:]:
                self.ctx.seq_rm(follower.seq)
                self._ckpts.drop(follower.seq)
            leader.followers = slots[1:]      # they wait for the leader's prefill, then fork its cells
            for follower in leader.followers:
                follower.waiting = True
            if leader.out.done and not self._wants_prompt_logprobs(req):
                for slot in slots:              # max_tokens 0: nothing to generate, answer at once
                    self._finish(slot.seq)
                free[:0] = [s for s in seqs if s not in self._slots]

    def _drop_cancelled(self) -> None:
        for seq, slot in list(self._slots.items()):
            if slot.req.cancelled.is_set():
                slot.out.cancel(slot.req.cancel_reason)
                self.stats.requests_cancelled += 1
                self._release(seq, Event("done"))

    def _release(self, seq: int, event: Event, keep_cache: bool = True) -> None:
        slot = self._slots.pop(seq)
        tm, now = slot.req.result.timings, time.perf_counter()    # wall times of this request in the batch
        tm.constraint_s = slot.constraint.seconds if slot.constraint is not None else 0.0
        tm.prompt_s = (slot.first_token_at or now) - slot.admitted
        tm.decode_s = now - (slot.first_token_at or now)
        if keep_cache and self.prefix_cache and not slot.waiting:
            # what the cells hold: the prompt as far as it ran, then every generated token fed back
            held = slot.n_past if slot.first_token_at is not None else slot.prefilled
            self._cached[seq] = slot.out.history[:held]
        else:
            self.ctx.seq_rm(seq)
            self._ckpts.drop(seq)
        slot.req.events.put(event)

    def _fail(self, seq: int, exc: BaseException) -> None:
        self.stats.requests_failed += 1
        slot = self._slots.get(seq)
        self._release(seq, Event("error", error=_user_facing(exc), index=slot.req.index if slot else 0),
                      keep_cache=False)
        for follower in slot.followers if slot else ():
            if follower.waiting and self._slots.get(follower.seq) is follower:
                self._fail(follower.seq, exc)

    def _finish(self, seq: int) -> None:
        self.stats.requests_finished += 1
        self._release(seq, Event("done", index=self._slots[seq].req.index))

    def _emit(self, seq: int, tok: int) -> None:
        slot = self._slots[seq]
        n_before = len(slot.req.result.ids)
        chunk = slot.out.push(tok)
        self.stats.generated_tokens_total += len(slot.req.result.ids) - n_before
        if slot.pending_logprob is not None and len(slot.req.result.ids) > n_before:   # an end token adds none
            slot.req.result.logprobs.append(slot.pending_logprob)
        slot.pending_logprob = None
        if chunk:
            slot.req.events.put(Event("token", chunk, index=slot.req.index))
        if slot.out.done:
            self._finish(seq)
        else:
            slot.last_token = tok

    @staticmethod
    def _wants_prompt_logprobs(req: Request) -> bool:
        return req.echo and req.logprobs is not None

    def _prefill_one(self) -> None:
        slot = next((s for s in self._slots.values() if s.last_token is None and not s.waiting and
                     (not s.out.done or self._wants_prompt_logprobs(s.req) and s.prefilled < len(s.req.prompt_ids))),
                    None)
        if slot is None:
            return
        ids = slot.req.prompt_ids
        start = slot.prefilled
        if slot.req.progress and start == slot.req.result.timings.n_cached:
            self._progress(slot)
        end = min(start + self.ctx.n_ubatch, len(ids))
        if self.checkpoints and not slot.waiting:
            if start == len(ids) - 1:
                self._checkpoint(slot.seq, start)
            elif end == len(ids) and start < len(ids) - 1:
                end -= 1                # stop short of the last token: the checkpoint goes there
        chunk = ids[start:end]
        echo = self._wants_prompt_logprobs(slot.req)
        logits = self._guarded(slot.seq, self.ctx.decode, UBatch.single(chunk, start, slot.seq, all_outputs=echo))
        if logits is None:
            return
        if echo:
            self._guarded(slot.seq, self._record_prompt_logprobs, slot, start, logits)
        slot.prefilled += len(chunk)
        slot.req.result.timings.n_prompt += len(chunk)
        self.stats.prompt_tokens_total += len(chunk)
        if slot.req.progress:
            self._progress(slot)
        if slot.prefilled == len(ids):
            for choice in [slot] + [f for f in slot.followers if self._slots.get(f.seq) is f]:
                if choice is not slot:            # a fork of the leader's cells: the prompt is not run again
                    self._guarded(choice.seq, self.ctx.seq_cp, slot.seq, choice.seq)
                    if self._slots.get(choice.seq) is not choice:     # the copy failed: that choice ended
                        continue
                    choice.waiting, choice.prefilled = False, len(ids)
                    choice.req.result.prompt_logprobs = list(slot.req.result.prompt_logprobs)
                choice.n_past = len(ids)
                choice.first_token_at = time.perf_counter()
                if choice.out.done:          # max_tokens == 0
                    self._finish(choice.seq)
                else:
                    self._guarded(choice.seq, self._sample_and_emit, choice, logits[-1])

    def _checkpoint(self, seq: int, pos: int) -> None:
        if not self._ckpts.has(seq, pos):
            ck = self.ctx.checkpoint(seq, pos)
            if ck is not None:
                self._ckpts.add(seq, ck)

    @staticmethod
    def _progress(slot: _Slot) -> None:
        req = slot.req
        req.events.put(Event("progress", index=req.index, progress={
            "total": len(req.prompt_ids), "cache": req.result.timings.n_cached, "processed": slot.prefilled,
            "time_ms": round((time.perf_counter() - req.submitted) * 1e3, 3)}))

    def _decode_step(self) -> None:
        self._decode_rows([s for s in self._slots.values() if s.last_token is not None])

    def _decode_rows(self, rows: list[_Slot]) -> None:
        if not rows:
            return
        n = len(rows)
        bucket = next(b for b in self.buckets if b >= n)
        pad = bucket - n
        # Padding rows use sequence ids above the real slots: each sees only its own throwaway cell.
        seqs = [s.seq for s in rows] + [self.parallel + i for i in range(pad)]
        ub = UBatch(tokens=np.array([s.last_token for s in rows] + [0] * pad, np.int32),
                    pos=np.array([s.n_past for s in rows] + [0] * pad, np.int32),
                    seq=np.array(seqs, np.int32), out_rows=np.arange(bucket, dtype=np.int32))
        t0 = time.perf_counter()
        try:
            logits = self.ctx.decode(ub)
        finally:
            for i in range(pad):
                self.ctx.seq_rm(self.parallel + i)
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.batch_rows_total += n
        for i, slot in enumerate(rows):
            slot.n_past += 1
            slot.req.result.timings.n_decode += 1
            self._guarded(slot.seq, self._sample_and_emit, slot, logits[i])

    def _sample_and_emit(self, slot: _Slot, logits: np.ndarray) -> None:
        allowed = slot.constraint.apply(logits) if slot.constraint is not None else logits
        tok = slot.sampler.sample(allowed, slot.out.history)
        if slot.constraint is not None:
            slot.constraint.consume(tok)
        if slot.req.logprobs is not None:
            slot.pending_logprob = token_logprobs(logits, tok, slot.req.logprobs)
        self._emit(slot.seq, tok)

    def _record_prompt_logprobs(self, slot: _Slot, start: int, logits: np.ndarray) -> None:
        """Row i of a prefill chunk predicts prompt token start + i + 1."""
        ids, lps = slot.req.prompt_ids, slot.req.result.prompt_logprobs
        if start == 0:
            lps.append(None)
        for i in range(logits.shape[0]):
            if start + i + 1 < len(ids):
                lps.append(token_logprobs(logits[i], ids[start + i + 1], slot.req.logprobs))
