"""Structured output: each sequence can carry a grammar (a JSON schema, any JSON object, or a GBNF grammar
as llama.cpp takes it) that masks the tokens it may sample next. The grammar engine is llguidance
(`pip install 'kvgraph[server]'`): it computes a step's mask in ~0.01-0.2 ms on a 49k vocabulary, under 2%
of a SmolLM2 decode step, so it runs inline before sampling.
"""
from __future__ import annotations

import json
import time
from typing import Any, Callable

import numpy as np

from ..errors import InvalidArgumentError, KvgraphError
from ..tokenizer.build import CONTROL, UNKNOWN


class GrammarError(InvalidArgumentError):
    """A schema or grammar that cannot be compiled (a 400 for the server)."""


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy
    except ImportError:
        raise InvalidArgumentError("structured output (response_format, grammar) needs llguidance: "
                                   "pip install 'kvgraph[server]'.") from None
    return llguidance


def compile_grammar(kind: str, source: Any) -> str:
    """llguidance's grammar for kind 'json_schema' (a schema object), 'json_object' (any JSON object), 'gbnf'
    (llama.cpp's grammar text) or 'tool_call' (a <tool_call> block whose JSON follows a schema); GrammarError
    naming the problem when it does not compile."""
    ll = _llguidance()
    try:
        if kind in ("json_object", "json_schema"):
            schema = {"type": "object"} if kind == "json_object" else dict(source)
            # Compact JSON (", " and ": " separators, no free whitespace), as OpenAI's structured output
            # writes it: a small model cannot wander off into endless newlines inside an object.
            schema.setdefault("x-guidance", {"whitespace_flexible": False})
            grammar = ll.grammar_from("json_schema", json.dumps(schema))
        elif kind == "gbnf":
            grammar = ll.grammar_from("gbnf", source)
        elif kind == "tool_call":     # a Hermes-style call whose JSON follows the schema (tool_choice)
            schema = dict(source) | {"x-guidance": {"whitespace_flexible": False}}
            grammar = ll.grammar_from("lark", 'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json '
                                      + json.dumps(schema))
        else:
            raise GrammarError(f"unknown grammar kind {kind!r}.")
    except (ValueError, TypeError) as exc:
        raise GrammarError(f"invalid {kind}: {str(exc)[:300]}") from None
    problem = ll.LLMatcher.validate_grammar(grammar)
    if problem:
        raise GrammarError(f"invalid {kind.replace('_', ' ')}: {problem[:300]}")
    return grammar


class _VocabularyView:
    """What llguidance's TokenizerWrapper reads of a kvgraph Tokenizer: each token's bytes (special tokens
    none), end/begin ids, and a callable that tokenizes bytes."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = [i for i, kind in enumerate(tokenizer.token_types) if kind in (CONTROL, UNKNOWN)]
        self.special_token_ids = special
        skip = set(special)
        self.tokens = [b"" if i in skip else tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, tokenizer.bos_id

    def __call__(self, text: bytes) -> list[int]:
        return self.tokenizer.encode(text.decode("utf-8", errors="replace"), add_bos=False, parse_special=False)


class Grammars:
    """Builds per-sequence constraints for one tokenizer (its llguidance view made once, on first use)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._ll_tokenizer = None

    def factory(self, grammar: str) -> Callable[[], "Constraint"]:
        """A maker of fresh constraints for this grammar: one per sequence (each choice of n gets its own)."""
        ll = _llguidance()
        if self._ll_tokenizer is None:
            self._ll_tokenizer = ll.LLTokenizer(ll.TokenizerWrapper(_VocabularyView(self.tokenizer)))
        tok = self._ll_tokenizer
        return lambda: Constraint(ll.LLMatcher(tok, grammar), tok.vocab_size)


class Constraint:
    """One sequence's grammar state: the mask of the tokens allowed next, and the tokens taken."""

    def __init__(self, matcher, n_vocab: int):
        import llguidance.numpy as lln

        self.matcher, self.n_vocab, self._lln = matcher, n_vocab, lln
        self.bitmask = lln.allocate_token_bitmask(1, n_vocab)
        self.seconds = 0.0          # time spent computing masks (the cost structured output adds)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A copy of logits with every token the grammar forbids next at -inf."""
        t0 = time.perf_counter()
        self._lln.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        allowed = np.unpackbits(self.bitmask[0].view(np.uint8), bitorder="little")[: logits.shape[0]].astype(bool)
        self.seconds += time.perf_counter() - t0
        if not allowed.any():
            raise KvgraphError(f"the grammar allows no next token ({self.matcher.get_error() or 'dead end'}).")
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise KvgraphError(f"the grammar refused token {token} ({self.matcher.get_error()}).")
