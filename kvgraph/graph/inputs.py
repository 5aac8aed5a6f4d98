"""Graph inputs: every per-step fact is an input tensor, filled before each run.

As in llama.cpp's `llm_graph_input_*`, each input knows how to fill its buffer from a ubatch (`set`). Its
shape is fixed by the graph key (tokens, outputs, sequences, windows), so a graph found by key always takes
the ubatch: there is no second, per-input reuse check (verify mode rebuilds and compares instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError, check_token_array
from .ir import I32, GraphBuilder, Tensor


@dataclass
class UBatch:
    """One micro-batch: tokens with their positions and sequence ids, and which rows produce logits."""

    tokens: np.ndarray      # int32 [n]
    pos: np.ndarray         # int32 [n]
    seq: np.ndarray         # int32 [n]
    out_rows: np.ndarray    # int32 [n_outputs], indices into the ubatch

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_outputs(self) -> int:
        return int(self.out_rows.shape[0])

    @property
    def seq_ids(self) -> tuple[int, ...]:
        return tuple(int(s) for s in np.unique(self.seq))

    def check(self, n_vocab: int) -> None:
        """Refuse a ubatch that would index outside a table: token ids outside [0, n_vocab), output rows
        outside the ubatch, negative positions or sequence ids, or arrays of different lengths."""
        n = self.tokens.shape[0]
        if not (self.tokens.ndim == self.pos.ndim == self.seq.ndim == self.out_rows.ndim == 1
                and self.pos.shape[0] == self.seq.shape[0] == n):
            raise InvalidArgumentError("a ubatch needs one position and one sequence id per token.")
        check_token_array(self.tokens, n_vocab)
        if n and (int(self.pos.min()) < 0 or int(self.seq.min()) < 0):
            raise InvalidArgumentError("positions and sequence ids must be >= 0.")
        if self.out_rows.shape[0] and not (0 <= int(self.out_rows.min()) and int(self.out_rows.max()) < n):
            raise InvalidArgumentError(f"output rows must index the ubatch's {n} tokens.")

    @classmethod
    def single(cls, tokens, pos0: int, seq: int = 0, all_outputs: bool = False) -> "UBatch":
        tokens = np.asarray(tokens, np.int32)
        n = tokens.shape[0]
        out = np.arange(n, dtype=np.int32) if all_outputs else np.array([n - 1], np.int32)
        return cls(tokens, np.arange(pos0, pos0 + n, dtype=np.int32), np.full(n, seq, np.int32), out)


class GraphInput:
    """An input tensor plus the logic that fills it. Subclasses set `tensor` in their constructor."""

    tensor: Tensor

    @property
    def name(self) -> str:
        return self.tensor.name

    def set(self, ub: UBatch, memory: Any, buf: np.ndarray) -> None:
        raise NotImplementedError


class TokenInput(GraphInput):
    def __init__(self, g: GraphBuilder, n_tokens: int):
        self.tensor = g.input("inp_tokens", (n_tokens,), I32)

    def set(self, ub, memory, buf):
        buf[:] = ub.tokens


class PositionInput(GraphInput):
    def __init__(self, g: GraphBuilder, n_tokens: int):
        self.tensor = g.input("inp_pos", (n_tokens,), I32)

    def set(self, ub, memory, buf):
        buf[:] = ub.pos


class OutputRowsInput(GraphInput):
    """Rows of the ubatch whose logits are wanted (prompt processing needs only the last one)."""

    def __init__(self, g: GraphBuilder, n_outputs: int):
        self.tensor = g.input("inp_out_ids", (n_outputs,), I32)

    def set(self, ub, memory, buf):
        buf[:] = ub.out_rows
