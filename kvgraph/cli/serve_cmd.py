"""`kvgraph serve`: the OpenAI-compatible server with continuous batching."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__
from ..errors import InvalidArgumentError, KvgraphError
from ..openai_compat import DEFAULT_MAX_BODY
from ..tokenizer.chat import BUILTIN_TEMPLATES, LLAMA_CPP_TEMPLATE_NAMES
from ..engine import checkpoints
from ..engine.sampling import REPEAT_PENALTY_RANGE
from ..server.cors import DEFAULT_METHODS
from .args import NON_NEGATIVE, POSITIVE, float_in, int_in, port_arg, seed_arg
from .llama_flags import add_llama_server_flags

if TYPE_CHECKING:
    import socket


def seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds, got {text}")
    return value


def add_serve_parser(sub, add_model_args) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching; llama-server's flags)",
                       description="Takes llama-server's flags with their meaning (docs/compatibility.md lists "
                                   "every one); those that can make no difference here are accepted and named "
                                   "at start, the others are refused with what to use instead.")
    p.add_argument("--version", action="version", version=f"kvgraph {__version__}")
    p.add_argument("--ui", "--webui", action=argparse.BooleanOptionalAction, default=True,
                   help="the chat page at / (default: on)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address(es) to bind, comma-separated (default 127.0.0.1; e.g. 127.0.0.1,::1)")
    p.add_argument("--port", type=port_arg, default=8080, help="port (default 8080)")
    p.add_argument("--reuse-port", action="store_true", help="let other processes bind the same port (SO_REUSEPORT)")
    p.add_argument("--parallel", "-np", type=int_in(-1), default=4,
                   help="sequences decoded together (default 4; -1: 4, as llama-server's auto)")
    p.add_argument("--kv-unified-per-slot", type=POSITIVE, default=None, metavar="N",
                   help="each slot's context in tokens; without -c the whole context is --parallel times N")
    p.add_argument("--kv-unified", "-kvu", action=argparse.BooleanOptionalAction, default=False,
                   help="every slot may use the whole -c (its cells are taken as it grows) instead of c / --parallel")
    p.add_argument("-no-kvu", dest="kv_unified", action="store_false", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", "-b", type=POSITIVE, default=None, metavar="N",
                   help="prompt tokens fed per step: a prompt runs in chunks of the smaller of -b and --ubatch-size")
    p.add_argument("--queue", type=NON_NEGATIVE, default=64, help="requests that may wait for a slot (default 64)")
    p.add_argument("--model-id", default=None, help="name clients use in 'model' (default: the file name)")
    p.add_argument("--alias", "-a", action="append", default=[], metavar="NAMES",
                   help="other names of the model, comma-separated (repeatable); /v1/models lists them as its aliases")
    p.add_argument("--tags", default="", metavar="TAGS", help="the model's tags, comma-separated (informational)")
    p.add_argument("--strict-model-names", action="store_true",
                   help="a request naming a model not served here gets 404 model_not_found (default: served anyway)")
    k = p.add_argument_group("access")
    k.add_argument("--api-key", default=os.environ.get("KVGRAPH_API_KEY") or None, metavar="KEYS",
                   help="require 'Authorization: Bearer KEY' on every route but /health and the chat page; "
                        "comma-separated keys (default: $KVGRAPH_API_KEY)")
    k.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="more API keys, one per line ('#' lines and blank lines skipped)")
    k.add_argument("--cors-origins", "--cors-origin", action="append", default=None, metavar="ORIGINS",
                   help="origins browsers may call from: '*' (default, as llama-server: any origin, echoed back "
                        "with credentials), 'localhost' (http(s)://localhost, 127.0.0.1, [::1] on any port), "
                        "comma-separated origins such as http://localhost:3000, or '' (none)")
    k.add_argument("--cors-methods", default=DEFAULT_METHODS, metavar="METHODS",
                   help=f"methods a preflight allows (default: {DEFAULT_METHODS})")
    k.add_argument("--cors-headers", default="*", metavar="HEADERS",
                   help="headers a preflight allows (default '*'; a browser sending Authorization needs it named)")
    k.add_argument("--cors-credentials", action=argparse.BooleanOptionalAction, default=True,
                   help="allow credentials (default: yes)")
    k.add_argument("--ssl-key-file", default=None, metavar="FILE", help="PEM private key: serve HTTPS")
    k.add_argument("--ssl-cert-file", default=None, metavar="FILE", help="PEM certificate: serve HTTPS")
    g = p.add_argument_group("defaults for requests that leave them out (as llama-server's)")
    g.add_argument("--temp", "--temperature", type=float, default=None,
                   help="temperature (default: the API's, 1.0; /completion 0.8)")
    g.add_argument("--top-k", type=NON_NEGATIVE, default=None, help="top-k (0: off)")
    g.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=None, help="top-p (1.0: off)")
    g.add_argument("--min-p", type=float_in(0.0, 1.0), default=None, help="min-p (0: off)")
    g.add_argument("--repeat-penalty", type=float_in(*REPEAT_PENALTY_RANGE), default=None, help="1.0: off")
    g.add_argument("--repeat-last-n", type=NON_NEGATIVE, default=None, help="tokens the repeat penalty looks back")
    g.add_argument("--ignore-eos", action="store_true", default=None, help="generate past end-of-generation tokens")
    g.add_argument("--seed", "-s", type=seed_arg, default=None, help="seed (-1: random)")
    g.add_argument("--n-predict", "-n", "--predict", type=int_in(-1), default=None,
                   help="tokens to generate (-1: until the context is full)")
    t = p.add_argument_group("chat templates and reasoning models")
    t.add_argument("--chat-template", default=None, metavar="NAME",
                   help=f"a built-in chat template ({', '.join(BUILTIN_TEMPLATES)}) or a jinja template's text")
    t.add_argument("--chat-template-file", default=None, metavar="FILE", help="a jinja chat template file")
    t.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help='more template variables for every request, e.g. \'{"enable_thinking": false}\'')
    t.add_argument("--reasoning", "-rea", nargs="?", const="on", choices=("on", "off", "auto"), default="auto",
                   help="let reasoning models think (on, auto: the default) or not (off: enable_thinking false, and "
                        "an opened thinking block is closed)")
    t.add_argument("--reasoning-format", choices=("auto", "deepseek", "deepseek-legacy", "none"), default="auto",
                   help="where thoughts go: reasoning_content (auto, deepseek), both reasoning_content and content "
                        "(deepseek-legacy) or content as generated (none)")
    t.add_argument("--reasoning-effort", default=None, metavar="LEVEL",
                   help="the template's reasoning_effort variable (e.g. low, medium, high)")
    t.add_argument("--prefill-assistant", action=argparse.BooleanOptionalAction, default=True,
                   help="an assistant message at the end of a conversation is the start of the reply (default: on)")
    o = p.add_argument_group("routes and logs")
    o.add_argument("--metrics", action="store_true", help="serve Prometheus metrics on /metrics (default: 501)")
    o.add_argument("--slots", action=argparse.BooleanOptionalAction, default=True,
                   help="the /slots endpoint (default: on; off: 501)")
    o.add_argument("--cache-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the cells of an idle slot that holds the same prefix (default: on; a request can "
                        "also ask for a full run with cache_prompt: false)")
    o.add_argument("--no-prompt-cache", dest="cache_prompt", action="store_false", help=argparse.SUPPRESS)
    o.add_argument("--ctx-checkpoints", "-ctxcp", "--swa-checkpoints", type=NON_NEGATIVE,
                   default=checkpoints.DEFAULT_PER_SLOT, metavar="N",
                   help="recurrent and hybrid models: state checkpoints kept per slot, so a prompt that leaves a "
                        f"cached one (a regenerated reply, an edited message) restarts from the last one before it "
                        f"(default {checkpoints.DEFAULT_PER_SLOT}; 0: off)")
    o.add_argument("--cache-ram", "-cram", type=int_in(-1), default=checkpoints.DEFAULT_BYTES >> 20, metavar="MIB",
                   help=f"memory for all slots' checkpoints, MiB (default {checkpoints.DEFAULT_BYTES >> 20}; "
                        "-1: no limit; 0: none)")
    o.add_argument("--verbose", "-v", "--log-verbose", action="store_true",
                   help="also answer each request with the prompt as the model saw it (__verbose)")
    o.add_argument("--log-disable", action="store_true",
                   help="log nothing but errors (default: a line per request with its tokens and timings)")
    c = p.add_argument_group("running on Ray Serve (pip install 'kvgraph[cluster]')")
    c.add_argument("--replicas", type=POSITIVE, default=None, metavar="N",
                   help="serve N replicas behind Ray Serve's router, each with its own model and batcher "
                        "(default: one process, no Ray)")
    c.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="an existing Ray cluster to deploy on (e.g. 'auto' or ray://head:10001; default: start "
                        "a local Ray instance)")
    c.add_argument("--replica-cpus", type=float, default=1.0, metavar="N",
                   help="CPUs Ray reserves for each replica; also its kernel threads unless --threads (default 1)")
    p.add_argument("--shutdown-timeout", type=seconds_arg, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, how long running requests may finish before they are ended with "
                        "finish_reason 'shutdown' (default 10)")
    p.add_argument("--max-body", type=POSITIVE, default=DEFAULT_MAX_BODY, metavar="BYTES",
                   help=f"largest request body accepted; larger ones get 413 (default {DEFAULT_MAX_BODY >> 20} MiB)")
    add_model_args(p)
    ctx = p._option_string_actions["--ctx-size"]       # llama-server's -c: the whole context, 0: the model's
    ctx.type, ctx.help = NON_NEGATIVE, ("the whole context in tokens, shared by the slots: each gets c / --parallel "
                                        "(as llama-server's; 0: the model's per slot; default: the model's, at most "
                                        "4096, per slot)")
    add_llama_server_flags(p)
    p.set_defaults(func=cmd_serve)


def slot_context(args, model_ctx: int) -> int:
    """Each slot's context: -c split between the slots (llama-server's meaning), --kv-unified-per-slot, or the
    model's own at most 4096 (what one slot gets without either)."""
    parallel = 1 if args.kv_unified else args.parallel
    if args.ctx_size:
        per_slot = args.ctx_size // parallel
        if args.kv_unified_per_slot:
            per_slot = min(per_slot, args.kv_unified_per_slot)
        if per_slot < 1:
            raise InvalidArgumentError(f"-c {args.ctx_size} cannot be shared by {parallel} slots; give at least "
                                       f"-c {parallel} (or fewer --parallel).")
        return per_slot
    if args.kv_unified_per_slot:
        return args.kv_unified_per_slot
    from ..engine.context import DEFAULT_N_CTX_CAP

    return model_ctx if args.ctx_size == 0 else min(model_ctx, DEFAULT_N_CTX_CAP)


def build_server(args):
    """(app, scheduler) for the parsed arguments; loads the model."""
    from ..engine.batching import BatchScheduler, bucket_sizes, scheduler_context
    from ..server.app import ServerOptions, ServerState, create_app
    from .main import open_llm

    if args.parallel == -1:
        args.parallel = 4            # llama-server's auto
    if args.parallel < 1 or args.queue < 0:
        raise InvalidArgumentError("--parallel must be >= 1 and --queue >= 0.")
    options = server_options(args)          # flag errors before the model loads
    if args.batch_size:
        args.ubatch = min(args.ubatch, args.batch_size)
    template = chat_template_arg(args)
    llm = open_llm(args, n_ctx=1)           # the single-stream context is replaced below
    per_seq = slot_context(args, llm.loaded.config.n_ctx_train)
    ctx = scheduler_context(llm.loaded, args.parallel, per_seq, n_ubatch=args.ubatch,
                            graph_cache=not args.no_graph_cache,
                            cache_capacity=max(args.graph_cache_size, 2 * len(bucket_sizes(args.parallel)) + 4),
                            verify=args.verify_graph_cache, flash_attn=llm.ctx.flash_attn, cache_type=llm.ctx.cache_type)
    llm.ctx = ctx
    budget = (1 << 62) if args.cache_ram == -1 else args.cache_ram << 20
    sched = BatchScheduler(ctx, llm.tokenizer, args.parallel, per_seq, args.queue, prefix_cache=args.cache_prompt,
                           checkpoints=args.ctx_checkpoints if args.cache_ram else 0, checkpoint_bytes=budget)
    # The id: --model-id, else the first --alias in sorted order (llama-server's), else the file stem. Requests may
    # also name the model by any alias, the stem or the -m name as typed (when it is a name, not a path).
    typed = [args.model] if args.model and not Path(args.model).expanduser().exists() else []
    model_id = args.model_id or (min(options.aliases) if options.aliases else llm.model_name)
    if template:
        llm.tokenizer.set_chat_template(*template)
    options.model_path = str(llm.loaded.path)
    state = ServerState(sched, llm.tokenizer, model_id, args.max_body,
                        (*options.aliases, *typed, llm.model_name), args.strict_model_names, options)
    return create_app(state), sched


def comma_list(values: list[str] | str) -> list[str]:
    """Repeated and comma-separated flag values, in order, blanks dropped."""
    items = [values] if isinstance(values, str) else values
    return [v.strip() for item in items for v in item.split(",") if v.strip()]


def server_options(args):
    """ServerOptions of the parsed flags; a bad value is a clear error naming the flag."""
    from ..server.app import ServerOptions
    from ..server.cors import CorsPolicy

    if args.temp is not None and not 0.0 <= args.temp <= 2.0:
        raise InvalidArgumentError(f"--temp must be between 0 and 2, got {args.temp}.")
    keys = comma_list(args.api_key or "")
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"--api-key-file: cannot read {args.api_key_file!r} ({exc}).") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise InvalidArgumentError(f"--api-key-file: {args.api_key_file!r} holds no key.")
    origins = "*" if args.cors_origins is None else ",".join(args.cors_origins)
    try:
        origins = CorsPolicy.parse_origins(origins)
    except ValueError as exc:
        raise InvalidArgumentError(f"--cors-origins: {exc}.") from None
    if bool(args.ssl_key_file) != bool(args.ssl_cert_file):
        raise InvalidArgumentError("HTTPS needs both --ssl-key-file and --ssl-cert-file.")
    for flag, path in (("--ssl-key-file", args.ssl_key_file), ("--ssl-cert-file", args.ssl_cert_file)):
        if path and not Path(path).is_file():
            raise InvalidArgumentError(f"{flag}: no such file {path!r}.")
    defaults = {"temperature": args.temp, "seed": args.seed, "top_k": args.top_k, "top_p": args.top_p,
                "min_p": args.min_p, "repeat_penalty": args.repeat_penalty, "repeat_last_n": args.repeat_last_n,
                "ignore_eos": args.ignore_eos, "max_tokens": None if args.n_predict == -1 else args.n_predict}
    template_kwargs = {}
    if args.chat_template_kwargs:
        try:
            template_kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError(f"--chat-template-kwargs: not JSON ({exc.msg} at {exc.pos}).") from None
        if not isinstance(template_kwargs, dict):
            raise InvalidArgumentError("--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'.")
    if args.reasoning != "auto":
        template_kwargs.setdefault("enable_thinking", args.reasoning == "on")
    else:
        template_kwargs.setdefault("enable_thinking", True)
    if args.reasoning_effort:
        template_kwargs.setdefault("reasoning_effort", args.reasoning_effort)
    return ServerOptions(api_keys=tuple(keys), template_kwargs=template_kwargs,
                         prefill_assistant=args.prefill_assistant, chat_page=args.ui, reasoning_format=args.reasoning_format, metrics=args.metrics, slots=args.slots,
                         cors=CorsPolicy(origins, args.cors_methods, args.cors_headers, args.cors_credentials),
                         aliases=tuple(comma_list(args.alias)), tags=tuple(comma_list(args.tags)), log_requests=not args.log_disable, verbose=args.verbose,
                         defaults={k: v for k, v in defaults.items() if v is not None})


def chat_template_arg(args) -> tuple[str, str] | None:
    """(source, origin) of --chat-template (a built-in name, or a template's text) or --chat-template-file; None:
    the model's own. Checked before the model loads."""
    if args.chat_template and args.chat_template_file:
        raise InvalidArgumentError("give --chat-template or --chat-template-file, not both.")
    name = args.chat_template
    if name:
        if name in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[name], f"builtin:{name}"
        if "{{" in name or "{%" in name:
            return name, "--chat-template"
        what = ("is one of llama.cpp's templates that kvgraph does not build in" if name in LLAMA_CPP_TEMPLATE_NAMES
                else "is not a template name")
        raise InvalidArgumentError(f"--chat-template: {name!r} {what}; built in: {', '.join(BUILTIN_TEMPLATES)} "
                                   "(or pass the model's jinja template with --chat-template-file).")
    if args.chat_template_file:
        try:
            source = Path(args.chat_template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"--chat-template-file: cannot read {args.chat_template_file!r} ({exc}).") \
                from None
        return source, f"file:{Path(args.chat_template_file).name}"
    return None


def host_list(hosts: str) -> list[str]:
    """--host's comma-separated addresses."""
    return [h.strip() for h in hosts.split(",") if h.strip()]


def _bind(hosts: str, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """A listening socket per address (IPv4 or IPv6), all on port; the first failure is a clear error."""
    import socket     # here: every kvgraph command builds this parser

    socks = []
    try:
        for host in [h.strip("[]") for h in host_list(hosts)]:
            try:
                family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
                sock = socket.socket(family, kind, proto)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(addr)
                sock.listen(2048)
                socks.append(sock)
            except OSError as exc:
                raise KvgraphError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port "
                                   "or --host.") from None
    except KvgraphError:
        for sock in socks:
            sock.close()
        raise
    if not socks:
        raise InvalidArgumentError("--host names no address.")
    return socks


def cmd_serve(args) -> int:
    if args.replicas is not None or args.ray_address is not None:
        from ..cluster import run
        return run(args)
    try:
        import uvicorn
    except ImportError:
        raise KvgraphError("the server needs FastAPI and uvicorn: pip install 'kvgraph[server]'.") from None
    if args.ignored_flags:
        print("kvgraph: accepted with no effect here: " + "; ".join(f"{flag} ({why})" for flag, why in
                                                                  dict(args.ignored_flags).items()), file=sys.stderr)
    app, sched = build_server(args)
    socks = _bind(args.host, args.port, args.reuse_port)
    scheme = "https" if args.ssl_cert_file else "http"
    where = ", ".join(f"{scheme}://{h}:{args.port}" for h in host_list(args.host))
    if not args.log_disable:
        print(f"kvgraph: serving {app.state.kv.model_id} on {where} "
              f"({args.parallel} slots, {sched.n_ctx_per_seq} tokens each)", file=sys.stderr)
    logging.basicConfig(format="%(asctime)s %(name)s: %(message)s",
                        level=logging.ERROR if args.log_disable else logging.INFO)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout + 5,
                            ssl_keyfile=args.ssl_key_file, ssl_certfile=args.ssl_cert_file)
    server = _DrainingServer(config, sched, args.shutdown_timeout)
    try:
        server.run(sockets=socks)
    finally:
        sched.shutdown(drain=False, timeout=10)
        for sock in socks:
            sock.close()
    return 0


def _draining_server_class():
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """uvicorn's server, whose SIGTERM/Ctrl-C drain is bounded: it stops accepting at once, lets running
        requests go on for shutdown_timeout seconds, then ends them (finish_reason 'shutdown'), so their
        responses complete and the process exits."""

        def __init__(self, config, sched, shutdown_timeout: float):
            super().__init__(config)
            self.sched, self.shutdown_timeout = sched, shutdown_timeout
            self._deadline: threading.Timer | None = None

        def handle_exit(self, sig, frame) -> None:
            if self._deadline is None:
                self._deadline = threading.Timer(self.shutdown_timeout, self.sched.shutdown,
                                                 kwargs={"drain": False, "timeout": 0})
                self._deadline.daemon = True
                self._deadline.start()
            super().handle_exit(sig, frame)
    return DrainingServer


def _DrainingServer(config, sched, shutdown_timeout: float):  # noqa: N802 (a class, built lazily)
    return _draining_server_class()(config, sched, shutdown_timeout)
