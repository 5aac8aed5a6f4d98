"""Chat templates: render a GGUF's Jinja template (or a built-in fallback) safely, the way HF transformers does.

Templates come from model files, i.e. from strangers, so they run in jinja2's immutable sandbox
(`sandbox.py`, imported on the first render: a plain `generate` never loads jinja2); attribute access the
sandbox deems unsafe raises instead of quietly rendering as empty.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

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



def _turns(system: str, user: str, assistant: str, generation: str, trim: bool = False) -> str:
    """A template that writes each message as prefix + content + suffix by role (llama.cpp's built-in
    templates are of this form): system/user/assistant are '{prefix}\x00{suffix}' pairs."""
    content = "(m['content'] | trim)" if trim else "m['content']"
    parts = []
    for role, fmt in (("system", system), ("user", user), ("assistant", assistant)):
        pre, post = fmt.split("\x00")
        parts.append(f"{{%- {'if' if not parts else 'elif'} m['role'] == '{role}' -%}}"
                     f"{{{{- {pre!r} + {content} + {post!r} -}}}}")
    return ("{%- for m in messages -%}" + "".join(parts) + "{%- endif -%}{%- endfor -%}"
            f"{{%- if add_generation_prompt -%}}{{{{- {generation!r} -}}}}{{%- endif -%}}")


# llama.cpp's built-in templates by the names `--chat-template` takes there (src/llama-chat.cpp), written the
# same way; the rest of its names are refused with this list.
BUILTIN_TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "gemma": GEMMA_TEMPLATE,
    "llama3": _turns("<|start_header_id|>system<|end_header_id|>\n\n\x00<|eot_id|>",
                     "<|start_header_id|>user<|end_header_id|>\n\n\x00<|eot_id|>",
                     "<|start_header_id|>assistant<|end_header_id|>\n\n\x00<|eot_id|>",
                     "<|start_header_id|>assistant<|end_header_id|>\n\n", trim=True),
    "command-r": _turns("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>\x00<|END_OF_TURN_TOKEN|>",
                        "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>\x00<|END_OF_TURN_TOKEN|>",
                        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>\x00<|END_OF_TURN_TOKEN|>",
                        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", trim=True),
    "phi3": _turns("<|system|>\n\x00<|end|>\n", "<|user|>\n\x00<|end|>\n", "<|assistant|>\n\x00<|end|>\n",
                   "<|assistant|>\n"),
    "phi4": _turns("<|im_start|>system<|im_sep|>\x00<|im_end|>", "<|im_start|>user<|im_sep|>\x00<|im_end|>",
                   "<|im_start|>assistant<|im_sep|>\x00<|im_end|>", "<|im_start|>assistant<|im_sep|>"),
    "falcon3": _turns("<|system|>\n\x00\n", "<|user|>\n\x00\n", "<|assistant|>\n\x00\n", "<|assistant|>\n"),
    "zephyr": _turns("<|system|>\n\x00<|endoftext|>\n", "<|user|>\n\x00<|endoftext|>\n",
                     "<|assistant|>\n\x00<|endoftext|>\n", "<|assistant|>\n"),
    "mistral-v7": _turns("[SYSTEM_PROMPT] \x00[/SYSTEM_PROMPT]", "[INST] \x00[/INST]", " \x00</s>", ""),
    "mistral-v7-tekken": _turns("[SYSTEM_PROMPT]\x00[/SYSTEM_PROMPT]", "[INST]\x00[/INST]", "\x00</s>", ""),
    "deepseek3": _turns("\x00\n\n", "<｜User｜>\x00", "<｜Assistant｜>\x00<｜end▁of▁sentence｜>", "<｜Assistant｜>"),
}
LLAMA_CPP_TEMPLATE_NAMES = (
    "bailing", "bailing-think", "bailing2", "chatglm3", "chatglm4", "chatml", "command-r", "deepseek",
    "deepseek-ocr", "deepseek2", "deepseek3", "exaone-moe", "exaone3", "exaone4", "falcon3", "gemma", "gigachat",
    "glmedge", "gpt-oss", "granite", "granite-4.0", "granite-4.1", "grok-2", "hunyuan-dense", "hunyuan-moe",
    "hunyuan-vl", "kimi-k2", "llama2", "llama2-sys", "llama2-sys-bos", "llama2-sys-strip", "llama3", "llama4",
    "megrez", "minicpm", "mistral-v1", "mistral-v3", "mistral-v3-tekken", "mistral-v7", "mistral-v7-tekken",
    "monarch", "openchat", "orion", "pangu-embedded", "phi3", "phi4", "rwkv-world", "seed_oss", "smolvlm",
    "solar-open", "vicuna", "vicuna-orca", "yandex", "zephyr")
# general.architecture -> built-in template used when the GGUF carries none; anything else gets chatml
# (llama.cpp's fallback too).
ARCH_TEMPLATES = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma"}


def pick_template(gguf_template: Any, arch: str | None) -> tuple[str, str]:
    """(template, source): the GGUF's own template, else the architecture's built-in one."""
    if isinstance(gguf_template, str) and gguf_template.strip():
        return gguf_template, "gguf"
    name = ARCH_TEMPLATES.get(arch or "", "chatml")
    return BUILTIN_TEMPLATES[name], f"builtin:{name}"


@dataclass(frozen=True)
class TemplateLimits:
    """What one render may cost. A template is a program from a stranger: these bound its time and memory
    however it is written (nested loops, exponential string doubling, huge repeats or paddings)."""

    steps: int = 1_000_000     # loop iterations + calls + attribute/item look-ups + operators
    seconds: float = 5.0       # wall time, checked every 1024 steps and between output chunks
    chars: int = 4 << 20       # the longest string or list the template may build, and the rendered prompt


DEFAULT_LIMITS = TemplateLimits()


class TemplateLimitError(TokenizerError):
    """A chat template went over one of its TemplateLimits."""


TOOL_INSTRUCTIONS = (
    "You may call one or more functions to assist with the user query. The functions, as JSON signatures, "
    "are within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a JSON "
    "object with the function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    "{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


def with_tool_instructions(messages: list[dict], tools: list) -> list[dict]:
    """messages with the tools described in the system message, in the Hermes / Qwen format, for a
    template that does not render tools itself."""
    text = TOOL_INSTRUCTIONS.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
    if messages and messages[0].get("role") == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + text}] + list(messages[1:])
    return [{"role": "system", "content": text}] + list(messages)


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
            if not isinstance(m.get(key), str) and not (key == "content" and m.get("tool_calls")):
                raise TokenizerError(
                    f"chat message {i} needs a string {key!r} (got {type(m.get(key)).__name__}); "
                    "pass messages like {'role': 'user', 'content': 'Hello'}."
                )
    return list(messages)


# Reasoning blocks: (opening, closing) markers of the thinking templates in use.
THINK_TAGS = (("<think>", "</think>"), ("<|START_THINKING|>", "<|END_THINKING|>"), ("[THINK]", "[/THINK]"),
              ("<seed:think>", "</seed:think>"))


def open_thinking(prompt: str) -> tuple[str, str] | None:
    """The (opening, closing) markers when the prompt ends inside an opened reasoning block, i.e. the reply
    starts with the model's thoughts."""
    tail = prompt.rstrip()
    return next(((a, b) for a, b in THINK_TAGS if tail.endswith(a)), None)


def _close_thinking(prompt: str, extra: dict | None) -> str:
    """With thinking turned off, a template that opens a reasoning block anyway gets it closed (templates that
    read enable_thinking do this themselves)."""
    if extra and extra.get("enable_thinking") is False:
        tags = open_thinking(prompt)
        if tags:
            return prompt + tags[1]
    return prompt


class ChatTemplate:
    """A chat template compiled lazily, so a broken template only fails chat use, not model loading.
    Every render is bounded by TemplateLimits (steps, seconds, characters)."""

    def __init__(self, source: str, origin: str, bos_token: str, eos_token: str,
                 limits: TemplateLimits = DEFAULT_LIMITS):
        self.source = source
        self.origin = origin
        self.limits = limits
        self._vars = {"bos_token": bos_token, "eos_token": eos_token}
        self._compiled = None

    def _template(self):
        """The compiled jinja2 template."""
        if self._compiled is None:
            from .sandbox import BoundLoops, environment

            env = environment()
            ast = BoundLoops().visit(env.parse(self.source))
            ast.set_environment(env)
            self._compiled = env.from_string(ast)
        return self._compiled

    @property
    def knows_tools(self) -> bool:
        """Whether the template renders a `tools` list itself (else the caller describes the tools)."""
        return "tools" in self.source

    def render(self, messages: Any, add_generation_prompt: bool = True, max_chars: int | None = None,
               tools: list | None = None, extra: dict | None = None, continue_final: bool = False) -> str:
        """The prompt text. max_chars: a tighter cap on its length than limits.chars (the caller knows
        how much text could possibly fit its context). extra: more template variables (chat_template_kwargs
        such as enable_thinking). continue_final: the last message is the start of the assistant's reply
        (a prefill): the rest is rendered with the generation prompt and the reply continues from its text."""
        messages = validate_messages(messages)
        if continue_final:
            if messages[-1]["role"] != "assistant":
                raise TokenizerError("continuing the final message needs an assistant message last.")
            head = self.render(messages[:-1], True, max_chars, tools, extra)
            return _close_thinking(head, extra) + messages[-1]["content"]
        return _close_thinking(self._render(messages, add_generation_prompt, max_chars, tools, extra), extra)

    def _render(self, messages: list[dict], add_generation_prompt: bool, max_chars: int | None,
                tools: list | None, extra: dict | None) -> str:
        cap = self.limits.chars if max_chars is None else min(max_chars, self.limits.chars)
        from .sandbox import BUDGET, Budget

        budget = Budget(self.limits, cap)
        token = BUDGET.set(budget)
        try:
            # tools/documents passed as None like transformers does, so `is not none` checks behave the same.
            chunks, n = [], 0
            now = datetime.now()     # llama.cpp's extra context: templates that print today's date read these
            variables = {"datetime": now.strftime("%b %d %Y"), "date_string": now.strftime("%d %b %Y")} | (
                extra or {}) | self._vars
            for chunk in self._template().generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                   tools=tools, documents=None, **variables):
                n += len(chunk)
                if n > cap:
                    raise TemplateLimitError(f"the rendered prompt is over {cap:,} characters, more than the "
                                             "context can hold; it was stopped.")
                budget.clock()
                chunks.append(chunk)
            return "".join(chunks)
        except TemplateLimitError as e:
            raise TemplateLimitError(f"chat template ({self.origin}): {e}") from None
        except Exception as e:  # anything a template raises is a template problem, not a kvgraph bug
            raise TokenizerError(
                f"chat template ({self.origin}) failed to render: {type(e).__name__}: {str(e)[:300].rstrip('.')}. "
                "Check the messages (roles/order the model expects) or use a model with a working chat template."
            ) from None
        finally:
            BUDGET.reset(token)
