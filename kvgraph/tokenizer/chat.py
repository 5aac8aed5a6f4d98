"""Chat templates: render a GGUF's Jinja template (or a built-in fallback) safely, the way HF transformers does.

Templates come from model files, i.e. from strangers, so they run in jinja2's immutable sandbox; attribute
access the sandbox deems unsafe raises instead of quietly rendering as empty.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import TokenizerError

# Gemma has no system role: the system text is prepended to the first user turn; 'assistant' is 'model'.
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if loop.first and system -%}{{- system + '\\n\\n' -}}{%- endif -%}"
    "{{- (m['content'] | trim) + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

BUILTIN_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "chatml": CHATML_TEMPLATE}
# general.architecture -> built-in template used when the GGUF carries none; anything else gets chatml
# (llama.cpp's fallback too).
ARCH_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}


def pick_template(gguf_template: Any, arch: str | None) -> tuple[str, str]:
    """(template, source): the GGUF's own template, else the architecture's built-in one."""
    if isinstance(gguf_template, str) and gguf_template.strip():
        return gguf_template, "gguf"
    name = ARCH_TEMPLATES.get(arch or "", "chatml")
    return BUILTIN_TEMPLATES[name], f"builtin:{name}"


class _StrictSandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # The stock sandbox returns an Undefined that prints as ''; a template probing internals is hostile
        # or broken either way, so fail loudly.
        raise jinja2.sandbox.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} is unsafe")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    # Same settings as transformers' chat template renderer, so templates written for HF render identically.
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        got = "an empty list" if isinstance(messages, (list, tuple)) else type(messages).__name__
        raise TokenizerError(
            f"chat messages must be a non-empty list of {{'role': str, 'content': str}} dicts, got {got}."
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TokenizerError(f"chat message {i} must be a dict with 'role' and 'content', got {type(m).__name__}.")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise TokenizerError(
                    f"chat message {i} needs a string {key!r} (got {type(m.get(key)).__name__}); "
                    "pass messages like {'role': 'user', 'content': 'Hello'}."
                )
    return list(messages)


class ChatTemplate:
    """A chat template compiled lazily, so a broken template only fails chat use, not model loading."""

    def __init__(self, source: str, origin: str, bos_token: str, eos_token: str):
        self.source = source
        self.origin = origin
        self._vars = {"bos_token": bos_token, "eos_token": eos_token}
        self._compiled: jinja2.Template | None = None

    def render(self, messages: Any, add_generation_prompt: bool = True) -> str:
        messages = validate_messages(messages)
        try:
            if self._compiled is None:
                self._compiled = _environment().from_string(self.source)
            # tools/documents passed as None like transformers does, so `is not none` checks behave the same.
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **self._vars
            )
        except Exception as e:  # anything a template raises is a template problem, not a kvgraph bug
            raise TokenizerError(
                f"chat template ({self.origin}) failed to render: {type(e).__name__}: {str(e).rstrip('.')}. "
                "Check the messages (roles/order the model expects) or use a model with a working chat template."
            ) from e
