"""Tokenizer built from GGUF metadata (HF `tokenizers` under the hood), chat templates, streaming decode."""
from .stream import StreamDecoder
from .tokenizer import Tokenizer

__all__ = ["Tokenizer", "StreamDecoder"]
