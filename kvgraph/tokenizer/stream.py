"""Incremental detokenization: text comes out as soon as it is complete UTF-8, never a broken character."""
from __future__ import annotations

import codecs
from typing import Callable


class StreamDecoder:
    """Feed token ids one at a time; each `feed` returns the newly completed text.

    A token can end in the middle of a multi-byte character (byte-fallback tokens, byte-level BPE pieces),
    so bytes are pushed through an incremental UTF-8 decoder that holds back an incomplete tail. Invalid
    bytes become U+FFFD exactly as `bytes.decode('utf-8', 'replace')` would, so the concatenation of every
    `feed` plus `flush` equals `Tokenizer.decode` of the same ids.
    """

    def __init__(self, piece: Callable[[int], bytes]):
        self._piece = piece
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._piece(token_id))

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
