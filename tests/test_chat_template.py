"""Chat templates: the GGUF's own template and the built-in fallbacks render like the HF references; the
sandbox stops templates reaching Python internals; bad messages and broken templates give TokenizerError."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---- hostile templates: bounded work, bounded size, no object reprs --------------------------------------------
USERS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


@pytest.mark.parametrize("template,needle", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    ("{% for a in messages * 2000 %}{% for b in messages * 2000 %}{% endfor %}{% endfor %}", "steps"),
    ("{% macro f(n) %}{% for i in range(n) %}{{ f(n) }}{% endfor %}{% endmacro %}{{ f(100) }}", "steps|Recursion"),
    ("{{ lipsum(10**6) }}", "'lipsum' is undefined"),
    ("{{ 'x' * 10**8 }}", "100,000,000"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "over the"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "over the"),
    ("{{ 'x'|center(10**9) }}", "passed 1000000000 to 'center'"),
    ("{{ 'x'.ljust(10**9) }}", "passed 1000000000 to 'ljust'"),
    ("{{ messages|tojson(indent=10**9) }}", "to 'tojson'"),
    ("{{ 10**(10**8) }}", "power"),
    ("{{ '%0999999999d' % 1 }}", "width or precision"),
    ("{{ '{:>999999999}'.format(1) }}", "width or precision"),
    ("{{ '{0:{1}}'.format(1, '99999999') }}", "width or precision"),
    ("{{ ('x' * 1000000)|replace('', 'yyyyyyy') }}", "over the"),
    ("{{ ('x' * 4000000) ~ ('x' * 4000000) }}", "over the"),
])
def test_hostile_templates_stop_with_a_clear_error(template, needle):
    import re
    from kvgraph.tokenizer.chat import ChatTemplate
    with pytest.raises(TokenizerError, match=needle if "|" in needle else re.escape(needle)):
        ChatTemplate(template, "gguf", "<s>", "</s>").render(USERS)


def test_the_rendered_prompt_is_capped_by_what_the_context_can_hold():
    tok = tiny("llama", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert tok.encode_chat([{"role": "user", "content": "a" * 100}], max_tokens=1000)
    with pytest.raises(TokenizerError, match="over"):
        tok.encode_chat([{"role": "user", "content": "a" * 100_000}], max_tokens=10)


@pytest.mark.parametrize("template,expected", [
    ("{{ strftime_now }}|{{ raise_exception }}|{{ range }}", "<function strftime_now>|<function raise_exception>|"
                                                            "<function range>"),
    ("{{ 'x'.upper }}|{{ messages[0].items }}|{{ messages[0].get|string }}", "<function upper>|<function items>|"
                                                                            "<function get>"),
    ("{{ cycler(1, 2) }}|{{ joiner() }}|{{ namespace(a=1) }}", "<cycler>|<_Joiner>|<Namespace {'a': 1}>"),
    ("{{ messages|map(attribute='role') }}|{{ messages|selectattr('role') }}", "['user', 'assistant']|"
                                                                            "[{'role': 'user', 'content': 'hi'}, "
                                                                            "{'role': 'assistant', 'content': 'yo'}]"),
])
def test_templates_print_names_not_object_addresses(template, expected):
    from kvgraph.tokenizer.chat import ChatTemplate
    assert ChatTemplate(template, "gguf", "", "").render(USERS) == expected


# A grammar of template pieces, biased toward the costly ones: loops over ranges and repeated lists, string
# products and doublings, padding filters and methods, recursion; sizes from tiny to absurd.
NUMBERS = st.sampled_from([0, 1, 3, 50, 1000, 10 ** 5, 10 ** 7, 10 ** 9, 2 ** 40, -1, -10 ** 6])
ATOMS = st.sampled_from(["'x'", "'ab%s'", "messages", "messages[0]['content']", "m", "i", "ns.s", "'{0:>5}'"])


@st.composite
def expressions(draw, depth=0):
    a, n = draw(ATOMS), draw(NUMBERS)
    forms = [a, f"{a} * {n}", f"{a} ~ {a}", f"{a} + {a}", f"range({n})", f"{n} ** {draw(NUMBERS)}",
             f"{a}|center({n})", f"{a}|indent({n})", f"{a}|join({a})", f"{a}|list", f"{a}|length",
             f"{a}|replace('', {a})", f"{a}.ljust({n})", f"{a}.format({n})", f"{a} % {n}", f"{a}|tojson",
             f"{a}|wordwrap({n})", f"{a}|batch({n})|list", f"{a}|format({a})", "strftime_now('%Y')", f"{a}|string"]
    expr = draw(st.sampled_from(forms))
    return f"({expr}) ~ ({draw(expressions(depth + 1))})" if depth < 2 and draw(st.booleans()) else expr


@st.composite
def templates(draw, depth=0):
    parts = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 5 if depth < 3 else 1))
        if kind <= 1:
            parts.append("{{ " + draw(expressions()) + " }}")
        elif kind == 2:
            parts.append("{% set ns.s = " + draw(expressions()) + " %}")
        elif kind == 3:
            it = draw(st.sampled_from([f"range({draw(NUMBERS)})", "messages", f"messages * {draw(NUMBERS)}",
                                       "ns.s", draw(expressions())]))
            parts.append("{% for i in " + it + " %}" + draw(templates(depth + 1)) + "{% endfor %}")
        elif kind == 4:
            parts.append("{% for m in messages %}{{ m['role'] }}" + draw(templates(depth + 1)) + "{% endfor %}")
        else:
            parts.append("{% macro f(k) %}" + draw(templates(depth + 1)) + "{{ f(k) if k else '' }}{% endmacro %}"
                         "{{ f(" + str(draw(NUMBERS)) + ") }}")
    body = "".join(parts)
    return "{% set ns = namespace(s='x') %}" + body if depth == 0 else body


@settings(max_examples=300, deadline=None)
@given(template=templates())
def test_fuzzed_templates_render_within_their_limits_or_fail_cleanly(template):
    """Any template ends, within its limits, as a string no longer than the cap or as a TokenizerError; never
    another exception, a hang, or an object address in the output. Small step and size limits keep each case
    short; the seconds limit is set high so the outcome never depends on the machine's speed."""
    import re
    import threading
    from kvgraph.tokenizer.chat import ChatTemplate, TemplateLimits
    limits = TemplateLimits(steps=20_000, seconds=600.0, chars=50_000)
    outcome = {}

    def render():
        try:
            outcome["text"] = ChatTemplate(template, "fuzz", "<s>", "</s>", limits).render(USERS)
        except TokenizerError as e:
            outcome["error"] = e
        except BaseException as e:      # noqa: BLE001 (anything else is the failure this test looks for)
            outcome["other"] = e
    t = threading.Thread(target=render, daemon=True)
    t.start()
    t.join(300)                          # a hang guard, not a speed check: each case takes milliseconds
    assert not t.is_alive(), f"render did not end: {template!r}"
    assert "other" not in outcome, (template, repr(outcome.get("other")))
    if "text" in outcome:
        assert len(outcome["text"]) <= limits.chars
        assert not re.search(r"0x[0-9a-f]{6,}", outcome["text"]), (template, outcome["text"][:200])
