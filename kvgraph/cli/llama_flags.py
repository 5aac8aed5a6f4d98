"""llama-server's command line for `kvgraph serve`: every flag llama-server has is taken with its meaning
(`same`), accepted and named in one start-up notice where it can make no difference here (`ignored`: there is
no GPU to offload to, no logical batch apart from the ubatch, ...), or refused with a usage error saying why
and what to use instead (`refused`). None is dropped silently.

The flags themselves (names, whether they take a value) are llama-server's --help, read by
tools/llama_server_flags.py into llama_server_flags.json; docs/compatibility.md's flag table is rendered from
that list and `classify`.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

FLAGS_JSON = Path(__file__).with_name("llama_server_flags.json")


@dataclass(frozen=True)
class Take:
    kind: str                   # 'same', 'ignored' or 'refused'
    note: str                   # how kvgraph takes it (same) or why not (ignored, refused)
    instead: str | None = None  # refused: what to use instead

    def doc(self) -> str:
        if self.kind == "same":
            return self.note
        if self.kind == "ignored":
            return f"accepted, no effect: {self.note}"
        return f"refused: {self.note}" + (f"; use {self.instead}" if self.instead else "")


# llama-server flags `kvgraph serve` takes with llama-server's meaning (each an option of its parser).
SAME = {
    "--version": "same", "-h": "same", "--help": "same", "--usage": "same",
    "-t": "same", "--threads": "same (compute threads for prompts and decoding)",
    "-c": "same: the whole context, shared by the slots (each gets c / --parallel)", "--ctx-size": "",
    "--kv-unified-per-slot": "same: each slot's context (without -c the pool is --parallel times it)",
    "-n": "same (default for requests that set none)", "--predict": "", "--n-predict": "",
    "-ub": "same (prompt tokens per graph run)", "--ubatch-size": "",
    "-b": "a prompt runs in chunks of the smaller of -b and -ub (there is no separate logical batch)",
    "--batch-size": "",
    "-fa": "same", "--flash-attn": "",
    "-ctk": "same for f16, f32 and q8_0 (K and V share one type)", "--cache-type-k": "", "-ctv": "", "--cache-type-v": "",
    "-m": "same (a GGUF path or a known model name)", "--model": "",
    "--temp": "same (default for requests)", "--temperature": "", "--top-k": "same (default for requests)",
    "--top-p": "same (default for requests)", "--min-p": "same (default for requests)",
    "--repeat-penalty": "same (default for requests)", "--repeat-last-n": "same (default for requests)",
    "-s": "same (default for requests)", "--seed": "", "--ignore-eos": "same (default for requests)",
    "-np": "same", "--parallel": "",
    "-a": "same: comma-separated names, listed as one model's aliases", "--alias": "",
    "--tags": "same (informational, in /v1/models)",
    "--host": "same (comma-separated addresses)", "--port": "same", "--reuse-port": "same",
    "--cors-origins": "same, and each listed origin is echoed only to itself", "--cors-methods": "same",
    "--cors-headers": "same", "--cors-credentials": "same", "--no-cors-credentials": "same",
    "--api-key": "same (comma-separated keys)", "--api-key-file": "same",
    "--ssl-key-file": "same", "--ssl-cert-file": "same",
    "--cache-prompt": "same", "--no-cache-prompt": "same",
    "--metrics": "same (kvgraph_* metric names)", "--slots": "same", "--no-slots": "same",
    "--chat-template": "same: a built-in template name or a jinja template", "--chat-template-file": "same",
    "--ui": "same: the chat page at /", "--webui": "", "--no-ui": "", "--no-webui": "",
    "-kvu": "same: each slot may use the whole -c", "--kv-unified": "", "-no-kvu": "", "--no-kv-unified": "",
    "--chat-template-kwargs": "same", "-rea": "same (on/auto: enable_thinking true; off: false)", "--reasoning": "",
    "--reasoning-format": "same: auto, deepseek, deepseek-legacy, none", "--reasoning-effort": "same",
    "--prefill-assistant": "same", "--no-prefill-assistant": "same",
    "-ctxcp": "same: recurrent states and sliding windows' cells, taken before each prompt's last token",
    "--ctx-checkpoints": "",
    "--swa-checkpoints": "", "-cram": "memory for the state checkpoints, MiB (default 1024)", "--cache-ram": "",
    "-v": "same: logs each request with its timings", "--verbose": "", "--log-verbose": "",
    "--log-disable": "same: logs nothing but errors",
}


def _inherit_notes(notes: dict[str, str]) -> dict[str, str]:
    """A note of "" means: the note of the name just before it (a flag's other spellings)."""
    out, last = {}, ""
    for name, note in notes.items():
        out[name] = last = note or last
    return out


SAME = _inherit_notes(SAME)

_CPU_ONLY = "kvgraph runs on the CPU, so there is nothing to offload or place on a device"
IGNORED = {
    **dict.fromkeys(["-ngl", "--gpu-layers", "--n-gpu-layers", "-dev", "--device", "-sm", "--split-mode", "-ts",
                     "--tensor-split", "-mg", "--main-gpu", "-kvo", "--kv-offload", "-nkvo", "--no-kv-offload",
                     "--op-offload", "--no-op-offload", "-ot", "--override-tensor", "-cmoe", "--cpu-moe",
                     "-ncmoe", "--n-cpu-moe", "-ncffn", "--n-cpu-ffn", "-fit", "--fit", "-fitt", "--fit-target",
                     "-fitc", "--fit-ctx", "--no-host", "-bs", "--backend-sampling"], _CPU_ONLY),
    **dict.fromkeys(["-C", "--cpu-mask", "-Cr", "--cpu-range", "--cpu-strict", "--prio", "--poll", "-Cb",
                     "--cpu-mask-batch", "-Crb", "--cpu-range-batch", "--cpu-strict-batch", "--prio-batch",
                     "--poll-batch", "--numa"], "kvgraph leaves its threads' placement and priority to the OS"),
    **dict.fromkeys(["-tb", "--threads-batch"], "prompts and decoding share the -t threads"),
    **dict.fromkeys(["--jinja", "--no-jinja"], "chat templates are always rendered with jinja"),
    **dict.fromkeys(["-cb", "--cont-batching"], "batching is always continuous"),
    **dict.fromkeys(["--mmap", "--no-mmap", "--repack", "-nr", "--no-repack", "-lm", "--load-mode", "-lzm",
                     "--lazy-mode"], "weights are repacked once into kvgraph's weights cache and mapped from it"),
    **dict.fromkeys(["-dt", "--defrag-thold"], "the KV cache is paged and never needs defragmenting"),
    **dict.fromkeys(["--perf", "--no-perf"], "timings are always measured and returned"),
    **dict.fromkeys(["--warmup", "--no-warmup"], "the first request compiles what it needs"),
    **dict.fromkeys(["-e", "--escape", "--no-escape"], "the server takes prompts as JSON strings"),
    "--offline": "kvgraph never downloads from a model hub",
    **dict.fromkeys(["--log-colors", "--log-prefix", "--no-log-prefix", "--log-timestamps", "--no-log-timestamps",
                     "--log-jsonl", "--no-log-jsonl"], "kvgraph's log lines have one fixed form"),
    "--threads-http": "HTTP is served by one asyncio loop",
    **dict.fromkeys(["-to", "--timeout"], "requests have no read/write deadline; a client that leaves ends its "
                                          "request"),
    "--sse-ping-interval": "streams send no keep-alive comments",
    "--cache-idle-slots": "idle slots always keep their cells for prompt reuse",
}

_SPEC = ("speculative decoding (draft models, n-gram lookup) is not implemented", None)
# (pattern, reason, instead) for the rest, first match wins.
REFUSED = [
    (r"--spec-|--no-spec-|-md$|--model-draft|-.*-draft$|--draft|-td$|-tbd$|-Cd$|-Crd$|-Cbd$|-otd$|-cmoed$|-ncmoed$|-devd$|-ngld$|-hfd$|-hfrd$"
     r"|-ctkd$|-ctvd$|-lcs$|-lcd$|--lookup-cache|--fim-.*-spec", *_SPEC),
    (r"--rope-|--yarn-", "RoPE/YaRN overrides are not implemented: the model file's settings are used", None),
    (r"--lora|--control-vector", "LoRA adapters and control vectors are not implemented", None),
    (r"-mu$|--model-url|-dr$|--docker-repo|-hf$|-hfr$|--hf-|-hff$|-hft$|--.*-default$|-cl$|--cache-list",
     "kvgraph downloads nothing from model hubs; it loads a local GGUF or a known model name",
     "-m PATH or -m NAME (`kvgraph models` lists the names)"),
    (r"--samplers|--sampler-seq|--sampling-seq|--top-n?sigma|--top-n-sigma|--xtc-|--typical|--dry-|--adaptive-"
     r"|--dynatemp-|--mirostat|--presence-penalty|--frequency-penalty",
     "this sampler is not implemented (kvgraph samples with temperature, top-k, top-p, min-p and a repeat "
     "penalty)", "--temp, --top-k, --top-p, --min-p or --repeat-penalty"),
    (r"-l$|--logit-bias", "no server-wide logit bias", "the request's logit_bias field"),
    (r"--grammar|-j$|--json-schema|-jf$", "no server-wide grammar", "the request's grammar, json_schema or "
                                                                     "response_format field"),
    (r"-mm|--mmproj|--no-mmproj|--image-|--mtmd-|--video-|--media-path", "multimodal models are not supported", None),
    (r"--embd|--embedding|--rerank|--pooling|--spm-infill", "embeddings, reranking and infill are not served",
     None),
    (r"--models-|--no-models-", "the multi-model router is not implemented; start one server per model", None),
    (r"--ui-|--webui-|--no-ui-|--no-webui-|--tools|--mcp-|-ag$|-no-ag$|--agent|--no-agent|--path$|--api-prefix",
     "llama-server's web UI options, tools and agent proxy are not implemented", None),
    (r"-cms$|--checkpoint-min-step", "checkpoints are taken before each prompt's last token, not by spacing",
     "--ctx-checkpoints"),
    (r"--cache-reuse|--slot-save-path|-sps$|--slot-prompt-similarity|--no-cache-idle-slots",
     "not implemented: an idle slot's cells are reused for the longest shared prefix", "--no-cache-prompt"),
    (r"--swa-full", "sliding-window layers always keep only their window", None),
    (r"--context-shift|--no-context-shift", "context shifting is not implemented in the server; a request longer "
                                           "than its slot ends with finish_reason 'length'", None),
    (r"--keep$", "context shifting is not implemented in the server", None),
    (r"-r$|--reverse-prompt", "an interactive-mode flag", "the request's stop field"),
    (r"-sp$|--special", "special tokens are never printed as text", None),
    (r"-cb$|-nocb$|--no-cont-batching", "batching is always continuous", None),
    (r"--rpc|--list-devices", "kvgraph runs on this machine's CPU only", "--replicas N (Ray Serve) for more "
                                                                        "machines"),
    (r"--check-tensors|--override-kv", "not implemented: the file's values are used as they are", None),
    (r"--log-file|-lv$|--verbosity|--log-verbosity|--log-prompts-dir", "kvgraph logs to stderr only",
     "--verbose or --log-disable"),
    (r"--completion-bash", "not implemented", None),
    (r"--reasoning-budget", "a thinking budget is not implemented", "--reasoning off"),
    (r"--reasoning-preserve|--no-reasoning-preserve", "not implemented: the template decides what history keeps",
     None),
    (r"--skip-chat-parsing|--no-skip-chat-parsing", "not implemented", "--reasoning-format none"),
    (r"--props$", "POST /props is not implemented; /props is read-only", None),
    (r"--lora-init|--sleep-idle-seconds", "not implemented", None),
]


def classify(name: str) -> Take:
    """How `kvgraph serve` takes llama-server's flag `name`."""
    if name in SAME:
        return Take("same", SAME[name])
    if name in IGNORED:
        return Take("ignored", IGNORED[name])
    for pattern, why, instead in REFUSED:
        if re.match(f"^(?:{pattern})", name):
            return Take("refused", why, instead)
    return Take("refused", "not implemented")


@cache
def llama_server_flags() -> list[dict]:
    return json.loads(FLAGS_JSON.read_text())


def _nargs(value: str | None):
    if value is None:
        return 0
    if value.startswith("[") and value.endswith("]"):
        return "?"
    return 2 if value == "START END" else None


class _Ignored(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        namespace.ignored_flags = [*getattr(namespace, "ignored_flags", []), (option_string, self.help_text)]


class _Refused(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        take = classify(option_string)
        parser.error(f"llama-server's {option_string} is not supported: {take.note}"
                     + (f"; use {take.instead} instead" if take.instead else ""))


def add_llama_server_flags(parser: argparse.ArgumentParser) -> None:
    """Every llama-server flag the parser does not already have, hidden from --help: ignored ones are recorded
    in args.ignored_flags (for a start-up notice), refused ones are usage errors."""
    have = set(parser._option_string_actions)
    parser.set_defaults(ignored_flags=[])
    for entry in llama_server_flags():
        for name in entry["names"]:
            if name in have:
                continue
            take = classify(name)
            if take.kind == "same":
                raise AssertionError(f"llama-server's {name} is classified 'same' but serve has no such option")
            action = _Ignored if take.kind == "ignored" else _Refused
            parser.add_argument(name, nargs=_nargs(entry["value"]), action=action, help=argparse.SUPPRESS,
                                dest=argparse.SUPPRESS, default=argparse.SUPPRESS)
            parser._option_string_actions[name].help_text = take.note


def nearest_option(parser: argparse.ArgumentParser, unknown: str) -> str | None:
    """The parser's option (llama-server's hidden ones included) closest to an unknown one, for 'did you mean'."""
    flag = unknown.split("=", 1)[0]
    known = list(parser._option_string_actions)
    close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
    return close[0] if close else None
