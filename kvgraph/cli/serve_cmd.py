"""`kvgraph serve`: the OpenAI-compatible server with continuous batching."""
from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidArgumentError, KvgraphError
from ..openai_compat import DEFAULT_MAX_BODY
from ..tokenizer.chat import BUILTIN_TEMPLATES
from .args import NON_NEGATIVE, POSITIVE, int_in, port_arg, seed_arg

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
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address(es) to bind, comma-separated (default 127.0.0.1; e.g. 127.0.0.1,::1)")
    p.add_argument("--port", type=port_arg, default=8080, help="port (default 8080)")
    p.add_argument("--parallel", "-np", type=POSITIVE, default=4, help="sequences decoded together (default 4)")
    p.add_argument("--queue", type=NON_NEGATIVE, default=64, help="requests that may wait for a slot (default 64)")
    p.add_argument("--model-id", default=None, help="name clients use in 'model' (default: the file name)")
    p.add_argument("--alias", action="append", default=[], metavar="NAME",
                   help="another name /v1/models lists and requests may use (repeatable)")
    p.add_argument("--strict-model-names", action="store_true",
                   help="a request naming a model not served here gets 404 model_not_found (default: served anyway)")
    p.add_argument("--api-key", default=os.environ.get("KVGRAPH_API_KEY") or None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: $KVGRAPH_API_KEY)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="an origin browsers may call from, e.g. http://localhost:3000, or '*' (repeatable; "
                        "default: none, so browsers block cross-origin calls)")
    g = p.add_argument_group("defaults for requests that leave them out (as llama-server's)")
    g.add_argument("--temp", type=float, default=None, help="temperature (default: the API's, 1.0; /completion 0.8)")
    g.add_argument("--seed", type=seed_arg, default=None, help="seed (-1: random)")
    g.add_argument("--n-predict", "-n", type=int_in(-1), default=None,
                   help="tokens to generate (-1: until the context is full)")
    g.add_argument("--chat-template", default=None, metavar="NAME",
                   help=f"a built-in chat template instead of the model's ({', '.join(BUILTIN_TEMPLATES)})")
    g.add_argument("--chat-template-file", default=None, metavar="FILE", help="a jinja chat template file")
    p.add_argument("--metrics", action="store_true", help="serve Prometheus metrics on /metrics (default: 501)")
    p.add_argument("--no-slots", action="store_true", help="turn the /slots endpoint off (501)")
    c = p.add_argument_group("running on Ray Serve (pip install 'kvgraph[cluster]')")
    c.add_argument("--replicas", type=POSITIVE, default=None, metavar="N",
                   help="serve N replicas behind Ray Serve's router, each with its own model and batcher "
                        "(default: one process, no Ray)")
    c.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="an existing Ray cluster to deploy on (e.g. 'auto' or ray://head:10001; default: start "
                        "a local Ray instance)")
    c.add_argument("--replica-cpus", type=float, default=1.0, metavar="N",
                   help="CPUs Ray reserves for each replica; also its kernel threads unless --threads (default 1)")
    p.add_argument("--no-prompt-cache", action="store_true",
                   help="run every prompt in full instead of reusing the cells of an idle slot that holds the same "
                        "prefix (a request can also ask for that with cache_prompt: false)")
    p.add_argument("--shutdown-timeout", type=seconds_arg, default=10.0, metavar="SECONDS",
                   help="on SIGTERM/Ctrl-C, how long running requests may finish before they are ended with "
                        "finish_reason 'shutdown' (default 10)")
    p.add_argument("--max-body", type=POSITIVE, default=DEFAULT_MAX_BODY, metavar="BYTES",
                   help=f"largest request body accepted; larger ones get 413 (default {DEFAULT_MAX_BODY >> 20} MiB)")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)


def build_server(args):
    """(app, scheduler) for the parsed arguments; loads the model."""
    from ..engine.batching import BatchScheduler, bucket_sizes, scheduler_context
    from ..server.app import ServerOptions, ServerState, create_app
    from .main import open_llm

    if args.parallel < 1 or args.queue < 0:
        raise InvalidArgumentError("--parallel must be >= 1 and --queue >= 0.")
    llm = open_llm(args)
    per_seq = llm.ctx.n_ctx
    ctx = scheduler_context(llm.loaded, args.parallel, per_seq, n_ubatch=args.ubatch,
                            graph_cache=not args.no_graph_cache,
                            cache_capacity=max(args.graph_cache_size, 2 * len(bucket_sizes(args.parallel)) + 4),
                            verify=args.verify_graph_cache, flash_attn=llm.ctx.flash_attn, cache_type=llm.ctx.cache_type)
    llm.ctx = ctx  # the single-stream context is not used by the server; free its KV cache
    sched = BatchScheduler(ctx, llm.tokenizer, args.parallel, per_seq, args.queue,
                           prefix_cache=not args.no_prompt_cache)
    # Names: --model-id (else the file stem), the -m name as typed (when it is a name, not a path), the stem, aliases.
    typed = [args.model] if args.model and not Path(args.model).expanduser().exists() else []
    aliases = tuple(typed + [llm.model_name] + list(args.alias))
    if args.temp is not None and not 0.0 <= args.temp <= 2.0:
        raise InvalidArgumentError(f"--temp must be between 0 and 2, got {args.temp}.")
    _set_chat_template(llm.tokenizer, args)
    defaults = {"temperature": args.temp, "seed": args.seed,
                "max_tokens": None if args.n_predict == -1 else args.n_predict}
    options = ServerOptions(api_key=args.api_key, cors_origins=tuple(args.cors_origin), metrics=args.metrics,
                            slots=not args.no_slots, defaults={k: v for k, v in defaults.items() if v is not None})
    state = ServerState(sched, llm.tokenizer, args.model_id or llm.model_name, args.max_body, aliases,
                        args.strict_model_names, options)
    return create_app(state), sched


def _set_chat_template(tokenizer, args) -> None:
    if args.chat_template and args.chat_template_file:
        raise InvalidArgumentError("give --chat-template or --chat-template-file, not both.")
    if args.chat_template:
        if args.chat_template not in BUILTIN_TEMPLATES:
            raise InvalidArgumentError(f"--chat-template: unknown template {args.chat_template!r}; built in: "
                                       f"{', '.join(BUILTIN_TEMPLATES)} (or pass a file with --chat-template-file).")
        tokenizer.set_chat_template(BUILTIN_TEMPLATES[args.chat_template], f"builtin:{args.chat_template}")
    elif args.chat_template_file:
        try:
            source = Path(args.chat_template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"--chat-template-file: cannot read {args.chat_template_file!r} ({exc}).") \
                from None
        tokenizer.set_chat_template(source, f"file:{Path(args.chat_template_file).name}")


def host_list(hosts: str) -> list[str]:
    """--host's comma-separated addresses."""
    return [h.strip() for h in hosts.split(",") if h.strip()]


def _bind(hosts: str, port: int) -> list[socket.socket]:
    """A listening socket per address (IPv4 or IPv6), all on port; the first failure is a clear error."""
    import socket     # here: every kvgraph command builds this parser

    socks = []
    try:
        for host in [h.strip("[]") for h in host_list(hosts)]:
            try:
                family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
                sock = socket.socket(family, kind, proto)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
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
    app, sched = build_server(args)
    socks = _bind(args.host, args.port)
    where = ", ".join(f"http://{h}:{args.port}" for h in host_list(args.host))
    print(f"kvgraph: serving {app.state.kv.model_id} on {where} "
          f"({args.parallel} slots, {sched.n_ctx_per_seq} tokens each)", file=sys.stderr)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout + 5)
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
