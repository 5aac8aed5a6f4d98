"""`Tokenizer`: text <-> token ids for a GGUF model, built only from the file's metadata (no hub downloads).

Encoding runs in a HF `tokenizers` object configured to reproduce llama.cpp (see `build.py`). Decoding is
done here from per-token bytes, because a token's piece may be a fraction of a UTF-8 character and the
engine streams output token by token; `decode` and `StreamDecoder` share the same bytes.
"""
from __future__ import annotations

import operator
import re
import threading
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ContextOverflowError, TokenizerError, short_repr
from ..gguf.reader import gguf_type
from .build import (
    BYTE,
    CONTROL,
    NORMAL,
    PRE_TOKENIZERS,
    SPECIAL_TYPES,
    SPM_SPACE,
    UNKNOWN,
    USER_DEFINED,
    build_gemma4,
    build_gpt2,
    build_spm,
    bytes_to_unicode,
)
from .chat import ChatTemplate, pick_template, with_tool_instructions
from .stream import StreamDecoder

MODEL_KINDS = ("gpt2", "llama", "gemma4")

# Token texts that end generation wherever they exist (llama.cpp marks the same ones EOG by text).
EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>",
    "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
)  # fmt: skip

_BYTE_DECODER = {c: b for b, c in bytes_to_unicode().items()}
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _bad(key: str, problem: str) -> TokenizerError:
    return TokenizerError(
        f"GGUF tokenizer metadata {key}: {problem}. The file is corrupt or was converted incorrectly; "
        "re-download it or re-convert it with a current llama.cpp (convert_hf_to_gguf.py)."
    )


def _stored_as(md: Mapping[str, Any], key: str, *expected: str) -> None:
    """Refuse a value the file stores with another type than llama.cpp reads it as (llama-vocab.cpp: the
    tokens and merges are string arrays, token types int32, scores float32 or int32, token ids uint32, flags
    bool): its bytes would be read as other numbers (a uint32 token type array as int32, ...)."""
    found = gguf_type(md, key)
    if found is not None and found not in expected:
        raise _bad(key, f"stored as {found}, but read as {' or '.join(expected)} (llama.cpp refuses it too)")


def _list(md: Mapping[str, Any], key: str, kind: type | tuple[type, ...], min_len: int = 0,
          stored: tuple[str, ...] = ()) -> list | None:
    value = md.get(key)
    if value is None:
        return None
    _stored_as(md, key, *stored)
    if isinstance(value, np.ndarray):  # numeric arrays may come straight from the GGUF reader
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise _bad(key, f"expected an array, got {type(value).__name__}")
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # Checking the set of element types is C-speed; find the culprit only on failure (262k-entry arrays).
    if not set(map(type, value)) <= set(kinds):
        bad = next(i for i, v in enumerate(value) if type(v) not in kinds)
        raise _bad(key, f"entry {bad} is {value[bad]!r}, expected {getattr(kind, '__name__', 'a number')}")
    if len(value) < min_len:
        raise _bad(key, f"has {len(value)} entries for {min_len} tokens")
    return list(value)


def _token_id(md: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    _stored_as(md, key, "uint32")
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_vocab:
        raise _bad(key, f"{value!r} is not a token id (vocabulary has {n_vocab} tokens)")
    return value


def _flag(md: Mapping[str, Any], key: str, default: bool) -> bool:
    value = md.get(key, default)
    _stored_as(md, key, "bool")
    if not isinstance(value, bool):
        raise _bad(key, f"expected true/false, got {value!r}")
    return value


class Tokenizer:
    """Tokenizer of one GGUF model. Build it with `Tokenizer.from_metadata(read_metadata(path))`."""

    def __init__(
        self,
        hf: Any,
        tokens: list[str],
        types: list[int],
        model_kind: str,
        pre: str | None,
        bos_id: int | None,
        eos_id: int | None,
        eog_ids: frozenset[int],
        add_bos: bool,
        template: ChatTemplate,
    ):
        self.hf = hf  # the underlying tokenizers.Tokenizer (encoding only)
        self.tokens = tokens
        self.token_types = types
        self.vocab_size = len(tokens)
        self.model_kind = model_kind
        self.pre = pre
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eog_ids = eog_ids
        self.add_bos = add_bos
        self._template = template
        self._bytes: list[bytes | None] = [None] * len(tokens)  # token_bytes cache, filled on demand
        self._max_piece: int | None = None
        # `encode_special_tokens` is a flag on the shared HF object; the lock keeps toggling it atomic.
        self._encode_lock = threading.Lock()

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any]) -> "Tokenizer":
        model = md.get("tokenizer.ggml.model")
        if model is None:
            raise TokenizerError(
                "the GGUF file has no tokenizer (tokenizer.ggml.model is missing); "
                "use a GGUF converted with its vocabulary (llama.cpp's convert_hf_to_gguf.py includes it)."
            )
        _stored_as(md, "tokenizer.ggml.model", "string")
        if model not in MODEL_KINDS:
            raise TokenizerError(
                f"tokenizer model {model!r} (tokenizer.ggml.model) is not supported; kvgraph supports "
                "'gpt2' (byte-level BPE), 'llama' (SentencePiece) and 'gemma4'. Use a model with one of those "
                "tokenizers."
            )
        tokens = _list(md, "tokenizer.ggml.tokens", str, stored=("array of string",))
        if not tokens:
            raise _bad("tokenizer.ggml.tokens", "missing or empty")
        n = len(tokens)
        # llama.cpp renames empty tokens rather than failing; a duplicate, though, makes ids ambiguous.
        if "" in tokens:
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        if len(set(tokens)) != n:  # llama.cpp refuses these files too
            seen: dict[str, int] = {}
            dup = next(i for i, t in enumerate(tokens) if seen.setdefault(t, i) != i)
            first = seen[tokens[dup]]
            raise _bad("tokenizer.ggml.tokens", f"duplicate token {tokens[dup]!r} (ids {first} and {dup})")
        types = _list(md, "tokenizer.ggml.token_type", int, n, stored=("array of int32",))
        types = types[:n] if types is not None else [NORMAL] * n

        ids = {k: _token_id(md, f"tokenizer.ggml.{k}_token_id", n) for k in ("bos", "eos", "unknown", "eot", "eom")}
        pre = md.get("tokenizer.ggml.pre")
        _stored_as(md, "tokenizer.ggml.pre", "string")
        if pre is not None and not isinstance(pre, str):
            raise _bad("tokenizer.ggml.pre", f"expected a name, got {pre!r}")

        try:
            if model == "gpt2":
                pre_name = pre or "default"  # llama.cpp: a missing pre type means 'default'
                if pre_name not in PRE_TOKENIZERS:
                    raise TokenizerError(
                        f"unknown pre-tokenizer type {pre_name!r} (tokenizer.ggml.pre); kvgraph knows "
                        f"{', '.join(sorted(PRE_TOKENIZERS))}. Use a model with a supported tokenizer, or add its "
                        "regexes to kvgraph.tokenizer.build.PRE_TOKENIZERS."
                    )
                merges = _list(md, "tokenizer.ggml.merges", str, stored=("array of string",))
                if merges is None:
                    raise _bad("tokenizer.ggml.merges", "missing (a gpt2 BPE tokenizer needs its merges)")
                add_bos = _flag(md, "tokenizer.ggml.add_bos_token", PRE_TOKENIZERS[pre_name].add_bos)
                hf = build_gpt2(tokens, types, merges, PRE_TOKENIZERS[pre_name])
            elif model == "gemma4":
                merges = _list(md, "tokenizer.ggml.merges", str, stored=("array of string",))
                if merges is None:
                    raise _bad("tokenizer.ggml.merges", "missing (a gemma4 BPE tokenizer needs its merges)")
                add_bos = True    # llama.cpp forces it for Gemma 4, whatever the file says
                hf = build_gemma4(tokens, types, merges)
            else:
                scores = _list(md, "tokenizer.ggml.scores", (int, float), n,
                               stored=("array of float32", "array of int32"))
                if scores is None:
                    raise _bad("tokenizer.ggml.scores", "missing (a SentencePiece tokenizer needs token scores)")
                add_bos = _flag(md, "tokenizer.ggml.add_bos_token", True)
                prefix = _flag(md, "tokenizer.ggml.add_space_prefix", True)
                unk = tokens[ids["unknown"]] if ids["unknown"] is not None else None
                hf = build_spm(tokens, types, scores[:n], prefix, unk)
        except TokenizerError:
            raise
        except Exception as e:  # tokenizers rejects something in the vocabulary
            raise _bad("tokenizer.ggml.*", f"could not build the tokenizer ({type(e).__name__}: {e})") from e
        if add_bos and ids["bos"] is None:
            raise _bad("tokenizer.ggml.bos_token_id", "missing, but add_bos_token is true")

        eog = {i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None}
        eog.update(i for i in map(hf.token_to_id, EOG_TEXTS) if i is not None)

        def text_of(i: int | None) -> str:
            return tokens[i] if i is not None else ""

        source, origin = pick_template(md.get("tokenizer.chat_template"), md.get("general.architecture"))
        template = ChatTemplate(source, origin, text_of(ids["bos"]), text_of(ids["eos"]))
        return cls(hf, tokens, types, model, pre, ids["bos"], ids["eos"], frozenset(eog), add_bos, template)

    # ---------------------------------------------------------------- encode / decode

    @property
    def max_piece_bytes(self) -> int:
        """An upper bound on the bytes of text one token stands for: its GGUF piece's UTF-8 length (a
        byte-level BPE char stands for one byte, SentencePiece's 3-byte '▁' for a space, '<0x41>' for one)."""
        if self._max_piece is None:
            self._max_piece = max(1, max(len(t.encode("utf-8", "surrogatepass")) for t in self.tokens))
        return self._max_piece

    def max_chars(self, max_tokens: int) -> int:
        """The longest text that could possibly encode to max_tokens tokens or fewer."""
        return max_tokens * self.max_piece_bytes

    def check_fits(self, text: str, max_tokens: int) -> None:
        """Refuse, before tokenizing, a text that cannot fit max_tokens even at this vocabulary's longest
        token (each character is at least one byte): a 100 MB prompt fails here in O(1), not in the
        tokenizer's allocation. A text of at most max_tokens characters always fits: the longest token is
        not looked for then (a pass over the whole vocabulary, ~0.06 s at 150k tokens, at every start)."""
        if len(text) > max_tokens and len(text) > self.max_chars(max_tokens):
            raise ContextOverflowError(
                f"the prompt is {len(text):,} characters long, which cannot fit the {max_tokens:,} tokens of "
                f"context even at this vocabulary's longest token ({self.max_piece_bytes} bytes); shorten "
                "it or use a larger context (-c).")

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True,
               max_tokens: int | None = None) -> list[int]:
        """Token ids of `text`. parse_special: control tokens written in the text (e.g. '<|im_start|>')
        become their ids; otherwise they are tokenized as plain text. User-defined tokens always match.
        max_tokens: refuse (ContextOverflowError) a text that cannot encode to that many tokens, before
        tokenizing it."""
        if not isinstance(text, str):
            raise TypeError(f"encode() needs a str, got {type(text).__name__}")
        if max_tokens is not None:
            self.check_fits(text, max_tokens)
        with self._encode_lock:
            self.hf.encode_special_tokens = not parse_special
            try:
                ids = self.hf.encode(text, add_special_tokens=False).ids
            except TypeError:  # lone surrogates (legal in JSON strings) are not UTF-8: encode them as U+FFFD
                ids = self.hf.encode(_LONE_SURROGATE.sub("\ufffd", text), add_special_tokens=False).ids
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise TokenizerError(
                    "add_bos was requested but this model has no BOS token (tokenizer.ggml.bos_token_id); "
                    "encode with add_bos=False."
                )
            ids.insert(0, self.bos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token's piece (may be part of a UTF-8 character)."""
        try:
            i = operator.index(token_id)
        except TypeError:
            raise TokenizerError(f"token ids must be integers, got {short_repr(token_id)}.") from None
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {short_repr(i)} is outside the vocabulary (0..{self.vocab_size - 1}).")
        piece = self._bytes[i]
        if piece is None:
            piece = self._bytes[i] = self._compute_bytes(i)
        return piece

    def _compute_bytes(self, i: int) -> bytes:
        text, kind = self.tokens[i], self.token_types[i]
        if kind == BYTE and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        if kind == NORMAL:
            if self.model_kind in ("llama", "gemma4"):     # raw UTF-8 pieces, '▁' for a space
                return text.replace(SPM_SPACE, " ").encode("utf-8")
            # Byte-level BPE: each char stands for one byte (a char outside the map is kept as UTF-8).
            return b"".join(bytes([_BYTE_DECODER[c]]) if c in _BYTE_DECODER else c.encode("utf-8") for c in text)
        if kind in (CONTROL, UNKNOWN, USER_DEFINED):
            return text.encode("utf-8")  # stored as plain text in GGUF
        return b""  # unused / undefined tokens render as nothing (llama.cpp does the same)

    def _piece_fn(self, skip_special: bool):
        if not skip_special:
            return self.token_bytes
        types = self.token_types

        def piece(token_id: int) -> bytes:
            b = self.token_bytes(token_id)
            return b"" if types[token_id] in SPECIAL_TYPES else b

        return piece

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`: the concatenation of the tokens' pieces (invalid UTF-8 becomes U+FFFD).
        skip_special drops control tokens such as <|im_end|>."""
        piece = self._piece_fn(skip_special)
        return b"".join(map(piece, ids)).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = False) -> StreamDecoder:
        """Incremental decoder: joined feed() outputs + flush() == decode(ids, skip_special)."""
        return StreamDecoder(self._piece_fn(skip_special))

    # ---------------------------------------------------------------- chat

    @property
    def chat_template(self) -> str:
        return self._template.source

    @property
    def chat_template_source(self) -> str:
        """'gguf' when the model file carries the template, else 'builtin:<name>'."""
        return self._template.origin

    def set_chat_template(self, source: str, origin: str) -> None:
        """Use another chat template (a server's --chat-template / --chat-template-file)."""
        self._template = ChatTemplate(source, origin, self._template._vars["bos_token"],
                                      self._template._vars["eos_token"], self._template.limits)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            max_chars: int | None = None, tools: list | None = None, **options) -> str:
        """The rendered prompt; options: ChatTemplate.render's extra and continue_final."""
        if tools and not self._template.knows_tools:
            messages = with_tool_instructions(messages, tools)
            tools = None
        return self._template.render(messages, add_generation_prompt, max_chars, tools, **options)

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    max_tokens: int | None = None, tools: list | None = None, **options) -> list[int]:
        """Render then tokenize. Templates often write the BOS themselves ('<bos>...'); it is then parsed
        as the BOS token and not added a second time. max_tokens: as for encode (it also caps the length
        of the rendered text)."""
        max_chars = None if max_tokens is None else self.max_chars(max_tokens)
        text = self.apply_chat_template(messages, add_generation_prompt, max_chars, tools, **options)
        ids = self.encode(text, add_bos=False, max_tokens=max_tokens)
        if self.add_bos and (not ids or ids[0] != self.bos_id):
            ids.insert(0, self.bos_id)
        return ids

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.model_kind}, pre={self.pre!r}, vocab={self.vocab_size}, bos={self.bos_id}, "
            f"eos={self.eos_id}, add_bos={self.add_bos}, chat_template={self.chat_template_source})"
        )
