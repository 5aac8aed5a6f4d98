"""Chat templates: the GGUF's own template and the built-in fallbacks render like the HF references; the
sandbox stops templates reaching Python internals; bad messages and broken templates give TokenizerError."""
from __future__ import annotations

import pytest

from conftest import load_reference
from kvgraph.errors import TokenizerError
from kvgraph.gguf.reader import read_metadata
from kvgraph.tokenizer import Tokenizer


def tiny(arch: str = "gemma3", template: str | None = None) -> Tokenizer:
    """A small SentencePiece vocabulary with Gemma's special tokens (<bos> = 2, <eos> = 1)."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"]
    types = [3] * len(tokens)
    tokens += ["▁", "a"] + [f"<0x{b:02X}>" for b in range(256)]
    types += [1, 1] + [6] * 256
    md = {
        "general.architecture": arch,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": [0.0] * len(tokens),
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_space_prefix": False,
    }
    if template is not None:
        md["tokenizer.chat_template"] = template
    return Tokenizer.from_metadata(md)


USER = [{"role": "user", "content": "Hi"}]


def test_smollm2_gguf_template_matches_reference(smollm2_path):
    tok = Tokenizer.from_metadata(read_metadata(smollm2_path))
    assert tok.chat_template_source == "gguf" and "<|im_start|>" in tok.chat_template
    for case in load_reference("smollm2_public.json")["cases"]:
        if case["kind"] == "chat":
            assert tok.apply_chat_template(case["prompt"]) == case["rendered"]
    # Its template adds a default system turn unless one is given.
    out = tok.apply_chat_template([{"role": "system", "content": "S"}] + USER, add_generation_prompt=False)
    assert out == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_gemma_builtin_matches_reference():
    tok = tiny("gemma3")
    assert tok.chat_template_source == "builtin:gemma"
    for case in load_reference("gemma3_public.json")["cases"]:
        if case["kind"] == "chat":
            assert tok.apply_chat_template(case["prompt"]) == case["rendered"]


def test_gemma_builtin_roles_and_system():
    tok = tiny("gemma3")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! "},
        {"role": "user", "content": "Bye"},
    ]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
    )
    ids = tok.encode_chat(USER)
    assert ids[:2] == [2, 4] and ids.count(2) == 1  # one BOS: the rendered '<bos>' is not doubled


def test_chatml_fallback_for_other_architectures():
    tok = tiny("qwen2")
    assert tok.chat_template_source == "builtin:chatml"
    assert tok.apply_chat_template(USER) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(USER, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"


def test_gguf_template_variables_and_hf_settings():
    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "    {% if m.role == 'user' %}\n[{{ m.content | tojson }}]{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}"
    )
    tok = tiny("llama", template)
    assert tok.chat_template_source == "gguf" and tok.chat_template == template
    # trim_blocks + lstrip_blocks: block tags eat their line's indentation and the newline after them.
    assert tok.apply_chat_template([{"role": "user", "content": 'é"'}]) == '<bos>["é\\""]<eos>'


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__init__.__globals__ }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{{ raise_exception._fn.__globals__ }}",
        "{{ strftime_now.__call__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{% set x = messages.append({'role': 'x'}) %}",
    ],
)
def test_sandbox_blocks_escapes(template):
    tok = tiny("llama", template)
    # SecurityError, or UndefinedError where the exposed object has no such attribute at all (SafeFunction)
    with pytest.raises(TokenizerError, match="chat template .* failed to render: (SecurityError|UndefinedError)"):
        tok.apply_chat_template(USER)


def test_template_errors_are_tokenizer_errors():
    with pytest.raises(TokenizerError, match="roles must alternate"):
        tiny("llama", "{{ raise_exception('roles must alternate') }}").apply_chat_template(USER)
    broken = tiny("llama", "{% for m in messages %}")  # syntax error: found when rendering, not at load
    with pytest.raises(TokenizerError, match="TemplateSyntaxError"):
        broken.apply_chat_template(USER)
    with pytest.raises(TokenizerError, match="UndefinedError"):
        tiny("llama", "{{ nothing.here }}").apply_chat_template(USER)


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "non-empty list"),
        ([], "non-empty list"),
        (["hello"], "message 0 must be a dict"),
        ([{"content": "x"}], "message 0 needs a string 'role'"),
        ([{"role": "user", "content": None}], "message 0 needs a string 'content'"),
        (USER + [{"role": "user", "content": 3}], "message 1 needs a string 'content'"),
    ],
)
def test_bad_messages(messages, match):
    tok = tiny("gemma3")
    with pytest.raises(TokenizerError, match=match):
        tok.apply_chat_template(messages)
    with pytest.raises(TokenizerError, match=match):
        tok.encode_chat(messages)
