"""Errors a user can cause. Each carries one clear message naming the problem and the fix.

The CLI catches `KvgraphError` and prints its message (no traceback); anything else is a bug.
"""
import reprlib

import numpy as np


class KvgraphError(Exception):
    """Base class for every user-facing kvgraph error."""


class GGUFError(KvgraphError):
    """The model file is not a valid, supported GGUF file."""


class UnsupportedModelError(GGUFError):
    """The file is valid GGUF but describes something kvgraph cannot run."""


class ModelNotFoundError(KvgraphError):
    """A model name or path that does not exist."""


class DownloadError(KvgraphError):
    """Fetching a model from the package registry failed."""


class TokenizerError(KvgraphError):
    """Tokenizer metadata is missing or malformed, or a chat template failed."""


class ContextOverflowError(KvgraphError):
    """A prompt (plus requested tokens) does not fit the context window."""

    def __init__(self, message: str, n_prompt_tokens: int | None = None, n_ctx: int | None = None):
        super().__init__(message)
        self.n_prompt_tokens, self.n_ctx = n_prompt_tokens, n_ctx    # where known: llama-server reports both


class InvalidArgumentError(KvgraphError):
    """A parameter value a user passed is out of range or malformed."""


class InsufficientMemoryError(KvgraphError):
    """The host cannot hold what was asked for (a model's weights), said before trying."""


class IndexOutOfRangeError(InvalidArgumentError):
    """A token id or a row index outside its table reached the engine (refused before any kernel reads it)."""


class GraphCacheVerifyError(KvgraphError):
    """Verify mode found that a rebuilt graph differs from the cached one (a kvgraph bug)."""


def short_repr(value) -> str:
    """A bounded repr for error messages about values a user sent (a 1 MB string, a 5000-digit int)."""
    try:
        return reprlib.repr(value)
    except ValueError:   # int too large to convert to a string
        return "an integer of thousands of digits"


def check_token_ids(ids, n_vocab: int, what: str = "token id") -> list[int]:
    """ids as a list of ints, or IndexOutOfRangeError naming the first one that is not an integer in
    [0, n_vocab). Every token id that enters the engine from outside (prompts as ids, logit_bias keys,
    /detokenize, the Python API) passes here or through Context.decode's check, so no kernel ever reads an
    unchecked index."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu" and ids.ndim == 1:
        check_token_array(ids, n_vocab, what)
        return ids.tolist()
    out = []
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise IndexOutOfRangeError(f"{what}s must be integers, got {short_repr(i)}.")
        if not 0 <= i < n_vocab:
            raise IndexOutOfRangeError(f"{what} {short_repr(i)} is outside the vocabulary (valid ids: "
                                       f"0..{n_vocab - 1}).")
        out.append(int(i))
    return out


def out_of_range(idx: np.ndarray, n: int) -> int | None:
    """An entry of the integer array idx outside [0, n) (its minimum if negative, else its maximum), or None."""
    if not idx.size:
        return None
    lo, hi = int(idx.min()), int(idx.max())
    return lo if lo < 0 else hi if hi >= n else None


def check_token_array(ids: np.ndarray, n_vocab: int, what: str = "token id") -> None:
    """check_token_ids for an array, in place (no copy: the per-step check of every ubatch)."""
    if ids.dtype.kind not in "iu":
        raise IndexOutOfRangeError(f"{what}s must be integers, got an array of {ids.dtype}.")
    bad = out_of_range(ids, n_vocab)
    if bad is not None:
        raise IndexOutOfRangeError(f"{what} {bad} is outside the vocabulary (valid ids: 0..{n_vocab - 1}).")
