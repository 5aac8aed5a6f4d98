"""OpenAI-shaped requests and responses, shared by the Python API (`LLM.create_completion`, ...) and the
HTTP server. Parsing validates every field and raises InvalidArgumentError naming the field, which the
server turns into a 400 with an OpenAI-style error body."""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

from .engine.sampling import LOGIT_BIAS_MAX, REPEAT_PENALTY_RANGE, SamplingParams
from .errors import InvalidArgumentError, short_repr
from .tokenizer.chat import THINK_TAGS, open_thinking

MAX_STOP = 4
MAX_CHOICES = 128
MAX_LOGPROBS = 20          # alternatives per token (OpenAI allows 20 in chat, 5 in completions)
SYSTEM_FINGERPRINT = "kvgraph"
DEFAULT_MAX_BODY = 8 << 20   # bytes: the server's default request body limit (--max-body)


@dataclass
class GenParams:
    max_tokens: int | None       # None: as many as the context allows
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    ignore_eos: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    logprobs: int | None = None  # None: off; k: each token's logprob and its k most probable alternatives
    echo: bool = False           # completions: the prompt back, with its tokens' logprobs
    n: int = 1                   # choices, sharing one prefill of the prompt
    grammar: str | None = None   # structured output: the compiled grammar every choice must follow
    tools: list | None = None    # chat: the tools offered to the model (None: none, or tool_choice "none")
    constraint: Any = None       # ... and the maker of its per-sequence state (set by the server)
    cache_prompt: bool = True    # may start from an idle slot's cells sharing a prefix (llama.cpp's cache_prompt)
    reasoning: "ReasoningFormat | None" = None   # chat: how thoughts are split from the reply (None: not at all)
    progress: bool = False       # streams: llama-server's prompt_progress chunks (return_progress)


# Request fields that change what a client gets back and that kvgraph does not do yet: a 400 naming the field
# (never a silent ignore: a client asking for JSON must not get prose), unless the value asks for nothing.
UNSUPPORTED_FIELDS = {
    "functions": (None, []), "function_call": (None, "none"),
    "suffix": (None, ""), "best_of": (None, 1), "prediction": (None,), "audio": (None,),
    "modalities": (None, ["text"]),
}


def refuse_unsupported(body: Mapping[str, Any]) -> None:
    for key, harmless in UNSUPPORTED_FIELDS.items():
        if key in body and not any(body[key] == h and type(body[key]) is type(h) for h in harmless):
            raise InvalidArgumentError(f"'{key}' is not supported by this server yet; remove it from the request.")


def _num(body: Mapping[str, Any], key: str, default, kind=float, lo=None, hi=None):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float) and not value.is_integer()):
        raise InvalidArgumentError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, "
                                   f"got {short_repr(value)}.")
    # Compare before converting: int(1e300) and float(10**400) are fine, the conversion of the other way is not.
    if (isinstance(value, float) and not math.isfinite(value)) or (lo is not None and value < lo) or (
            hi is not None and value > hi):
        raise InvalidArgumentError(f"'{key}' must be between {lo} and {hi}, got {short_repr(value)}.")
    return kind(value)


def flag(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"'{key}' must be true or false, got {short_repr(value)}.")
    return value


def parse_logit_bias(value: Any) -> dict[int, float] | None:
    """OpenAI's logit_bias, {"token id as a string": bias}, as {id: bias}; the ids are checked against the
    vocabulary with the other sampling parameters (SamplingParams.validate)."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidArgumentError("'logit_bias' must be an object mapping token ids to numbers.")
    out = {}
    for key, bias in value.items():
        key_s = str(key)
        if not (key_s.isascii() and key_s.isdigit() and len(key_s) <= 12):
            raise InvalidArgumentError(f"'logit_bias' keys must be token ids, got {short_repr(key)}.")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not \
                -LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX:
            raise InvalidArgumentError(f"'logit_bias' values must be numbers in [-{LOGIT_BIAS_MAX:g}, "
                                       f"{LOGIT_BIAS_MAX:g}], got {short_repr(bias)}.")
        out[int(key_s)] = float(bias)
    return out


def parse_params(body: Mapping[str, Any], chat: bool, n_vocab: int | None = None) -> GenParams:
    if not isinstance(body, Mapping):
        raise InvalidArgumentError("the request body must be a JSON object.")
    n = _num(body, "n", 1, int, 1, MAX_CHOICES)      # the scheduler also bounds it by its slots
    refuse_unsupported(body)
    for key in ("frequency_penalty", "presence_penalty"):
        if _num(body, key, 0.0, float, -2.0, 2.0) != 0.0:
            raise InvalidArgumentError(f"'{key}' is not supported; use 'repeat_penalty'.")
    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _num(body, max_key, None if chat else 16, int, 0, 1 << 20)
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise InvalidArgumentError("'stop' must be a string or a list of strings.")
    if len(stop) > MAX_STOP:
        raise InvalidArgumentError(f"'stop' takes at most {MAX_STOP} strings.")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidArgumentError(f"'seed' must be an integer, got {short_repr(seed)}.")
    stream = flag(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, Mapping):
        raise InvalidArgumentError("'stream_options' must be an object.")
    include_usage = flag(options or {}, "include_usage", False)
    sampling = SamplingParams(
        temperature=_num(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_num(body, "top_p", 1.0, float, 0.0, 1.0) or 1.0,
        top_k=_num(body, "top_k", 0, int, 0, 1 << 30),
        min_p=_num(body, "min_p", 0.0, float, 0.0, 1.0),
        repeat_penalty=_num(body, "repeat_penalty", 1.0, float, *REPEAT_PENALTY_RANGE),
        repeat_last_n=_num(body, "repeat_last_n", 64, int, 0, 1 << 20),
        seed=seed, logit_bias=parse_logit_bias(body.get("logit_bias"))).validate(n_vocab)
    if chat:     # logprobs: true, top_logprobs: k
        logprobs = _num(body, "top_logprobs", 0, int, 0, MAX_LOGPROBS) if flag(body, "logprobs", False) else None
        if body.get("top_logprobs") not in (None, 0) and logprobs is None:
            raise InvalidArgumentError("'top_logprobs' needs 'logprobs': true.")
        echo = False
    else:        # logprobs: k (the legacy completions field), echo
        logprobs = _num(body, "logprobs", None, int, 0, MAX_LOGPROBS)
        echo = flag(body, "echo", False)
    grammar = parse_grammar(body)
    if not chat and body.get("tools") not in (None, []):
        raise InvalidArgumentError("'tools' works with chat completions (/v1/chat/completions) only.")
    tools, tool_grammar = parse_tools(body) if chat else (None, None)
    if grammar is not None and tool_grammar is not None:
        raise InvalidArgumentError("give response_format / grammar or a forced tool_choice, not both.")
    return GenParams(max_tokens, sampling, stop, stream, flag(body, "ignore_eos", False), include_usage, logprobs,
                     echo, n, grammar or tool_grammar, tools, cache_prompt=flag(body, "cache_prompt", True),
                     progress=stream and chat and flag(body, "return_progress", False))


def parse_grammar(body: Mapping[str, Any]) -> str | None:
    """The grammar a request asks for: OpenAI's response_format (json_object, json_schema) or llama.cpp's
    grammar (GBNF) / json_schema fields; a 400 when it does not compile or several are given."""
    from .engine.constraints import compile_grammar

    asked = []
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, Mapping) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise InvalidArgumentError("'response_format' must be {\"type\": \"text\" | \"json_object\" | "
                                       "\"json_schema\", ...}.")
        if fmt["type"] == "json_object":       # llama-server also takes a schema here
            schema = fmt.get("schema")
            if schema is not None and not isinstance(schema, Mapping):
                raise InvalidArgumentError("'response_format.schema' must be a JSON schema object.")
            asked.append(("json_schema", schema) if schema is not None else ("json_object", None))
        elif fmt["type"] == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
                raise InvalidArgumentError("'response_format.json_schema' must be {\"name\": ..., \"schema\": {...}}.")
            asked.append(("json_schema", spec.get("schema", {})))
    if body.get("json_schema") is not None:
        if not isinstance(body["json_schema"], Mapping):
            raise InvalidArgumentError("'json_schema' must be a JSON schema object.")
        asked.append(("json_schema", body["json_schema"]))
    if body.get("grammar") not in (None, ""):
        if not isinstance(body["grammar"], str):
            raise InvalidArgumentError("'grammar' must be a GBNF grammar string.")
        asked.append(("gbnf", body["grammar"]))
    if len(asked) > 1:
        raise InvalidArgumentError("give one of response_format, json_schema and grammar.")
    return compile_grammar(*asked[0]) if asked else None


MAX_PROMPTS = 64          # prompts one completions request may batch


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _one_prompt(p: Any) -> str | list | None:
    """A prompt as a string, token ids, or llama-server's forms: ids and strings mixed in one list, or
    {"prompt_string": ...}; None if it is none of these."""
    if isinstance(p, Mapping) and isinstance(p.get("prompt_string"), str):
        if p.get("multimodal_data") is not None:
            raise InvalidArgumentError("multimodal prompts are not supported (this server runs text models).")
        return p["prompt_string"]
    if isinstance(p, str) or _is_ids(p):
        return p
    if isinstance(p, list) and p and all(isinstance(x, str) or (isinstance(x, int) and not isinstance(x, bool))
                                         for x in p) and any(isinstance(x, int) for x in p):
        return list(p)          # mixed: each string piece is tokenized in place
    return None


def parse_prompts(body: Mapping[str, Any]) -> list[str | list]:
    """The completions prompt: one prompt (see _one_prompt), or a batch of them, each answered with its own
    choices."""
    prompt = body.get("prompt")
    one = _one_prompt(prompt)
    if one is not None:
        return [one]
    if isinstance(prompt, list) and prompt:
        batch = [_one_prompt(p) for p in prompt]
        if all(p is not None for p in batch):
            if len(batch) > MAX_PROMPTS:
                raise InvalidArgumentError(f"'prompt' batches at most {MAX_PROMPTS} prompts, got {len(batch)}.")
            return batch
    raise InvalidArgumentError("'prompt' must be a string, a list of token ids, or a list of either.")


def parse_prompt(body: Mapping[str, Any]) -> str | list[int]:
    prompts = parse_prompts(body)
    if len(prompts) != 1:
        raise InvalidArgumentError("'prompt' takes one prompt here (a string or a list of token ids).")
    return prompts[0]


def parse_messages(body: Mapping[str, Any]) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("'messages' must be a non-empty list of {role, content} objects.")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise InvalidArgumentError(f"messages[{i}] must be an object with a string 'role'.")
        content = m.get("content")
        if isinstance(content, list):   # OpenAI content parts: text ones, one per line (as llama.cpp, vLLM)
            if not all(isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise InvalidArgumentError(f"messages[{i}].content: only text parts are supported.")
            content = "\n".join(p["text"] for p in content)
        calls = m.get("tool_calls")
        if content is None and calls:        # an assistant turn that only called tools
            content = ""
        if not isinstance(content, str):
            raise InvalidArgumentError(f"messages[{i}].content must be a string.")
        msg = {"role": m["role"], "content": content}
        if calls is not None:
            msg["tool_calls"] = _tool_calls_for_template(calls, i)
        for key in ("tool_call_id", "name"):
            if isinstance(m.get(key), str):
                msg[key] = m[key]
        out.append(msg)
    return out


def parse_chat_options(body: Mapping[str, Any], messages: list[dict], template_kwargs: Mapping[str, Any],
                       prefill_assistant: bool = True) -> dict:
    """How the chat template renders this request: add_generation_prompt, the template's extra variables
    (the server's --chat-template-kwargs and --reasoning, then the request's chat_template_kwargs) and
    continue_final (vLLM's continue_final_message, or llama-server's prefill: an assistant message last is the
    start of the reply)."""
    add = flag(body, "add_generation_prompt", True)
    cont = flag(body, "continue_final_message", False)
    if cont and body.get("add_generation_prompt") is True:
        raise InvalidArgumentError("give add_generation_prompt or continue_final_message, not both: continuing "
                                   "the final message leaves no place for a new generation prompt.")
    last_two = [m["role"] for m in messages[-2:]]
    if cont or (prefill_assistant and add and last_two[-1:] == ["assistant"]):
        if last_two[-1:] != ["assistant"]:
            raise InvalidArgumentError("continue_final_message needs an assistant message last.")
        if last_two == ["assistant", "assistant"]:
            raise InvalidArgumentError("two assistant messages end the conversation; only the last one can be "
                                       "continued.")
        cont = True
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise InvalidArgumentError("'chat_template_kwargs' must be an object.")
    extra = dict(template_kwargs) | dict(kwargs or {})
    for key in ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token"):
        if key in extra:
            raise InvalidArgumentError(f"'chat_template_kwargs' cannot set {key!r}.")
    return {"add_generation_prompt": add and not cont, "extra": extra, "continue_final": cont}


@dataclass(frozen=True)
class ReasoningFormat:
    """--reasoning-format for one reply: 'deepseek' (thoughts in reasoning_content, the rest in content) or
    'deepseek-legacy' (also left in content); opened: the markers when the prompt already opened the block."""
    keep_in_content: bool = False
    opened: tuple[str, str] | None = None

    @staticmethod
    def of(setting: str, prompt_tail: str) -> "ReasoningFormat | None":
        if setting == "none":
            return None
        return ReasoningFormat(setting == "deepseek-legacy", open_thinking(prompt_tail))


class ReasoningSplitter:
    """Splits a reply, as it streams, into thoughts (a leading <think>...</think> block, or everything up to the
    closing marker when the prompt opened the block) and content. A marker split across chunks is held back
    until it is whole, so no delta ever carries part of one."""

    def __init__(self, fmt: ReasoningFormat):
        self.fmt = fmt
        self.tags = fmt.opened
        self.state = "thinking" if fmt.opened else "start"
        self.held = ""

    def feed(self, text: str) -> list[tuple[str, str]]:
        """[(kind, text)] with kind 'reasoning_content' or 'content'."""
        return [(k, t) for k, t in self._feed(text) if t]

    def _feed(self, text: str) -> list[tuple[str, str]]:
        out, buf, self.held = [], self.held + text, ""
        while buf:
            if self.state == "start":
                lead = buf.lstrip()
                tags = next((t for t in THINK_TAGS if lead.startswith(t[0])), None)
                if tags:
                    self.tags, self.state, buf = tags, "thinking", lead[len(tags[0]):]
                    continue
                if not lead or any(t[0].startswith(lead) for t in THINK_TAGS):
                    self.held = buf          # whitespace or a marker still arriving
                    return out
                self.state = "content"
            elif self.state == "thinking":
                end = self.tags[1]
                at = buf.find(end)
                if at >= 0:
                    out.append(("reasoning_content", buf[:at]))
                    self.state, buf = "after", buf[at + len(end):]
                    continue
                keep = next((k for k in range(min(len(end) - 1, len(buf)), 0, -1) if end.startswith(buf[-k:])), 0)
                out.append(("reasoning_content", buf[:len(buf) - keep]))
                self.held = buf[len(buf) - keep:]
                return out
            elif self.state == "after":          # the newlines between the block and the reply
                buf = buf.lstrip()
                if not buf:
                    return out
                self.state = "content"
            else:
                out.append(("content", buf))
                return out
        return out

    def finish(self) -> list[tuple[str, str]]:
        held, self.held = self.held, ""
        if not held:
            return []
        return [("reasoning_content" if self.state == "thinking" else "content", held.strip() if
                 self.state == "start" else held)]

    def split(self, text: str) -> tuple[str | None, str]:
        """(reasoning_content or None, content) of a whole reply."""
        parts = self.feed(text) + self.finish()
        thoughts = "".join(t for k, t in parts if k == "reasoning_content")
        content = "".join(t for k, t in parts if k == "content")
        if self.tags is None:                   # no reasoning block: the reply as it is
            return None, text
        return thoughts.strip() or None, text if self.fmt.keep_in_content else content


def _tool_calls_for_template(calls: Any, i: int) -> list[dict]:
    """An assistant message's tool_calls as chat templates read them (arguments as an object)."""
    if not isinstance(calls, list):
        raise InvalidArgumentError(f"messages[{i}].tool_calls must be a list.")
    out = []
    for call in calls:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise InvalidArgumentError(f"messages[{i}].tool_calls: each needs function.name.")
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise InvalidArgumentError(f"messages[{i}].tool_calls: arguments of {fn['name']!r} are not JSON.") \
                from None
        out.append({"id": call.get("id", ""), "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return out


# ---- tools (function calling) ---------------------------------------------------------------------------------
TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def parse_tools(body: Mapping[str, Any]) -> tuple[list[dict] | None, str | None]:
    """(tools for the chat template, or None; the grammar forcing a call, or None) from tools and
    tool_choice: "none" hides the tools, "auto" lets the model choose, "required" or a named function makes
    it call one, its arguments following the function's JSON schema."""
    tools, choice = body.get("tools"), body.get("tool_choice", "auto")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise InvalidArgumentError("'tool_choice' needs 'tools'.")
        return None, None
    if not isinstance(tools, list) or not all(
            isinstance(t, Mapping) and t.get("type") == "function" and isinstance(t.get("function"), Mapping)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise InvalidArgumentError("'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\": ...}}.")
    functions = {t["function"]["name"]: t["function"] for t in tools}
    if choice == "none":
        return None, None
    if choice == "auto":
        return list(tools), None
    if choice == "required":
        forced = list(functions)
    elif isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping) and \
            choice["function"].get("name") in functions:
        forced = [choice["function"]["name"]]
    else:
        raise InvalidArgumentError("'tool_choice' must be \"none\", \"auto\", \"required\" or "
                                   "{\"type\": \"function\", \"function\": {\"name\": <one of the tools>}}.")
    from .engine.constraints import compile_grammar

    calls = [{"type": "object", "properties": {"name": {"const": name},
                                                "arguments": functions[name].get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for name in forced]
    schema = {"anyOf": calls} if len(calls) > 1 else calls[0]
    return list(tools), compile_grammar("tool_call", schema)


def split_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(the content left, OpenAI tool_calls) from a reply in the Hermes / Qwen format, <tool_call>{"name":
    ..., "arguments": {...}}</tool_call>; calls that are not valid JSON stay in the content."""
    calls, kept, last = [], [], 0
    for m in TOOL_CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            continue
        kept.append(text[last:m.start()])
        last = m.end()
        calls.append({"id": new_id("call"), "type": "function",
                      "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}),
                                                                                 ensure_ascii=False)}})
    content = ("".join(kept) + text[last:]).strip() if calls else text
    return (content or None) if calls else text, calls


def timings(result) -> dict:
    """A generation's timings as llama-server reports them (an engine GenerationResult in): the prompt
    phase ends with the first token, the predicted phase holds the rest."""
    t, n = result.timings, len(result.ids)

    def rate(count, s):
        return count / s if s > 0 else 0.0
    return {"cache_n": t.n_cached, "prompt_n": t.n_prompt, "prompt_ms": t.prompt_s * 1e3,
            "prompt_per_token_ms": t.prompt_s * 1e3 / t.n_prompt if t.n_prompt else 0.0,
            "prompt_per_second": rate(t.n_prompt, t.prompt_s), "predicted_n": n,
            "predicted_ms": t.decode_s * 1e3, "predicted_per_token_ms": t.decode_s * 1e3 / n if n else 0.0,
            "predicted_per_second": rate(t.n_decode, t.decode_s)}


# llama-server's native /completion: its field names, mapped onto the OpenAI ones parse_params reads.
LLAMA_FIELDS = {"n_predict": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                "min_p": "min_p", "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
                "seed": "seed", "stop": "stop",
                "stream": "stream", "ignore_eos": "ignore_eos", "logit_bias": "logit_bias", "grammar": "grammar",
                "json_schema": "json_schema", "cache_prompt": "cache_prompt"}


def _llama_logit_bias(value: Any, tokenize) -> Any:
    """llama-server's logit_bias forms as OpenAI's {id: bias}: [[id or text, bias], ...] or {id or text: bias};
    a text biases each of its tokens; a bias of false bans the token."""
    pairs = value.items() if isinstance(value, Mapping) else \
        [tuple(p) for p in value if isinstance(p, list) and len(p) == 2] if isinstance(value, list) else None
    if pairs is None:
        return value
    out = {}
    for key, bias in pairs:
        bias = -LOGIT_BIAS_MAX if bias is False else bias
        is_id = isinstance(key, int) or (isinstance(key, str) and key.isascii() and key.isdigit())
        if is_id or tokenize is None or not isinstance(key, str):
            out[str(key)] = bias
        else:
            out |= {str(t): bias for t in tokenize(key)}
    return out


def parse_llama_params(body: Mapping[str, Any], n_vocab: int | None = None, tokenize=None) -> GenParams:
    """/completion's request (n_predict -1: until the context is full; temperature 0.8 by default; n_probs:
    each token's probability and its n most probable alternatives). tokenize: text -> ids, for logit_bias
    keyed by text."""
    mapped = {oa_key: body[key] for key, oa_key in LLAMA_FIELDS.items() if key in body}
    n_probs = _num(body, "n_probs", 0, int, 0, MAX_LOGPROBS)
    if mapped.get("max_tokens") == -1:
        mapped["max_tokens"] = None
    mapped.setdefault("temperature", 0.8)
    if "logit_bias" in mapped:
        mapped["logit_bias"] = _llama_logit_bias(mapped["logit_bias"], tokenize)
    params = parse_params(mapped, chat=True, n_vocab=n_vocab)     # chat=True: no max_tokens default of 16
    params.logprobs = n_probs or None
    return params


def generation_settings(params: GenParams, n_ctx: int) -> dict:
    """llama-server's generation_settings: the parameters a /completion request ran with."""
    sp = params.sampling
    return {"n_ctx": n_ctx, "n_predict": -1 if params.max_tokens is None else params.max_tokens,
            "temperature": sp.temperature, "top_k": sp.top_k, "top_p": sp.top_p, "min_p": sp.min_p,
            "repeat_penalty": sp.repeat_penalty, "repeat_last_n": sp.repeat_last_n,
            "seed": -1 if sp.seed is None else sp.seed, "stop": list(params.stop), "ignore_eos": params.ignore_eos,
            "stream": params.stream, "n_probs": params.logprobs or 0, "grammar": params.grammar or "",
            "logit_bias": [{"token": t, "bias": b} for t, b in (sp.logit_bias or {}).items()]}


def _token_logprob(tokenizer, t: int, v: float) -> dict:
    return {"token": tokenizer.decode([t]), "logprob": v, "bytes": list(tokenizer.token_bytes(t))}


def completion_probabilities(tokenizer, ids: list[int], lps: list, probs: bool = False) -> list[dict]:
    """llama-server's completion_probabilities: per token its id, text, logprob and bytes, and the top ones;
    probs (its post_sampling_probs): probabilities (prob, top_probs) instead of log-probabilities."""
    def entry(t: int, v: float) -> dict:
        e = {"id": t} | _token_logprob(tokenizer, t, v)
        if probs:
            e["prob"] = math.exp(e.pop("logprob"))
        return e
    top = "top_probs" if probs else "top_logprobs"
    return [entry(t, lp[0]) | {top: [entry(a, v) for a, v in lp[1]]} for t, lp in zip(ids, lps)]


def completion_logprobs(tokenizer, ids: list[int], lps: list, offset: int = 0) -> dict:
    """The legacy completions logprobs object for these tokens: tokens, token_logprobs, top_logprobs,
    text_offset (characters, from offset)."""
    tokens, offsets = [], []
    for i in ids:
        offsets.append(offset)
        tokens.append(tokenizer.decode([i]))
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp[0] if lp else None for lp in lps],
            "top_logprobs": [{tokenizer.decode([t]): v for t, v in lp[1]} if lp else None for lp in lps],
            "text_offset": offsets}


def chat_logprobs(tokenizer, ids: list[int], lps: list) -> dict:
    """The chat logprobs object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    return {"content": [_token_logprob(tokenizer, t, lp[0]) | {
        "top_logprobs": [_token_logprob(tokenizer, a, v) for a, v in lp[1]]} for t, lp in zip(ids, lps)]}


def new_id(prefix: str) -> str:
    return f"{prefix}-{os.urandom(12).hex()}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens taken from the prefix cache instead of being run."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def choice(index: int, chat: bool, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def response(id: str, model: str, chat: bool, choices: list[dict], prompt_tokens: int,
             completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"id": id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def completion_chunk(id: str, model: str, text: str, finish_reason: str | None = None,
                     logprobs: dict | None = None, index: int = 0) -> dict:
    return {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}


def chat_chunk(id: str, model: str, delta: dict, finish_reason: str | None = None,
               logprobs: dict | None = None, index: int = 0) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(id: str, model: str, chat: bool, prompt_tokens: int, completion_tokens: int,
                cached_tokens: int = 0) -> dict:
    """The last chunk of a stream asked for with stream_options.include_usage: no choices, the usage."""
    return {"id": id, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


_PARAM = re.compile(r"^'([A-Za-z_][A-Za-z0-9_.]*(?:\[\d+\])?(?:\.[A-Za-z_][A-Za-z0-9_]*)*)'|^(messages\[\d+\][\w.]*)")


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    """OpenAI's error object; param: the request field at fault, by default the one the message starts with
    ("'temperature' must be ..." -> temperature)."""
    if param is None and type_ == "invalid_request_error":
        m = _PARAM.match(message)
        param = m and (m.group(1) or m.group(2))
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
