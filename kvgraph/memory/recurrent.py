"""Recurrent state: one row per sequence per layer, holding whatever a recurrent layer carries between
tokens (for Mamba: a conv window and an SSM state, side by side in one row).

Each sequence of a ubatch is mapped to a state slot; the slot indices are the graph's input (read with
get_rows, written with set_rows), so the graph never changes as sequences come and go. A ubatch may hold
several sequences with the same number of tokens each, grouped (all of one sequence's tokens, then the
next's): a batched decode step is the common case. A recurrent state cannot rewind: removing part of a
sequence is refused (`seq_rm` returns False) and the caller starts it over.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import ContextOverflowError, InvalidArgumentError
from ..graph.inputs import GraphInput, UBatch
from ..graph.ir import I32, GraphBuilder, Tensor


class RecurrentState:
    def __init__(self, name: str, layers: Sequence[int], n_slots: int, row_width: int,
                 alloc: Callable[[tuple[int, ...]], object]):
        self.name = name
        self.layers = tuple(layers)
        self.n_slots = n_slots
        self.row_width = row_width
        self.buffers = {self.state_name(il): alloc((n_slots, row_width)) for il in self.layers}
        self.slot_of: dict[int, int] = {}
        self.pos_next: dict[int, int] = {}
        self.slots = np.zeros(1, np.int32)   # the slots of the ubatch's sequences, in ubatch order

    def state_name(self, il: int) -> str:
        return f"{self.name}.{il}"

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.buffers.values())

    def use_scratch(self, first_seq: int) -> None:
        """Throwaway rows (see Context.use_scratch) keep a state slot each, as any sequence."""

    def clear(self) -> None:
        self.slot_of.clear()
        self.pos_next.clear()

    def can_keep(self, seq: int, n: int) -> bool:
        """Whether seq can go on from position n: only from where its state stopped (it cannot rewind)."""
        return seq not in self.slot_of or n >= self.pos_next[seq] or n == 0

    def seq_rm(self, seq: int, p0: int = 0, p1: int | None = None) -> bool:
        if seq not in self.slot_of or p0 >= self.pos_next[seq]:
            return True
        if p0 <= 0 and (p1 is None or p1 >= self.pos_next[seq]):
            del self.slot_of[seq], self.pos_next[seq]
            return True
        return False

    def seq_cp(self, src: int, dst: int) -> None:
        """Give dst (which holds nothing: Context.seq_cp removes it first) a copy of src's state, every
        layer's row, in a slot of its own."""
        if src not in self.slot_of:
            return
        slot = self._claim_slot(dst, self.pos_next[src])
        for buf in self.buffers.values():
            buf[slot] = buf[self.slot_of[src]]

    needs_checkpoints = True        # a state cannot rewind: the scheduler keeps snapshots of it

    def snapshot_bytes(self) -> int:
        return sum(int(b[0].nbytes) for b in self.buffers.values())

    def snapshot(self, seq: int) -> dict[str, np.ndarray] | None:
        """A copy of seq's rows (every layer's), to restore later: a recurrent state cannot rewind, so a prompt
        that leaves the cached one at position p restarts from the last snapshot at or before p."""
        if seq not in self.slot_of:
            return None
        slot = self.slot_of[seq]
        return {name: np.array(buf[slot]) for name, buf in self.buffers.items()}

    def restore(self, seq: int, rows: dict[str, np.ndarray], pos_next: int) -> None:
        """seq's state becomes the snapshot's, which was taken at position pos_next."""
        slot = self.slot_of.get(seq)
        if slot is None:
            slot = self._claim_slot(seq, pos_next)
        self.pos_next[seq] = pos_next
        for name, buf in self.buffers.items():
            buf[slot] = rows[name]

    def _claim_slot(self, seq: int, pos_next: int) -> int:
        """A free state slot for seq, which goes on at position pos_next; a clear error when every slot
        holds a sequence."""
        free = sorted(set(range(self.n_slots)) - set(self.slot_of.values()))
        if not free:
            raise ContextOverflowError(f"all {self.n_slots} recurrent state slots are in use; "
                                       "finish a sequence first or allow more sequences.")
        self.slot_of[seq], self.pos_next[seq] = free[0], pos_next
        return free[0]

    def prepare(self, ub: UBatch) -> None:
        seqs, starts = _grouped_sequences(ub)
        for seq in seqs:
            if seq not in self.slot_of:
                slot = self._claim_slot(seq, 0)
                for buf in self.buffers.values():
                    buf[slot] = 0               # a new sequence starts from a zero state
        per_seq = ub.n_tokens // len(seqs)
        for seq, start in zip(seqs, starts):
            pos = ub.pos[start:start + per_seq]
            if int(pos[0]) != self.pos_next[seq] or (per_seq > 1 and not np.all(np.diff(pos) == 1)):
                raise InvalidArgumentError(
                    f"sequence {seq}: recurrent state is at position {self.pos_next[seq]} but the batch starts at "
                    f"{int(pos[0])}; positions must continue without gaps.")
        for seq, start in zip(seqs, starts):
            self.pos_next[seq] = int(ub.pos[start + per_seq - 1]) + 1
        self.slots = np.array([self.slot_of[seq] for seq in seqs], np.int32)

    def window(self) -> int:
        return self.n_slots

    def build(self, g: GraphBuilder, n_tokens: int, window: int, n_seqs: int = 1) -> "RecurrentView":
        return RecurrentView(self, g, n_seqs)


def _grouped_sequences(ub: UBatch) -> tuple[list[int], list[int]]:
    """The ubatch's sequences in order and where each one's tokens start; refuses a ubatch whose sequences
    are interleaved or of different lengths (a recurrent graph reads each sequence's tokens as one block)."""
    if ub.n_tokens == 1 or (ub.seq[0] == ub.seq[-1] and (ub.seq == ub.seq[0]).all()):
        return [int(ub.seq[0])], [0]           # one sequence: every single-stream step, without the general work
    change = np.flatnonzero(np.diff(ub.seq)) + 1
    starts = [0] + change.tolist()
    seqs = [int(ub.seq[i]) for i in starts]
    lengths = np.diff(starts + [ub.n_tokens])
    if len(set(seqs)) != len(seqs) or (lengths != lengths[0]).any():
        raise InvalidArgumentError("recurrent layers take ubatches of whole, equally long sequences, each "
                                   "sequence's tokens together; split the batch by sequence.")
    return seqs, starts


class StateSlotInput(GraphInput):
    def __init__(self, rs: RecurrentState, g: GraphBuilder, n_seqs: int):
        self.tensor = g.input(f"{rs.name}.slot", (n_seqs,), I32)

    def set(self, ub, memory, buf):
        buf[:] = memory.slots


class RecurrentView:
    """Build-time access to the state rows of the ubatch's n_seqs sequences: `read` them (old values),
    `write` parts of them."""

    def __init__(self, rs: RecurrentState, g: GraphBuilder, n_seqs: int):
        self.rs, self.g, self.n_seqs = rs, g, n_seqs
        self.slot = StateSlotInput(rs, g, n_seqs)
        self.inputs = [(self.slot, rs)]
        self._latest: dict[int, Tensor] = {}

    def _state(self, il: int) -> Tensor:
        return self.g.state(self.rs.state_name(il), (self.rs.n_slots, self.rs.row_width))

    def read(self, il: int, col: int = 0, width: int | None = None) -> Tensor:
        """Columns [col, col + width) (default: all) of the rows of this ubatch's sequences, [n_seqs, width],
        as they were before this step. A part read on its own is a part a backend may update in place (see
        compiler.FusingCompiler: a scan from it whose new state is written back to the same columns)."""
        state = self._state(il)
        if width is not None and (col, width) != (0, self.rs.row_width):
            state = self.g.slice_rows(state, col, width, axis=1)
        return self.g.get_rows(state, self.slot.tensor)

    def write(self, il: int, part: Tensor, col: int) -> None:
        """Write part ([n_seqs, ...], each sequence's part flattened) into columns [col, col + size) of the
        sequences' rows."""
        flat = self.g.reshape(part, (self.n_seqs, part.n_elements // self.n_seqs))
        dst = self._latest.get(il) or self._state(il)
        self._latest[il] = self.g.set_rows(dst, flat, self.slot.tensor, col=col)
