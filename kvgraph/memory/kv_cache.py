"""KV cache: per-layer K/V buffers over a pool of cells, each cell holding one token of one sequence.

Which cells a ubatch writes is decided here (`prepare`) and handed to the graph as an input tensor of
`set_rows` indices; what each token may see is the attention-mask input. The graph only sees a window of
the first `n_kv` cells, a power of two pages, so the graph key stays the same for many tokens.

Cells come in pages of PAGE: a page belongs to one sequence and holds its positions [PAGE b, PAGE b + PAGE)
at offsets pos % PAGE, and the page's block b is an input of fused attention (`pages`). Attention cuts the
window into segments of PAGE cells and chunks of 64 and merges the segments in block order, so a token's
result depends only on its own sequence's keys and values, never on where the pages lie: a sequence batched
with others, continued from cached cells or run alone computes the same bits.

V is stored row-major ([cell, head*dim], the flash-attention layout) or transposed ([head*dim, cell], the
non-flash ggml layout, so that softmax(QK) @ V reads V with unit stride along cells). In the flash layout
K and V are stored in the context's cache type (float16 halves the bytes attention reads per token; q8_0,
ggml's blocks of 32 int8 values and a float16 scale along each head's dimensions, takes 34 bytes per 32
values, written with ggml's round-to-nearest quantization; the kernels compute in float32, the C one scores
q8_0 keys with integer dot products against the query quantized alike); the transposed layout stays
float32.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import ContextOverflowError
from ..backends.reference import QK8_0, element_shape, is_q8_0
from ..graph.inputs import GraphInput, UBatch
from ..errors import InvalidArgumentError
from ..graph.ir import F16, F32, I32, Q8_0, GraphBuilder, Tensor

MASK_ROWS = 32
NEG_INF = np.float32(-np.inf)
PAGE = 256      # cells per page: the C attention kernel's segment (SEG in kernels.c)


def cells_for(n_tokens: int, n_seqs: int) -> int:
    """Cells that hold n_tokens spread over up to n_seqs sequences in whole pages (each may end mid-page)."""
    return (-(-n_tokens // PAGE) + n_seqs - 1) * PAGE


def _graph_dtype(buf: np.ndarray) -> str:
    return Q8_0 if is_q8_0(buf) else F16 if buf.dtype == np.float16 else F32


class KVCache:
    def __init__(self, name: str, layers: Sequence[int], n_cells: int, n_head_kv: int, head_dim_k: int,
                 head_dim_v: int, v_trans: bool, alloc: Callable[[tuple[int, ...]], object],
                 sliding_window: int | None = None):
        self.name = name
        self.layers = tuple(layers)
        self.n_pages = max(1, -(-n_cells // PAGE))
        self.n_cells = n_cells = self.n_pages * PAGE
        self.n_head_kv, self.head_dim_k, self.head_dim_v = n_head_kv, head_dim_k, head_dim_v
        self.v_trans = v_trans
        self.sliding_window = sliding_window
        k_row, v_row = n_head_kv * head_dim_k, n_head_kv * head_dim_v
        self.buffers = {}
        for il in self.layers:    # alloc(shape, cache=True): in the context's cache type
            self.buffers[self.k_name(il)] = alloc((n_cells, k_row), cache=not v_trans)
            self.buffers[self.v_name(il)] = alloc((v_row, n_cells) if v_trans else (n_cells, v_row), cache=not v_trans)
        if any(is_q8_0(b) for b in self.buffers.values()) and (head_dim_k % QK8_0 or head_dim_v % QK8_0):
            raise InvalidArgumentError(
                f"a q8_0 KV cache keeps each head's values in blocks of {QK8_0}, but this model's heads have "
                f"{head_dim_k} (K) and {head_dim_v} (V) dimensions; use --cache-type f16.")
        self.cell_pos = np.full(n_cells, -1, np.int32)
        self.cell_seq = np.full(n_cells, -1, np.int32)
        self.page_block = np.full(self.n_pages, -1, np.int32)   # the block of positions each page holds
        self.page_of: dict[tuple[int, int], int] = {}           # (seq, block) -> page
        self.scratch_from: int | None = None     # sequences from here on are throwaway rows (see use_scratch)
        self.slots = np.zeros(0, np.int32)   # cells reserved for the ubatch being processed

    def k_name(self, il: int) -> str:
        return f"{self.name}.k.{il}"

    def v_name(self, il: int) -> str:
        return f"{self.name}.v.{il}"

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.buffers.values())

    # ---- cell bookkeeping -------------------------------------------------------------------------------
    def n_used(self) -> int:
        return int(np.count_nonzero(self.cell_pos >= 0))

    def clear(self) -> None:
        self.cell_pos.fill(-1)
        self.cell_seq.fill(-1)
        self.page_block.fill(-1)
        self.page_of.clear()

    def can_keep(self, seq: int, n: int) -> bool:
        """Whether seq can go on from position n with only the cells before it: always, except in a sliding
        window cache, which has pruned the cells its last tokens no longer see; it can then go on only where
        the window before n is still whole."""
        if self.sliding_window is None or n == 0:
            return True
        lo = max(0, n - self.sliding_window)
        have = (self.cell_seq == seq) & (self.cell_pos >= lo) & (self.cell_pos < n)
        return int(have.sum()) == n - lo

    @property
    def needs_checkpoints(self) -> bool:
        """A sliding window cache forgets the cells its window has passed, so it cannot go back before them:
        like a recurrent state, it is kept in checkpoints (engine/checkpoints.py) -- of its window only."""
        return self.sliding_window is not None

    def snapshot_bytes(self) -> int:
        """The most one snapshot takes: a window of cells in every layer."""
        cells = min(self.sliding_window or self.n_cells, self.n_cells)
        return cells * sum(int(b.nbytes) // self.n_cells for b in self.buffers.values())

    def snapshot(self, seq: int) -> dict[str, np.ndarray] | None:
        """A copy of what seq's next token can see through the window: the positions of its last
        sliding_window cells and every layer's K and V rows of them."""
        cells = np.flatnonzero(self.cell_seq == seq)
        if not cells.size:
            return None
        pos = self.cell_pos[cells]
        cells = cells[pos >= int(pos.max()) + 1 - self.sliding_window]
        rows = {name: (b[:, cells] if self._by_columns(name) else b[cells]) for name, b in self.buffers.items()}
        return {"pos": self.cell_pos[cells].copy(), **rows}

    def restore(self, seq: int, rows: dict[str, np.ndarray], pos_next: int) -> None:
        """seq's cells become the snapshot's (taken when seq went on at pos_next), in pages of its own."""
        self.seq_rm(seq)
        pos = rows["pos"]
        blocks = (pos // PAGE).tolist()
        self._claim_pages(sorted({(seq, b) for b in blocks}), "restoring a checkpoint")
        cells = pos % PAGE + PAGE * np.array([self.page_of[seq, b] for b in blocks], np.int64)
        self.cell_pos[cells], self.cell_seq[cells] = pos, seq
        for name, b in self.buffers.items():
            if self._by_columns(name):
                b[:, cells] = rows[name]
            else:
                b[cells] = rows[name]

    def _by_columns(self, name: str) -> bool:
        """Whether buffer `name` holds a cell per column (the transposed V layout) rather than per row."""
        return self.v_trans and name.startswith(f"{self.name}.v.")

    def seq_rm(self, seq: int, p0: int = 0, p1: int | None = None) -> bool:
        """Forget the cells of `seq` with positions in [p0, p1) (pages left empty are free again). False (and
        nothing forgotten) when a sliding window cache is asked to keep a prefix whose window it no longer
        holds whole (see can_keep)."""
        if p0 > 0 and p1 is None and not self.can_keep(seq, p0):
            return False
        sel = (self.cell_seq == seq) & (self.cell_pos >= p0)
        if p1 is not None:
            sel &= self.cell_pos < p1
        self.cell_pos[sel] = -1
        self.cell_seq[sel] = -1
        end = p1 if p1 is not None else 1 << 62
        for (s, b), page in [item for item in self.page_of.items() if item[0][0] == seq]:
            if (b + 1) * PAGE <= p0 or b * PAGE >= end:
                continue                                   # untouched
            whole = p0 <= b * PAGE and (b + 1) * PAGE <= end
            if whole or not (self.cell_pos[page * PAGE: page * PAGE + PAGE] >= 0).any():
                del self.page_of[s, b]
                self.page_block[page] = -1
        return True

    def use_scratch(self, first_seq: int) -> None:
        """Sequences >= first_seq are throwaway rows of one position each (a batch's padding): they share page
        0, each at its row's offset, instead of taking a page each and widening the window."""
        self.clear()
        self.scratch_from = first_seq

    def _free_pages(self, n: int, what: str) -> np.ndarray:
        """The n lowest free pages; ContextOverflowError when there are fewer."""
        free = np.flatnonzero(self.page_block < 0)
        if self.scratch_from is not None:
            free = free[free > 0]
        if free.shape[0] < n:
            raise ContextOverflowError(
                f"the context is full: {what} needs {n} more page(s) of {PAGE} cells but only {free.shape[0]} of "
                f"{self.n_pages} are free. Use a larger context (-c) or a shorter prompt / fewer tokens.")
        return free[:n]

    def seq_cp(self, src: int, dst: int) -> None:
        """Give dst a copy of src's cells (positions and K/V rows in every layer, at the same offsets in pages
        of its own): a forked sequence, such as the choices of one prompt, goes on from the same cache without
        recomputing it."""
        blocks = sorted(b for s, b in self.page_of if s == src)
        new = self._free_pages(len(blocks), f"copying a sequence of {len(blocks)} page(s)")
        for b, page in zip(blocks, new):
            old = self.page_of[src, b]
            self.page_of[dst, b] = int(page)
            self.page_block[page] = b
            cells, to = slice(old * PAGE, old * PAGE + PAGE), slice(page * PAGE, page * PAGE + PAGE)
            self.cell_pos[to] = self.cell_pos[cells]
            self.cell_seq[to] = np.where(self.cell_pos[cells] >= 0, dst, -1)
            for il in self.layers:
                k, v = self.buffers[self.k_name(il)], self.buffers[self.v_name(il)]
                k[to] = k[cells]
                if self.v_trans:
                    v[:, to] = v[:, cells]
                else:
                    v[to] = v[cells]

    def _prune_sliding(self, ub: UBatch) -> None:
        """Free cells that no token of this ubatch, nor any later one, can see through the window."""
        for s in ub.seq_ids:
            p_min = int(ub.pos[ub.seq == s].min())
            self.seq_rm(s, 0, p_min - self.sliding_window + 1)

    def prepare(self, ub: UBatch) -> None:
        """Reserve each token's cell, at offset pos % PAGE of its sequence's page for that block of positions
        (a sequence's new blocks take the lowest free pages; throwaway rows their row's cell of page 0), and
        record it."""
        if self.sliding_window is not None:
            self._prune_sliding(ub)
        if ub.n_tokens == 1 and (self.scratch_from is None or ub.seq[0] < self.scratch_from):
            self._prepare_one(int(ub.seq[0]), int(ub.pos[0]))     # a decode step: no array work
            return
        blocks = ub.pos // PAGE
        real = ub.seq < self.scratch_from if self.scratch_from is not None else np.ones(ub.n_tokens, bool)
        pairs = sorted(set(zip(ub.seq[real].tolist(), blocks[real].tolist())))
        self._claim_pages(pairs, f"a ubatch of {ub.n_tokens} tokens")
        slots = (ub.pos % PAGE).astype(np.int32)
        for s, b in pairs:
            slots[(ub.seq == s) & (blocks == b)] += self.page_of[s, b] * PAGE
        slots[~real] = np.arange(ub.n_tokens - int(real.sum()))
        self.slots = slots
        self.cell_pos[slots] = ub.pos
        self.cell_seq[slots] = ub.seq

    def _claim_pages(self, pairs: list[tuple[int, int]], what: str) -> None:
        """Each (sequence, block of positions) of pairs without a page takes the lowest free one."""
        new = [p for p in pairs if p not in self.page_of]
        for pair, page in zip(new, self._free_pages(len(new), what) if new else ()):
            self.page_of[pair] = int(page)
            self.page_block[page] = pair[1]

    def _prepare_one(self, seq: int, pos: int) -> None:
        """prepare for a ubatch of one token of a real sequence, in plain Python."""
        page = self.page_of.get((seq, pos // PAGE))
        if page is None:
            page = self.page_of[seq, pos // PAGE] = int(self._free_pages(1, "a token")[0])
            self.page_block[page] = pos // PAGE
        cell = page * PAGE + pos % PAGE
        self.slots = np.array([cell], np.int32)
        self.cell_pos[cell] = pos
        self.cell_seq[cell] = seq

    def window(self) -> int:
        """Cells the graph must see: every page up to the last one in use, rounded up to a power of two pages
        (a graph per window: sequences taking pages one after another, or a long generation, need only a
        few; the pages past the last in use cost attention a glance at their mask), or all of a sliding
        window's (its few pages are reused over and over, so the window never moves)."""
        if self.sliding_window is not None:
            return self.n_cells
        used = np.flatnonzero(self.page_block >= 0)
        top = int(used[-1]) + 1 if used.shape[0] else 1
        return min(self.n_pages, 1 << (top - 1).bit_length()) * PAGE

    def fill_mask(self, ub: UBatch, buf: np.ndarray) -> None:
        n_kv = buf.shape[1]
        cpos, cseq = self.cell_pos[None, :n_kv], self.cell_seq[None, :n_kv]
        buf.fill(NEG_INF)
        # In blocks of rows: a prompt's whole [n_tokens, n_kv] boolean temporaries would be megabytes that
        # the heap keeps resident after they are freed.
        for r0 in range(0, len(ub.pos), MASK_ROWS):
            pos, seq = ub.pos[r0: r0 + MASK_ROWS, None], ub.seq[r0: r0 + MASK_ROWS, None]
            visible = (cseq == seq) & (cpos <= pos) & (cpos >= 0)
            if self.sliding_window is not None:
                visible &= (pos - cpos) < self.sliding_window
            buf[r0: r0 + MASK_ROWS][visible] = 0.0

    # ---- graph side -------------------------------------------------------------------------------------
    def build(self, g: GraphBuilder, n_tokens: int, n_kv: int, n_seqs: int = 1) -> "KVAttention":
        return KVAttention(self, g, n_tokens, n_kv)   # the mask says which cells each token sees


class KVSlotsInput(GraphInput):
    """Cells the ubatch's K/V rows are written to (the `set_rows` indices)."""

    def __init__(self, kv: KVCache, g: GraphBuilder, n_tokens: int):
        self.tensor = g.input(f"{kv.name}.slots", (n_tokens,), I32)

    def set(self, ub, memory, buf):
        buf[:] = memory.slots


class KVPagesInput(GraphInput):
    """[n_kv / PAGE] the block of positions each page of the window holds (-1: a free page): the order in
    which fused attention merges a token's segments."""

    def __init__(self, kv: KVCache, g: GraphBuilder, n_kv: int):
        self.tensor = g.input(f"{kv.name}.pages", (n_kv // PAGE,), I32)

    def set(self, ub, memory, buf):
        buf[:] = memory.page_block[: buf.shape[0]]


class KVMaskInput(GraphInput):
    """[n_tokens, n_kv] additive mask: 0 where a token may attend to a cell, -inf elsewhere."""

    def __init__(self, kv: KVCache, g: GraphBuilder, n_tokens: int, n_kv: int):
        self.tensor = g.input(f"{kv.name}.mask", (n_tokens, n_kv), F32)

    def set(self, ub, memory, buf):
        memory.fill_mask(ub, buf)


class KVAttention:
    """What a model sees of a KV cache while building: its inputs and `store`, which writes a layer's new
    K/V rows into the cache and returns the windows attention should read."""

    def __init__(self, kv: KVCache, g: GraphBuilder, n_tokens: int, n_kv: int):
        self.kv, self.g, self.n_kv = kv, g, n_kv
        self.slots = KVSlotsInput(kv, g, n_tokens)
        self.mask_input = KVMaskInput(kv, g, n_tokens, n_kv)
        self.pages = KVPagesInput(kv, g, n_kv)
        self.inputs: list[tuple[GraphInput, KVCache]] = [(self.slots, kv), (self.mask_input, kv), (self.pages, kv)]

    @property
    def mask(self) -> Tensor:
        return self.mask_input.tensor

    def store(self, il: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k [n, n_head_kv, dk], v [n, n_head_kv, dv] -> (k window [n_kv, hkv, dk], v window: [n_kv, hkv, dv]
        row-major, or [hkv, dv, n_kv] when the cache stores V transposed)."""
        g, kv, n_kv = self.g, self.kv, self.n_kv
        n = k.shape[0]
        k_buf, v_buf = kv.buffers[kv.k_name(il)], kv.buffers[kv.v_name(il)]
        k_state = g.state(kv.k_name(il), element_shape(k_buf), _graph_dtype(k_buf))
        v_state = g.state(kv.v_name(il), element_shape(v_buf), _graph_dtype(v_buf))
        k_all = g.set_rows(k_state, g.reshape(k, (n, k.shape[1] * k.shape[2])), self.slots.tensor)
        v_rows = g.reshape(v, (n, v.shape[1] * v.shape[2]))
        k_win = g.reshape(g.view_rows(k_all, n_kv), (n_kv, kv.n_head_kv, kv.head_dim_k))
        if kv.v_trans:
            v_all = g.set_rows(v_state, v_rows, self.slots.tensor, transposed=True)
            v_win = g.reshape(g.view_cols(v_all, n_kv), (kv.n_head_kv, kv.head_dim_v, n_kv))
        else:
            v_all = g.set_rows(v_state, v_rows, self.slots.tensor)
            v_win = g.reshape(g.view_rows(v_all, n_kv), (n_kv, kv.n_head_kv, kv.head_dim_v))
        return k_win, v_win
