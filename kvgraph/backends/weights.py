"""A model tensor as the quantized backends keep it (torch and native; plain numpy here)."""
from __future__ import annotations

from typing import Callable

import numpy as np

from .quant_repack import row_reader

# Tensors whose main use is a row lookup: their matmul form is built only when asked for (tie_output).
LOOKUP_TENSORS = frozenset({"token_embd.weight"})


class PackedWeight:
    """One model tensor, in the forms its uses need: `dense` (float32 numpy, for F32 and 1-D tensors and any
    non-matmul use), `mat` (the repacked matmul form, made by `matrix_form(data, type_name, shape, name)`,
    or `dense_form(array)` for an F32 matrix) and `rows` (row lookup from the raw file data).

    A 3-D tensor (a mixture's experts, [X, N, K]) is dense float32 unless the backend stacks experts
    (STACKS_EXPERTS): its matrices then form one [X N, K] matrix in the matmul form, expert x's rows
    x N .. (x + 1) N - 1, and float32 values are made only if some kernel asks for them."""

    STACKS_EXPERTS = False

    def __init__(self, gguf_file, name: str, matrix_form: Callable, dense_form: Callable):
        info = gguf_file.tensor(name)
        self.name, self.type_name, self.shape = name, info.type_name, tuple(info.shape)
        self._file, self._matrix_form = gguf_file, matrix_form
        self.dense: np.ndarray | None = None
        self.mat = None
        self._rows = None
        if len(self.shape) == 3 and info.type_name != "F32" and self.STACKS_EXPERTS:
            rows = self.shape[0] * self.shape[1]
            self.mat = matrix_form(info.data.reshape(rows, -1), info.type_name, (rows, self.shape[2]), name)
        elif info.type_name == "F32" or len(self.shape) != 2:
            self.dense = gguf_file.dequantize(name)    # F32: the memory-mapped data itself, no copy
            if len(self.shape) == 1:
                # a norm or bias, a few KB: copied, so that reading it every step maps no file page (with the
                # neighbours the kernel maps around a fault) back in after the load hands the file's back
                self.dense = self.dense.copy()
            if len(self.shape) == 2:
                self.mat = dense_form(self.dense)
        elif name not in LOOKUP_TENSORS:
            self.mat = matrix_form(info.data, info.type_name, self.shape, name)

    @property
    def nbytes(self) -> int:
        """Bytes of the weight's forms (an F32 matrix's dense array and matrix form are one array: once)."""
        n = self.dense.nbytes if self.dense is not None else 0
        shared = self.dense is not None and getattr(self.mat, "w", None) is self.dense
        return n + (self.mat.nbytes if self.mat is not None and not shared else 0)

    def matrix(self):
        if self.mat is None:
            self.mat = self._matrix_form(self._file.tensor(self.name).data, self.type_name, self.shape, self.name)
        return self.mat

    def array(self) -> np.ndarray:
        """float32 values for a non-matmul use (a rare, small case: dequantized once and kept)."""
        if self.dense is None:
            self.dense = self._file.dequantize(self.name)
        return self.dense

    def rows(self):
        if self.dense is not None:
            return row_reader(self.dense, "F32", self.shape)
        if self._rows is None:
            info = self._file.tensor(self.name)
            self._rows = row_reader(info.data, info.type_name, self.shape)
        return self._rows
