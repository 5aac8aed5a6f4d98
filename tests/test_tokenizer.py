"""Tokenizer built from GGUF metadata: exact prompt ids vs the HF/llama.cpp references, decoding, streaming,
special/user-defined tokens, and clear errors for broken metadata (tiny synthetic vocabularies)."""
from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import load_reference
from kvgraph.errors import TokenizerError
from kvgraph.gguf.reader import read_metadata
from kvgraph.tokenizer import Tokenizer
from kvgraph.tokenizer.build import bytes_to_unicode


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return Tokenizer.from_metadata(read_metadata(smollm2_path)), load_reference("smollm2_public.json")


@pytest.fixture(scope="module")
def gemma3(gemma3_path):
    return Tokenizer.from_metadata(read_metadata(gemma3_path)), load_reference("gemma3_public.json")


@pytest.fixture(params=["smollm2", "gemma3"])
def model(request):
    return request.getfixturevalue(request.param)


# ------------------------------------------------------------------ real models vs references


def test_prompt_ids_match_reference(model):
    tok, ref = model
    for case in ref["cases"]:
        if case["kind"] == "chat":
            assert tok.apply_chat_template(case["prompt"]) == case["rendered"]
            assert tok.encode_chat(case["prompt"]) == case["prompt_ids"]
            # The rendered text already holds any BOS ('<bos>' for Gemma): parsed as one token, not doubled.
            assert tok.encode(case["rendered"], add_bos=False) == case["prompt_ids"]
        else:
            assert tok.encode(case["prompt"]) == case["prompt_ids"], case["prompt"][:60]


def test_decode_matches_reference(model):
    tok, ref = model
    for case in ref["cases"]:
        if case["kind"] != "chat":
            ids = case["prompt_ids"]
            assert tok.decode(ids[1:] if tok.add_bos else ids) == case["prompt"]
            assert tok.decode(ids, skip_special=True) == case["prompt"]  # drops Gemma's BOS
        assert tok.decode(case["greedy_ids"]) == case["greedy_text"]


def test_model_properties(smollm2, gemma3):
    s, _ = smollm2
    assert (s.model_kind, s.pre, s.vocab_size, s.add_bos) == ("gpt2", "smollm", 49152, False)
    assert (s.bos_id, s.eos_id, s.chat_template_source) == (1, 2, "gguf")
    assert s.eog_ids == {0, 2}  # <|endoftext|> and <|im_end|> (eos)
    g, ref = gemma3
    assert (g.model_kind, g.vocab_size, g.add_bos, g.bos_id, g.eos_id) == ("llama", 262144, True, 2, 1)
    assert g.eog_ids == set(ref["eog_token_ids"]) == {1, 106}  # <eos>, <end_of_turn>
    assert g.chat_template_source == "builtin:gemma"


def test_parse_special(smollm2, gemma3):
    s, _ = smollm2
    assert s.encode("<|im_start|>user") == [1] + s.encode("user")
    plain = s.encode("<|im_start|>user", parse_special=False)
    assert 1 not in plain and s.decode(plain) == "<|im_start|>user"
    g, _ = gemma3
    assert g.encode("<start_of_turn>", add_bos=False) == [105]
    assert 105 not in g.encode("<start_of_turn>", add_bos=False, parse_special=False)


def test_gemma_user_defined_tokens_always_match(gemma3):
    """Runs of newlines/spaces and some HTML tags are USER_DEFINED in Gemma3: like llama.cpp (and HF), they
    are split out of raw text before the SentencePiece merges, even with parse_special off."""
    g, _ = gemma3
    for parse_special in (True, False):
        ids = g.encode("a\n\n\nb    c<table>", add_bos=False, parse_special=parse_special)
        assert {109, 140, 168} <= set(ids)  # '\n\n\n', four spaces, '<table>'
        assert g.decode(ids) == "a\n\n\nb    c<table>"


def test_token_bytes(smollm2, gemma3):
    s, _ = smollm2
    assert s.token_bytes(s.encode(" the")[0]) == b" the"
    assert s.token_bytes(2) == b"<|im_end|>"
    g, _ = gemma3
    assert g.token_bytes(g.tokens.index("<0x41>")) == b"A"
    assert g.token_bytes(g.encode(" the", add_bos=False)[0]) == b" the"
    for bad in (-1, g.vocab_size):
        with pytest.raises(TokenizerError, match="outside the vocabulary"):
            g.token_bytes(bad)


def test_byte_fallback_and_split_characters(gemma3, smollm2):
    g, _ = gemma3
    # U+F0000 (private use plane) is not in Gemma's vocab: byte fallback, one <0xNN> token per UTF-8 byte.
    ids = g.encode("\U000f0000", add_bos=False)
    assert [g.tokens[i] for i in ids] == ["<0xF3>", "<0xB0>", "<0x80>", "<0x80>"]
    dec = g.stream_decoder()
    assert [dec.feed(i) for i in ids] == ["", "", "", "\U000f0000"]
    s, _ = smollm2
    ids = s.encode("\U0001f917")  # 4 UTF-8 bytes in byte-level BPE pieces
    dec = s.stream_decoder()
    chunks = [dec.feed(i) for i in ids] + [dec.flush()]
    assert "".join(chunks) == "\U0001f917" and all(c in ("", "\U0001f917") for c in chunks)


def test_encode_speed(model):
    tok, ref = model
    text = next(c["prompt"] for c in ref["cases"] if c["kind"] == "long")
    tok.encode(text)
    t0 = time.perf_counter()
    tok.encode(text)
    assert time.perf_counter() - t0 < 0.1  # a few ms in practice


# Characters every test vocabulary can represent. Excluded: '▁' (SentencePiece decodes a literal '▁' as a
# space) and what SmolLM2's byte-level vocab has no byte token for (control bytes 04 06 13 14 16 1D, lead
# bytes F1+ of planes 4-16): those are dropped, exactly as llama.cpp does (test_unrepresentable_bytes_dropped).
_ROUNDTRIP_CHARS = st.characters(
    max_codepoint=0x3FFFF, exclude_categories=("Cs",), exclude_characters="\u2581\x04\x06\x13\x14\x16\x1d"
)


def test_unrepresentable_bytes_dropped(smollm2):
    s, _ = smollm2
    assert s.decode(s.encode("a\x04b")) == "ab"
    assert s.decode(s.encode("\U00040000")) == "\ufffd" * 3  # the F1 lead byte has no token


def test_lone_surrogate_encodes_as_replacement_char(smollm2):
    s, _ = smollm2
    assert s.encode("a\ud800b") == s.encode("a\ufffdb")


def _stream(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    dec = tok.stream_decoder(skip_special=skip_special)
    return [dec.feed(i) for i in ids] + [dec.flush()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(_ROUNDTRIP_CHARS, max_size=60))
def test_streaming_text_roundtrip(model, text):
    tok, _ = model
    ids = tok.encode(text, add_bos=False, parse_special=False)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    for c in chunks:
        c.encode("utf-8")  # a complete, valid string: no lone surrogates
        assert "\ufffd" not in c or "\ufffd" in text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_streaming_arbitrary_ids(model, data):
    """Any id sequence (invalid UTF-8 included): the stream equals decode(), chunk boundaries never matter."""
    tok, _ = model
    byte_ids = [i for i, t in enumerate(tok.tokens[:600]) if len(tok.token_bytes(i)) == 1]
    ids = data.draw(st.lists(st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(byte_ids)), max_size=40))
    for skip in (False, True):
        assert "".join(_stream(tok, ids, skip)) == tok.decode(ids, skip_special=skip)


# ------------------------------------------------------------------ tiny synthetic vocabularies

_B2U = bytes_to_unicode()


def _bl(s: str) -> str:
    """A byte-level BPE token for text s."""
    return "".join(_B2U[b] for b in s.encode("utf-8"))


def tiny_gpt2(**overrides) -> dict:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [_B2U[b] for b in range(256)]
    merges = [("h", "i"), ("Ġ", "hi"), ("!", "!"), ("1", "2"), ("12", "3"), ("123", "4")]
    tokens += [a + b for a, b in merges]
    md = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 3, 3] + [1] * (len(tokens) - 3),
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
    }
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}


def tiny_spm(**overrides) -> dict:
    tokens = ["<unk>", "<s>", "</s>", "<start_of_turn>", "<end_of_turn>", "\n\n"]
    types = [2, 3, 3, 3, 3, 4]
    pieces = ["▁", "a", "b", "c", "▁a", "ab", "▁ab", "bc"]
    scores = [0.0] * 6 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0]
    tokens += pieces + [f"<0x{b:02X}>" for b in range(256)]
    types += [1] * len(pieces) + [6] * 256
    scores += [0.0] * 256
    md = {
        "general.architecture": "gemma3",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    md.update(overrides)
    return {k: v for k, v in md.items() if v is not None}


def test_tiny_gpt2_tokenizer():
    tok = Tokenizer.from_metadata(tiny_gpt2())
    hi, bangs = tok.tokens.index(_bl(" hi")), tok.tokens.index("!!")
    assert tok.encode(" hi!! hi") == [hi, bangs, hi]
    assert tok.encode("<|im_start|> hi!!<|im_end|>") == [1, hi, bangs, 2]
    assert tok.encode("1234") == [tok.tokens.index("1234")]
    assert tok.decode(tok.encode("héllo 🤗")) == "héllo 🤗"
    assert tok.encode(" hi", add_bos=True)[0] == 0
    assert tok.eog_ids == {0, 2}  # eos and <|endoftext|>, <|im_end|>
    assert tok.chat_template_source == "builtin:chatml"


def test_tiny_spm_tokenizer():
    md = tiny_spm()
    tok = Tokenizer.from_metadata(md)
    ids = {t: i for i, t in enumerate(md["tokenizer.ggml.tokens"])}
    # add_space_prefix defaults to true for SPM: '▁' is prepended to each text fragment.
    assert tok.encode("ab c") == [1, ids["▁ab"], ids["▁"], ids["c"]]
    assert tok.encode("abc", add_bos=False, parse_special=True) == [ids["▁ab"], ids["c"]]
    # Highest-scoring pair first: '▁a' (-5) beats 'ab' (-6), then '▁a'+'b' -> '▁ab'; 'bc' (-8) never forms.
    no_prefix = Tokenizer.from_metadata(tiny_spm(**{"tokenizer.ggml.add_space_prefix": False}))
    assert no_prefix.encode("bc", add_bos=False) == [ids["bc"]]
    assert no_prefix.encode("é", add_bos=False) == [ids["<0xC3>"], ids["<0xA9>"]]
    assert no_prefix.decode([ids["<0xC3>"], ids["<0xA9>"], ids["▁a"]]) == "é a"
    assert no_prefix.encode("a\n\nb", add_bos=False) == [ids["a"], ids["\n\n"], ids["b"]]
    assert tok.eog_ids == {2, 4}  # </s>, <end_of_turn>


def test_encode_chat_does_not_double_bos():
    tok = Tokenizer.from_metadata(tiny_spm(**{"tokenizer.ggml.add_space_prefix": False}))
    ids = tok.encode_chat([{"role": "user", "content": "ab"}])
    assert ids[:2] == [1, 3] and ids.count(1) == 1  # <s><start_of_turn>...


@pytest.mark.parametrize(
    "md, match",
    [
        (tiny_gpt2(**{"tokenizer.ggml.tokens": None}), "tokenizer.ggml.tokens: missing"),
        (tiny_gpt2(**{"tokenizer.ggml.tokens": []}), "tokenizer.ggml.tokens: missing or empty"),
        (tiny_gpt2(**{"tokenizer.ggml.tokens": "abc"}), "expected an array"),
        (tiny_gpt2(**{"tokenizer.ggml.tokens": ["a", 3]}), "entry 1 is 3"),
        (tiny_gpt2(**{"tokenizer.ggml.tokens": ["a", "b", "a"], "tokenizer.ggml.token_type": None}),
         "duplicate token 'a' \\(ids 0 and 2\\)"),
        (tiny_gpt2(**{"tokenizer.ggml.model": None}), "has no tokenizer"),
        (tiny_gpt2(**{"tokenizer.ggml.model": "bert"}), "'bert' .* not supported"),
        (tiny_gpt2(**{"tokenizer.ggml.pre": "nonesuch"}), "unknown pre-tokenizer type 'nonesuch'"),
        (tiny_gpt2(**{"tokenizer.ggml.merges": None}), "merges: missing"),
        (tiny_gpt2(**{"tokenizer.ggml.merges": ["hi"]}), "malformed BPE merge 'hi'"),
        (tiny_gpt2(**{"tokenizer.ggml.token_type": [1, 1]}), "token_type: has 2 entries"),
        (tiny_gpt2(**{"tokenizer.ggml.eos_token_id": 10**6}), "eos_token_id: 1000000 is not a token id"),
        (tiny_gpt2(**{"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.add_bos_token": True}),
         "bos_token_id: missing, but add_bos_token is true"),
        (tiny_gpt2(**{"tokenizer.ggml.add_bos_token": "yes"}), "expected true/false"),
        (tiny_spm(**{"tokenizer.ggml.scores": None}), "scores: missing"),
        (tiny_spm(**{"tokenizer.ggml.scores": [0.0]}), "scores: has 1 entries"),
    ],
)
def test_bad_metadata_raises_tokenizer_error(md, match):
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_metadata(md)


def test_missing_pre_means_llama_cpp_default():
    tok = Tokenizer.from_metadata(tiny_gpt2(**{"tokenizer.ggml.pre": None}))
    assert tok.pre is None
    # llama.cpp's 'default' cuts digit runs into threes (gpt2's regex keeps '1234' whole).
    assert tok.encode("1234") == [tok.tokens.index("123"), tok.tokens.index("4")]


# ------------------------------------------------------------------ llama.cpp's own test vectors
# Every causal-LM vocabulary llama.cpp ships with test vectors (bert-bge is an embedding model's WordPiece).
LLAMA_VOCABS = ["command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2", "llama-bpe",
                "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder"]


@pytest.fixture(scope="module")
def llama_vocab_dir():
    from llama_vocabs import vocab_dir
    return vocab_dir()


@pytest.mark.real_model
@pytest.mark.parametrize("name", LLAMA_VOCABS)
def test_llama_cpp_tokenizer_test_vectors(llama_vocab_dir, name):
    """kvgraph's tokenizer gives exactly llama.cpp's ids (test-tokenizer-0: no BOS, specials as text)."""
    from llama_vocabs import cases
    path = llama_vocab_dir / f"ggml-vocab-{name}.gguf"
    tok = Tokenizer.from_metadata(read_metadata(path))
    pairs = cases(path)
    assert len(pairs) >= 40
    for text, want in pairs:
        assert tok.encode(text, add_bos=False, parse_special=False) == want, text


@pytest.mark.real_model
def test_every_causal_vocabulary_with_vectors_is_listed(llama_vocab_dir):
    have = {p.name[len("ggml-vocab-"):-len(".gguf.inp")] for p in llama_vocab_dir.glob("ggml-vocab-*.gguf.inp")}
    assert have - {"bert-bge"} == set(LLAMA_VOCABS)


def test_merges_over_tokens_not_in_the_vocabulary_are_dropped_as_llama_cpp_never_applies_them():
    good = Tokenizer.from_metadata(tiny_gpt2())
    merges = ["h i", "zz q", "Ġ hi", "! !", "1 2", "12 3", "12 34", "123 4", "h !"]  # unknown sides / results
    tok = Tokenizer.from_metadata(tiny_gpt2(**{"tokenizer.ggml.merges": merges}))
    for text in ("hi hi!! 1234", "h! zzq"):
        assert tok.encode(text) == good.encode(text)


def test_a_model_loads_without_its_tokenizer_until_the_tokenizer_is_used(tmp_path):
    """A run on token ids (bench) never builds the tokenizer; a broken vocabulary fails at load by default,
    and at first use when the load deferred it."""
    from kvgraph.backends import get_backend
    from kvgraph.engine.context import Context
    from kvgraph.engine.loader import load_model
    from kvgraph.graph.inputs import UBatch
    from tiny_models import TinySpec, write_tiny_llama

    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, TinySpec(n_layer=1))
    loaded = load_model(path, get_backend("numpy"), tokenizer=False)
    assert loaded._tokenizer is None
    Context(loaded, n_ctx=16).decode(UBatch.single([5, 6, 7], 0))
    assert loaded._tokenizer is None
    assert loaded.tokenizer is loaded.tokenizer and loaded.tokenizer.decode(loaded.tokenizer.encode(" the")) == " the"

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(path.read_bytes().replace(b"smollm", b"nopre!", 1))     # an unknown pre-tokenizer
    with pytest.raises(TokenizerError, match="unknown pre-tokenizer type 'nopre!'"):
        load_model(bad, get_backend("numpy"))
    deferred = load_model(bad, get_backend("numpy"), tokenizer=False)
    with pytest.raises(TokenizerError, match="unknown pre-tokenizer"):
        deferred.load_tokenizer()
