"""Recurrent state: one row per sequence per layer, holding whatever a recurrent layer carries between
tokens (for the hybrid architecture: a conv window and an SSM state, side by side in one row).

A ubatch's sequence is mapped to a state slot; the slot index is the graph's input (read with get_rows,
written with set_rows), so the graph never changes as sequences come and go. A recurrent state cannot
rewind: removing part of a sequence is refused (`seq_rm` returns False) and the caller starts it over.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ..errors import ContextOverflowError, InvalidArgumentError
from ..graph.inputs import GraphInput, UBatch
from ..graph.ir import I32, GraphBuilder, Tensor


class RecurrentState:
    one_seq_per_ubatch = True   # schedulers must not mix sequences in one ubatch

    def __init__(self, name: str, layers: Sequence[int], n_slots: int, row_width: int,
                 alloc: Callable[[tuple[int, ...]], object]):
        self.name = name
        self.layers = tuple(layers)
        self.n_slots = n_slots
        self.row_width = row_width
        self.buffers = {self.state_name(il): alloc((n_slots, row_width)) for il in self.layers}
        self.slot_of: dict[int, int] = {}
        self.pos_next: dict[int, int] = {}
        self.slots = np.zeros(1, np.int32)   # the slot of the ubatch being processed

    def state_name(self, il: int) -> str:
        return f"{self.name}.{il}"

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.buffers.values())

    def clear(self) -> None:
        self.slot_of.clear()
        self.pos_next.clear()

    def seq_rm(self, seq: int, p0: int = 0, p1: int | None = None) -> bool:
        if seq not in self.slot_of or p0 >= self.pos_next[seq]:
            return True
        if p0 <= 0 and (p1 is None or p1 >= self.pos_next[seq]):
            del self.slot_of[seq], self.pos_next[seq]
            return True
        return False

    def prepare(self, ub: UBatch) -> None:
        seqs = ub.seq_ids
        if len(seqs) != 1:
            raise InvalidArgumentError("recurrent layers take one sequence per ubatch; split the batch by sequence.")
        seq = seqs[0]
        if seq not in self.slot_of:
            free = sorted(set(range(self.n_slots)) - set(self.slot_of.values()))
            if not free:
                raise ContextOverflowError(f"all {self.n_slots} recurrent state slots are in use; "
                                           "finish a sequence first or allow more sequences.")
            self.slot_of[seq], self.pos_next[seq] = free[0], 0
            for buf in self.buffers.values():
                buf[free[0]] = 0            # a new sequence starts from a zero state
        if int(ub.pos[0]) != self.pos_next[seq] or not np.all(np.diff(ub.pos) == 1):
            raise InvalidArgumentError(
                f"sequence {seq}: recurrent state is at position {self.pos_next[seq]} but the batch starts at "
                f"{int(ub.pos[0])}; positions must continue without gaps.")
        self.pos_next[seq] = int(ub.pos[-1]) + 1
        self.slots[0] = self.slot_of[seq]

    def window(self) -> int:
        return self.n_slots

    def build(self, g: GraphBuilder, n_tokens: int, window: int) -> "RecurrentView":
        return RecurrentView(self, g)


class StateSlotInput(GraphInput):
    def __init__(self, rs: RecurrentState, g: GraphBuilder):
        self.tensor = g.input(f"{rs.name}.slot", (1,), I32)

    def set(self, ub, memory, buf):
        buf[:] = memory.slots

    def can_reuse(self, ub, memory):
        return len(ub.seq_ids) == 1


class RecurrentView:
    """Build-time access to the state rows: `read` the sequence's row (old values), `write` parts of it."""

    def __init__(self, rs: RecurrentState, g: GraphBuilder):
        self.rs, self.g = rs, g
        self.slot = StateSlotInput(rs, g)
        self.inputs = [(self.slot, rs)]
        self._latest: dict[int, Tensor] = {}

    def _state(self, il: int) -> Tensor:
        return self.g.state(self.rs.state_name(il), (self.rs.n_slots, self.rs.row_width))

    def read(self, il: int) -> Tensor:
        """The row of this ubatch's sequence, [row_width], as it was before this step."""
        return self.g.reshape(self.g.get_rows(self._state(il), self.slot.tensor), (self.rs.row_width,))

    def write(self, il: int, part: Tensor, col: int) -> None:
        """Write part (any shape, flattened) into columns [col, col + size) of the row."""
        flat = self.g.reshape(part, (1, part.n_elements))
        dst = self._latest.get(il) or self._state(il)
        self._latest[il] = self.g.set_rows(dst, flat, self.slot.tensor, col=col)
