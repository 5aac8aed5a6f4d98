"""Tokenizer built from GGUF metadata (HF `tokenizers` under the hood), chat templates, streaming decode."""
from __future__ import annotations

__all__ = ["Tokenizer", "StreamDecoder"]


def __getattr__(name: str):
    # Imported on first use: `tokenizers` costs ~25 ms and ~4 MB, and a run on token ids (bench) needs none.
    if name == "Tokenizer":
        from .tokenizer import Tokenizer

        return Tokenizer
    if name == "StreamDecoder":
        from .stream import StreamDecoder

        return StreamDecoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
