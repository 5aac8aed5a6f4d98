"""The graph key: the few facts that fully determine a graph's topology.

Two ubatches with equal keys run on the same cached graph + plan + program; only their inputs differ.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GraphKey:
    n_tokens: int                          # tokens in the ubatch
    n_seqs: int                            # distinct sequences in it
    equal_seqs: bool                       # every sequence contributes the same number of tokens
    windows: tuple[tuple[str, int], ...]   # padded window (cells) of each memory the graph reads
    n_outputs: int                         # rows that produce logits
    flash_attn: bool = False               # fused attention over a row-major V cache

    def window(self, memory: str) -> int:
        return dict(self.windows)[memory]

    def describe(self) -> str:
        wins = ",".join(f"{m}={n}" for m, n in self.windows)
        return (f"tokens={self.n_tokens} seqs={self.n_seqs}{'(eq)' if self.equal_seqs else ''} kv[{wins}] "
                f"out={self.n_outputs}{' fa' if self.flash_attn else ''}")
