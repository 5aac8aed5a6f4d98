"""State checkpoints of a scheduler's slots, for memories that cannot rewind (recurrent states, and sliding
window KV caches once their window has passed the cells).

A prompt that leaves the one a slot's cells hold at position p can keep the cells before p, except a
recurrent state, which holds only the end, and a window cache that has pruned the window before p. So the
scheduler keeps copies of a slot's state just before each prompt's last token (Context.checkpoint), and a
later prompt restarts from the latest one at or before p: a regenerated reply restarts at the end of its
prompt, an edited message at the end of the turn before.
Bounded per slot (--ctx-checkpoints) and in bytes over all slots (--cache-ram), the oldest dropped first.
"""
from __future__ import annotations

DEFAULT_PER_SLOT = 8                # llama-server's --ctx-checkpoints
DEFAULT_BYTES = 1 << 30             # --cache-ram 1024 (MiB)


class Checkpoints:
    def __init__(self, per_slot: int = DEFAULT_PER_SLOT, max_bytes: int = DEFAULT_BYTES):
        self.per_slot, self.max_bytes = per_slot, max_bytes
        self._by_slot: dict[int, list] = {}      # slot -> its checkpoints (Context.Checkpoint), oldest first
        self._taken = 0                          # a clock: which checkpoint is oldest across slots

    def of(self, seq: int) -> list:
        return self._by_slot.get(seq, [])

    def latest_at_or_before(self, seq: int, pos: int) -> int:
        """The position of seq's latest checkpoint at or before pos (0: none)."""
        return max((c.pos for c in self.of(seq) if c.pos <= pos), default=0)

    def add(self, seq: int, ck) -> None:
        self._taken += 1
        ck.taken = self._taken
        kept = self._by_slot.setdefault(seq, [])
        kept.append(ck)
        del kept[:-self.per_slot]
        while sum(c.nbytes for cs in self._by_slot.values() for c in cs) > self.max_bytes:
            min((cs for cs in self._by_slot.values() if cs), key=lambda cs: cs[0].taken).pop(0)

    def has(self, seq: int, pos: int) -> bool:
        return any(c.pos == pos for c in self.of(seq))

    def keep_until(self, seq: int, pos: int) -> None:
        """Drop seq's checkpoints past pos (its cells now end there)."""
        self._by_slot[seq] = [c for c in self.of(seq) if c.pos <= pos]

    def drop(self, seq: int) -> None:
        self._by_slot.pop(seq, None)

    def report(self, seq: int) -> dict:
        """/slots: where seq's checkpoints are and what they take."""
        kept = list(self.of(seq))
        return {"positions": [c.pos for c in kept], "bytes": sum(c.nbytes for c in kept)}
