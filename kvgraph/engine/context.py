"""Context: memories + graph cache + the step that turns one ubatch into logits.

decode(ubatch):  memories reserve cells -> key -> cached program (or build/plan/compile on a miss)
                 -> write inputs -> run -> copy out logits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..backends.reference import Q8_0_BLOCK, QK8_0
from ..errors import ContextOverflowError, GraphCacheVerifyError, InvalidArgumentError
from ..graph.cache import DEFAULT_CAPACITY, CacheEntry, GraphCache, env_flag
from ..graph.inputs import UBatch
from ..graph.ir import GraphBuilder
from ..graph.key import GraphKey
from ..memory.kv_cache import cells_for
from ..models.base import BuildIO
from ..plan.planner import plan_graph
from .heap import release_free_heap
from .loader import LoadedModel

DEFAULT_N_CTX_CAP = 4096
DEFAULT_N_UBATCH = 512
DEFAULT_N_SEQ_MAX = 8      # sequences alive at once in a recurrent memory (each has a state slot)
# Which backends keep each KV cache type (for the error that refuses one elsewhere)
CACHE_TYPE_BACKENDS = {"q8_0": "read by the native backend, torch with kvgraph's C kernels, and numpy with -fa on",
                       "f16": "read by the native, numpy and (with kvgraph's C kernels) torch backends"}


def _checkpointed(mem) -> bool:
    """Whether a memory cannot go back before what it has passed (a recurrent state, a sliding window), so
    that sequences keep snapshots of it."""
    return getattr(mem, "needs_checkpoints", False)


@dataclass
class Checkpoint:
    """A sequence's non-rewindable state (recurrent rows, a window's cells) at position pos: the point it can
    restart from."""
    pos: int
    states: dict[str, dict[str, np.ndarray]]
    nbytes: int
    taken: int = 0          # set by engine.checkpoints: which is oldest


class Context:
    def __init__(self, loaded: LoadedModel, n_ctx: int | None = None, n_ubatch: int = DEFAULT_N_UBATCH,
                 graph_cache: bool = True, cache_capacity: int = DEFAULT_CAPACITY, verify: bool = False,
                 flash_attn: bool | None = None, n_seq_max: int = DEFAULT_N_SEQ_MAX, cache_type: str | None = None):
        cfg = loaded.config
        if n_ctx is None:
            n_ctx = min(cfg.n_ctx_train, DEFAULT_N_CTX_CAP)
        if n_ctx < 1:
            raise InvalidArgumentError(f"context size must be positive, got {n_ctx}.")
        if n_ubatch < 1:
            raise InvalidArgumentError(f"ubatch size must be positive, got {n_ubatch}.")
        self.loaded = loaded
        self.model = loaded.model
        self.backend = loaded.backend
        self.n_ctx = n_ctx
        self.n_ubatch = n_ubatch
        self.n_vocab = cfg.n_vocab
        # None: the backend's choice (the fused kernel where it has one, as llama.cpp's -fa auto does).
        self.flash_attn = loaded.backend.flash_attn_default if flash_attn is None else bool(flash_attn)
        enabled = graph_cache and not env_flag("KVGRAPH_NO_GRAPH_CACHE")
        self.cache = GraphCache(cache_capacity, enabled=enabled,
                                verify=verify or env_flag("KVGRAPH_GRAPH_CACHE_VERIFY"))
        if n_seq_max < 1:
            raise InvalidArgumentError(f"n_seq_max must be positive, got {n_seq_max}.")
        self.n_seq_max = n_seq_max
        # KV cache storage (llama.cpp's --cache-type-k/v): None takes the backend's default. It applies to
        # the flash-attention layout; the transposed V layout (and recurrent states) stay float32.
        types = self.backend.cache_types
        requested = types[0] if cache_type is None else str(cache_type).lower()
        if requested not in types:
            where = CACHE_TYPE_BACKENDS.get(requested)
            raise InvalidArgumentError(
                f"the {self.backend.name} backend keeps the KV cache as {' or '.join(types)}, not {cache_type!r}"
                + (f" ({requested} is {where})" if where else "") + f"; use --cache-type {types[0]}.")

        def alloc(shape, cache: bool = False):
            if cache and requested == "q8_0":     # Q8_0 blocks along the row (see memory/kv_cache.py)
                if shape[-1] % QK8_0:
                    raise InvalidArgumentError(f"a q8_0 KV cache keeps each head's values in blocks of {QK8_0}, but "
                                               f"this model's rows of {shape[-1]} values are no whole blocks; use "
                                               "--cache-type f16.")
                return self.backend.alloc_state(tuple(shape[:-1]) + (shape[-1] // QK8_0,), Q8_0_BLOCK)
            return self.backend.alloc_state(shape, np.float16 if cache and requested == "f16" else np.float32)
        # KV caches hold n_ctx tokens in whole pages per sequence (see memory/kv_cache.py)
        self.memories = self.model.create_memories(cells_for(n_ctx, n_seq_max), n_ubatch, alloc, self.flash_attn,
                                                   n_seq_max)
        self.states = {name: buf for mem in self.memories.values() for name, buf in mem.buffers.items()}
        # What the K/V buffers really hold (-fa off, or a model's non-flash layout, keeps float32).
        held = {b.dtype for b in self.states.values()}
        self.cache_type = "q8_0" if Q8_0_BLOCK in held else "f16" if np.dtype(np.float16) in held else "f32"
        self.peak_arena_bytes = 0   # largest compute buffer any program used
        # The compute buffer the programs of this context compute in: they run one at a time, so the
        # context holds about the largest graph's, not the sum over its cached graphs (8 prompt-sized graphs
        # of a server's context each held their own).
        self._arena: np.ndarray | None = None

    @property
    def stats(self):
        return self.cache.stats

    # ---- memory management ------------------------------------------------------------------------------
    def clear(self) -> None:
        for mem in self.memories.values():
            mem.clear()

    def seq_rm(self, seq: int, p0: int = 0, p1: int | None = None) -> bool:
        """Forget positions [p0, p1) of seq. False when a memory cannot (a recurrent state cannot rewind);
        the caller must then remove the whole sequence."""
        return all([mem.seq_rm(seq, p0, p1) for mem in self.memories.values()])

    def keep_prefix(self, seq: int, n: int, checkpoints: Sequence["Checkpoint"] = ()) -> int:
        """Keep the first n positions of seq and forget the rest; returns how many are kept: n, or where a
        memory cannot rewind, the position of the latest of seq's checkpoints at or before n (restored), or 0
        (the sequence starts over)."""
        if n and self.seq_rm(seq, n):
            return n
        ck = max((c for c in checkpoints if 0 < c.pos <= n), key=lambda c: c.pos, default=None)
        if ck is None:
            self.seq_rm(seq)
            return 0
        for name, mem in self.memories.items():
            if name in ck.states:
                mem.restore(seq, ck.states[name], ck.pos)
            else:
                mem.seq_rm(seq, ck.pos)
        return ck.pos

    def can_keep(self, seq: int, n: int) -> bool:
        """Whether every memory can go on from seq's position n keeping only what is before it."""
        return all(mem.can_keep(seq, n) for mem in self.memories.values())

    def can_keep_from_checkpoint(self, seq: int, pos: int) -> bool:
        """Whether a checkpoint at pos can restore seq: the memories it does not hold can keep pos."""
        return all(mem.can_keep(seq, pos) for mem in self.memories.values() if not _checkpointed(mem))

    @property
    def can_rewind(self) -> bool:
        """Whether every memory can drop a sequence's later positions (no checkpoints needed)."""
        return not any(_checkpointed(mem) for mem in self.memories.values())

    def checkpoint(self, seq: int, pos: int) -> "Checkpoint | None":
        """What seq's memories that cannot rewind hold now, at position pos (None: seq has no such state)."""
        states = {name: mem.snapshot(seq) for name, mem in self.memories.items() if _checkpointed(mem)}
        states = {name: rows for name, rows in states.items() if rows is not None}
        if not states:
            return None
        return Checkpoint(pos, states, sum(a.nbytes for rows in states.values() for a in rows.values()))

    def checkpoint_bytes(self) -> int:
        """The bytes one checkpoint of a sequence takes (0: nothing to checkpoint)."""
        return sum(mem.snapshot_bytes() for mem in self.memories.values() if _checkpointed(mem))

    def use_scratch(self, first_seq: int) -> None:
        """Sequences >= first_seq are throwaway rows (a batch's padding: one position each, removed after the
        step); KV caches keep them in one shared page."""
        for mem in self.memories.values():
            mem.use_scratch(first_seq)

    def seq_cp(self, src: int, dst: int) -> None:
        """dst becomes a copy of src in every memory (dst's old contents are dropped)."""
        self.seq_rm(dst)
        for mem in self.memories.values():
            mem.seq_cp(src, dst)

    @property
    def memory_bytes(self) -> int:
        return sum(mem.nbytes for mem in self.memories.values())

    # ---- one step ---------------------------------------------------------------------------------------
    def key_for(self, ub: UBatch) -> GraphKey:
        if ub.n_tokens == 1 or (ub.seq == ub.seq[0]).all():     # one sequence (every single-stream step)
            n_seqs, equal = 1, True
        else:
            seqs, counts = np.unique(ub.seq, return_counts=True)
            n_seqs, equal = int(seqs.shape[0]), bool((counts == counts[0]).all())
        return GraphKey(
            n_tokens=ub.n_tokens, n_seqs=n_seqs, equal_seqs=equal,
            windows=tuple((name, mem.window()) for name, mem in self.memories.items()),
            n_outputs=ub.n_outputs, flash_attn=self.flash_attn)

    def _build(self, key: GraphKey) -> CacheEntry:
        st = self.cache.stats
        t0 = time.perf_counter()
        g = GraphBuilder()
        io = BuildIO(g, key, self.memories)
        self.model.build(g, io)
        t1 = time.perf_counter()
        plan = plan_graph(g.graph)
        t2 = time.perf_counter()
        program = self.backend.compile(g.graph, plan, self.loaded.weights, self.states, self._arena_for(plan))
        release_free_heap()     # building and compiling freed megabytes that would otherwise stay resident
        t3 = time.perf_counter()
        st.build_s += t1 - t0
        st.plan_s += t2 - t1
        st.compile_s += t3 - t2
        # An input the graph never reads (positions in a model without RoPE) was pruned: nothing to fill.
        inputs = [(inp, owner) for inp, owner in io.inputs if inp.name in program.inputs]
        # The graph itself is kept only for verify mode to compare with (~0.4 MB of Python objects a graph).
        return CacheEntry(key, g.graph if self.cache.verify else None, plan, program, inputs)

    def _arena_for(self, plan) -> np.ndarray:
        """The shared compute buffer, replaced by one at least twice as large where plan needs more. Programs
        compiled over an old buffer keep it (no rebuild, no extra miss); with doubling, all buffers together
        stay under twice the largest, and only the pages a run touches are resident."""
        if self._arena is None or self._arena.size < plan.arena_size:
            size = plan.arena_size if self._arena is None else max(plan.arena_size, 2 * self._arena.size)
            self._arena = np.empty(size, np.uint8)
        return self._arena

    def _verify(self, entry: CacheEntry) -> None:
        g = GraphBuilder()
        self.model.build(g, BuildIO(g, entry.key, self.memories))
        if g.graph.signature() != entry.graph.signature() or plan_graph(g.graph) != entry.plan:
            raise GraphCacheVerifyError(
                f"graph cache verify: the graph rebuilt for key {entry.key.describe()} differs from the cached "
                "one; the key misses something that changes topology (a kvgraph bug, please report it).")
        self.cache.stats.verified += 1

    def _entry_for(self, ub: UBatch) -> CacheEntry:
        key = self.key_for(ub)
        entry = self.cache.lookup(key)
        if entry is not None:     # the key fixes every input's shape: a hit always takes this ubatch
            self.cache.record_hit()
            if self.cache.verify:
                self._verify(entry)
            return entry
        self.cache.record_miss(key)
        entry = self._build(key)
        self.peak_arena_bytes = max(self.peak_arena_bytes, entry.program.arena_bytes)
        self.cache.insert(entry)
        return entry

    def decode(self, ub: UBatch) -> np.ndarray:
        """Run one ubatch; returns a copy of its logits, [n_outputs, n_vocab] float32."""
        if ub.n_tokens > self.n_ubatch:
            raise InvalidArgumentError(f"ubatch of {ub.n_tokens} tokens exceeds n_ubatch={self.n_ubatch}.")
        if ub.n_tokens == 0:
            raise InvalidArgumentError("cannot decode an empty batch.")
        ub.check(self.n_vocab)
        for mem in self.memories.values():
            mem.prepare(ub)
        # Without floating-point warnings: a corrupt file's weights (a changed tensor type id, an absurd
        # soft-capping value) overflow as a compile builds their lazy forms and as the kernels run; the
        # non-finite logits that result are refused with one message where they are sampled
        # (engine.sampling), not announced by numpy line by line before it.
        with np.errstate(all="ignore"):
            entry = self._entry_for(ub)
            st = self.cache.stats
            t0 = time.perf_counter()
            bufs = entry.program.inputs
            for inp, owner in entry.inputs:
                inp.set(ub, owner, bufs[inp.name])
            t1 = time.perf_counter()
            entry.program.run()
            logits = self.backend.to_numpy(entry.program.outputs["logits"])
        st.compute_s += time.perf_counter() - t1
        st.set_inputs_s += t1 - t0
        return logits

    def check_fits(self, n_prompt: int, n_predict: int = 0, ctx_shift: bool = False) -> None:
        """Refuse a prompt (plus tokens to generate) that cannot fit; with ctx_shift only the prompt (and one
        token) must fit, since generation shifts the context as it fills."""
        need = n_prompt + (1 if ctx_shift else n_predict)
        if need <= self.n_ctx:
            return
        trained = f"(the model was trained with {self.loaded.config.n_ctx_train})"
        if ctx_shift:
            raise ContextOverflowError(
                f"the prompt has {n_prompt} tokens but the context size is {self.n_ctx}; --ctx-shift only drops "
                f"generated history, the prompt itself must fit. Use -c {need} {trained} or a shorter prompt.")
        raise ContextOverflowError(
            f"prompt of {n_prompt} tokens plus {n_predict} tokens to generate needs a context of {need}, but "
            f"the context size is {self.n_ctx}. Use -c {need} {trained}, shorten the prompt or -n, or pass "
            "--ctx-shift to drop old tokens as the context fills.")
