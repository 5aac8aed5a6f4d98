"""KV cache: per-layer K/V buffers over a pool of cells, each cell holding one token of one sequence.

Which cells a ubatch writes is decided here (`prepare`) and handed to the graph as an input tensor of
`set_rows` indices; what each token may see is the attention-mask input. The graph only sees a window of
the first `n_kv` cells, padded up to `pad` cells so the graph key stays the same for many tokens.

V is stored row-major ([cell, head*dim], the flash-attention layout) or transposed ([head*dim, cell], the
non-flash ggml layout, so that softmax(QK) @ V reads V with unit stride along cells). In the flash layout
K and V are stored in the context's cache type (float16 halves the bytes attention reads per token; the
kernels compute in float32); the transposed layout stays float32.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import ContextOverflowError
from ..graph.inputs import GraphInput, UBatch
from ..graph.ir import F16, F32, I32, GraphBuilder, Tensor

MASK_ROWS = 32
NEG_INF = np.float32(-np.inf)


class KVCache:
    def __init__(self, name: str, layers: Sequence[int], n_cells: int, n_head_kv: int, head_dim_k: int,
                 head_dim_v: int, v_trans: bool, alloc: Callable[[tuple[int, ...]], object],
                 sliding_window: int | None = None, pad: int = 256):
        self.name = name
        self.layers = tuple(layers)
        self.n_cells = n_cells
        self.n_head_kv, self.head_dim_k, self.head_dim_v = n_head_kv, head_dim_k, head_dim_v
        self.v_trans = v_trans
        self.sliding_window = sliding_window
        self.pad = pad
        k_row, v_row = n_head_kv * head_dim_k, n_head_kv * head_dim_v
        self.buffers = {}
        for il in self.layers:    # alloc(shape, cache=True): in the context's cache type
            self.buffers[self.k_name(il)] = alloc((n_cells, k_row), cache=not v_trans)
            self.buffers[self.v_name(il)] = alloc((v_row, n_cells) if v_trans else (n_cells, v_row), cache=not v_trans)
        self.cell_pos = np.full(n_cells, -1, np.int32)
        self.cell_seq = np.full(n_cells, -1, np.int32)
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

    def seq_rm(self, seq: int, p0: int = 0, p1: int | None = None) -> bool:
        """Forget the cells of `seq` with positions in [p0, p1). Always possible for a KV cache."""
        sel = (self.cell_seq == seq) & (self.cell_pos >= p0)
        if p1 is not None:
            sel &= self.cell_pos < p1
        self.cell_pos[sel] = -1
        self.cell_seq[sel] = -1
        return True

    def seq_cp(self, src: int, dst: int) -> None:
        """Give dst a copy of src's cells (positions and K/V rows in every layer): a forked sequence, such
        as the choices of one prompt, goes on from the same cache without recomputing it."""
        cells = np.flatnonzero(self.cell_seq == src)
        free = np.flatnonzero(self.cell_pos < 0)
        if free.shape[0] < cells.shape[0]:
            raise ContextOverflowError(f"the context is full: copying a sequence of {cells.shape[0]} tokens needs "
                                       f"that many free cells, {free.shape[0]} are free.")
        new = free[: cells.shape[0]]
        self.cell_pos[new] = self.cell_pos[cells]
        self.cell_seq[new] = dst
        for il in self.layers:
            k, v = self.buffers[self.k_name(il)], self.buffers[self.v_name(il)]
            k[new] = k[cells]
            if self.v_trans:
                v[:, new] = v[:, cells]
            else:
                v[new] = v[cells]

    def _prune_sliding(self, ub: UBatch) -> None:
        """Free cells that no token of this ubatch, nor any later one, can see through the window."""
        for s in ub.seq_ids:
            p_min = int(ub.pos[ub.seq == s].min())
            self.seq_rm(s, 0, p_min - self.sliding_window + 1)

    def prepare(self, ub: UBatch) -> None:
        """Reserve one free cell per token of the ubatch and record it (lowest free cells first)."""
        if self.sliding_window is not None:
            self._prune_sliding(ub)
        free = np.flatnonzero(self.cell_pos < 0)
        if free.shape[0] < ub.n_tokens:
            raise ContextOverflowError(
                f"the context is full: {ub.n_tokens} more tokens need cells but only {free.shape[0]} of "
                f"{self.n_cells} are free. Use a larger context (-c) or a shorter prompt / fewer tokens.")
        self.slots = free[: ub.n_tokens].astype(np.int32)
        self.cell_pos[self.slots] = ub.pos
        self.cell_seq[self.slots] = ub.seq

    def window(self) -> int:
        """Cells the graph must see: up to the last used cell, padded to `pad`."""
        used = np.flatnonzero(self.cell_pos >= 0)
        top = int(used[-1]) + 1 if used.shape[0] else 1
        return min(self.n_cells, -(-top // self.pad) * self.pad)

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
        self.inputs: list[tuple[GraphInput, KVCache]] = [(self.slots, kv), (self.mask_input, kv)]

    @property
    def mask(self) -> Tensor:
        return self.mask_input.tensor

    def store(self, il: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """k [n, n_head_kv, dk], v [n, n_head_kv, dv] -> (k window [n_kv, hkv, dk], v window: [n_kv, hkv, dv]
        row-major, or [hkv, dv, n_kv] when the cache stores V transposed)."""
        g, kv, n_kv = self.g, self.kv, self.n_kv
        n = k.shape[0]
        k_buf, v_buf = kv.buffers[kv.k_name(il)], kv.buffers[kv.v_name(il)]
        k_state = g.state(kv.k_name(il), k_buf.shape, F16 if k_buf.dtype == np.float16 else F32)
        v_state = g.state(kv.v_name(il), v_buf.shape, F16 if v_buf.dtype == np.float16 else F32)
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
