"""Build a HF `tokenizers.Tokenizer` from GGUF vocabulary metadata, reproducing llama.cpp's tokenization.

Two model kinds:
- 'gpt2': byte-level BPE. The GGUF carries the merges; the pre-tokenizer (regex splits) is chosen by name
  from `PRE_TOKENIZERS`, which mirrors llama.cpp's table (llama-vocab.cpp).
- 'llama' (SentencePiece): llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation
  is a vocab token with the highest score. A BPE model whose merge ranks follow the result token's score
  reproduces that, so we derive merges from (vocab, scores) and let HF's BPE run them, with byte fallback.

Control/unknown tokens become HF *special* added tokens (split out of raw text only when parse_special is on,
via `encode_special_tokens`); user-defined tokens become non-special added tokens, which - like llama.cpp's
`tokenizer_st_partition` - are always matched in raw text before the model runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from ..errors import TokenizerError

# GGUF token types (gguf.TokenType / llama.cpp LLAMA_TOKEN_TYPE_*).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPECIAL_TYPES = (CONTROL, UNKNOWN)  # hidden by skip_special, parsed from text only with parse_special

SPM_SPACE = "\u2581"  # '▁', SentencePiece's escaped space


@dataclass(frozen=True)
class PreTokenizer:
    """A gpt2-BPE pre-tokenizer: regexes applied one after another (each splits the pieces of the previous,
    keeping unmatched spans as pieces too, like llama.cpp's `unicode_regex_split`)."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is itself a vocab token is not split (llama3 family)
    add_bos: bool = False  # llama.cpp's default when tokenizer.ggml.add_bos_token is absent


_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_QWEN35 = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"   # DeepSeek's CJK / Hangul runs
# DeepSeek LLM's letter runs: the cased-letter ranges llama.cpp lists (its regex, verbatim).
_DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-"
    "\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57"
    "\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-"
    "\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-"
    "\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184"
    "\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-"
    "\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-"
    "\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)


def _alias(names: str, pre: PreTokenizer) -> dict[str, PreTokenizer]:
    return {name: pre for name in names.split()}


# Keyed by tokenizer.ggml.pre, as in llama.cpp's llm_tokenizer_bpe. Add entries here for more gpt2 vocabs.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    # llama.cpp's DEFAULT (also used when tokenizer.ggml.pre is missing): punctuation runs, gpt2, digit runs.
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **_alias("gpt2 gpt-2 phi-2 mpt olmo jais exaone4", PreTokenizer((_GPT2,))),
    # starcoder-style: every digit is its own piece first.
    **_alias("smollm starcoder refact codeshell exaone minerva-7b command-r", PreTokenizer((r"\p{N}", _GPT2))),
    **_alias("llama3 llama-v3 llama-bpe falcon3", PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)),
    **_alias("qwen2 deepseek-r1-qwen stablelm2 megrez", PreTokenizer((_QWEN2,))),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]")),
    "deepseek-llm": PreTokenizer((r"[\r\n]", _DEEPSEEK_LETTERS, "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                                  r"\s+$", _CJK, r"\p{N}+")),
    "deepseek-coder": PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}")),
    "qwen35": PreTokenizer((_QWEN35,)),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _add_vocab_tokens(tok: HFTokenizer, tokens: Sequence[str], types: Sequence[int]) -> None:
    """Register control/unknown (special) and user-defined (always matched) tokens, matched on raw text."""
    kinds = np.asarray(types)

    def added(ids: np.ndarray, special: bool) -> list[AddedToken]:
        return [AddedToken(tokens[i], special=special, normalized=False) for i in ids.tolist()]

    special = added(np.flatnonzero(np.isin(kinds, SPECIAL_TYPES)), True)
    user = added(np.flatnonzero(kinds == USER_DEFINED), False)
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def _merge_pairs(vocab: dict[str, int], merges: Sequence[str]) -> list[tuple[str, str]]:
    # llama.cpp splits at the first space after position 0 (a merge side is never empty).
    cuts = [m.find(" ", 1) for m in merges]
    if -1 in cuts:
        m = merges[cuts.index(-1)]
        raise TokenizerError(
            f"malformed BPE merge {m!r} in tokenizer.ggml.merges (expected 'left right'); "
            "the GGUF file is corrupt - re-convert it with a current llama.cpp."
        )
    pairs = [(m[:c], m[c + 1 :]) for m, c in zip(merges, cuts)]
    # llama.cpp never applies a merge whose result is not a token, and HF panics on one: checked as a whole
    # set (C speed), pair by pair only when some merge must go. (A side that is not a token, HF refuses
    # with an exception: _bpe drops those.)
    if not vocab.keys() >= {a + b for a, b in pairs}:
        pairs = [(a, b) for a, b in pairs if a + b in vocab]
    return pairs


def _bpe(vocab: dict[str, int], merges: Sequence[str], **kw) -> models.BPE:
    pairs = _merge_pairs(vocab, merges)
    try:
        return models.BPE(vocab=vocab, merges=pairs, **kw)
    except Exception:   # a merge over a symbol that is not a token
        return models.BPE(vocab=vocab, merges=[(a, b) for a, b in pairs if a in vocab and b in vocab], **kw)


def build_gpt2(
    tokens: Sequence[str], types: Sequence[int], merges: Sequence[str], pre: PreTokenizer
) -> HFTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(_bpe(vocab, merges, ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    _add_vocab_tokens(tok, tokens, types)
    return tok


def spm_merges(tokens: Sequence[str], types: Sequence[int], scores: Sequence[float]) -> list[tuple[str, str]]:
    """Every (left, right) split of a NORMAL token into two vocab tokens, best-scored result first.

    llama.cpp merges any adjacent pair whose concatenation is a token, by the result's score, so every split
    is a merge. Finding the splits is the slow part for a 262k vocab (~1.2M candidate splits), so it is
    vectorized: every prefix/suffix gets a 64-bit polynomial hash over its UTF-32 code points (length mixed
    in) and is looked up among the vocab's hashes; the pairs reuse the vocab's own str objects. Checked
    against the plain string-probing loop on the Gemma3 and SmolLM2 vocabularies: identical output.
    """
    n = len(tokens)
    lens = np.fromiter(map(len, tokens), dtype=np.int64, count=n)
    # Candidate results: normal tokens of 2+ chars, best score first (stable: ties keep vocab order).
    cand = np.flatnonzero((np.asarray(types) == NORMAL) & (lens >= 2))
    cand = cand[np.argsort(-np.asarray(scores, dtype=np.float64)[cand], kind="stable")]
    if len(cand) == 0:
        return []
    width = int(lens.max())

    P = np.uint64(0x100000001B3)  # odd, so invertible mod 2**64
    M = np.uint64(0x9E3779B97F4A7C15)  # mixes the length in
    pw = np.ones(width + 1, dtype=np.uint64)
    inv = np.ones(width + 1, dtype=np.uint64)
    p_inv = np.uint64(pow(int(P), -1, 1 << 64))
    with np.errstate(over="ignore"):
        for i in range(1, width + 1):
            pw[i] = pw[i - 1] * P
            inv[i] = inv[i - 1] * p_inv
        # cum[t, i] = hash of the first i+1 code points of token t (0-padded, so the last column is the whole).
        codes = np.array(tokens, dtype=f"<U{width}").view(np.uint32).reshape(n, width)
        cum = codes.astype(np.uint64)
        cum *= pw[:width]
        np.cumsum(cum, axis=1, out=cum)
        vkeys = cum[:, -1] + M * lens.astype(np.uint64)
        cum = cum[cand]
        clen = lens[cand]
        rows, col = np.nonzero(np.arange(1, width)[None, :] < clen[:, None])  # split after col+1 chars
        k = col + 1
        left = cum[rows, col] + M * k.astype(np.uint64)
        right = (cum[rows, -1] - cum[rows, col]) * inv[k] + M * (clen[rows] - k).astype(np.uint64)
    vorder = np.argsort(vkeys)
    vkeys = vkeys[vorder]

    def lookup(keys: np.ndarray) -> np.ndarray:
        """Token id of each key, -1 where none."""
        pos = np.searchsorted(vkeys, keys).clip(max=n - 1)
        return np.where(vkeys[pos] == keys, vorder[pos], -1)

    lid = lookup(left)
    hit = np.flatnonzero(lid >= 0)
    rid = lookup(right[hit])
    hit, rid = hit[rid >= 0], rid[rid >= 0]  # still row-major: best result first, then by split position
    get = (tokens if isinstance(tokens, list) else list(tokens)).__getitem__
    return list(zip(map(get, lid[hit].tolist()), map(get, rid.tolist())))


def build_spm(
    tokens: Sequence[str], types: Sequence[int], scores: Sequence[float], add_space_prefix: bool, unk: str | None
) -> HFTokenizer:
    vocab = dict(zip(tokens, range(len(tokens))))
    model = models.BPE(
        vocab=vocab, merges=spm_merges(tokens, types, scores), byte_fallback=True, unk_token=unk, fuse_unk=True
    )
    tok = HFTokenizer(model)
    # llama.cpp escapes spaces and (with add_space_prefix) prepends one to every raw-text fragment, including
    # fragments that follow a special token; HF normalizes each fragment between added tokens the same way.
    norm = [normalizers.Replace(" ", SPM_SPACE)]
    if add_space_prefix:
        norm.insert(0, normalizers.Prepend(SPM_SPACE))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    _add_vocab_tokens(tok, tokens, types)
    return tok


def build_gemma4(tokens: Sequence[str], types: Sequence[int], merges: Sequence[str]) -> HFTokenizer:
    """Gemma 4's tokenizer (tokenizer.ggml.model 'gemma4'): SentencePiece-style BPE by merges over raw UTF-8
    characters, spaces escaped as '▁', split only at newline runs, unknown characters as <0xXX> byte
    tokens (llama.cpp's LLAMA_VOCAB_PRE_TYPE_GEMMA4)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = HFTokenizer(_bpe(vocab, merges, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPM_SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[^\n]+|[\n]+"), behavior="isolated")
    tok.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    _add_vocab_tokens(tok, tokens, types)
    return tok
