"""`kvgraph serve`: the OpenAI-compatible server with continuous batching."""
from __future__ import annotations

import sys

from ..errors import InvalidArgumentError, KvgraphError
from ..openai_compat import DEFAULT_MAX_BODY
from .args import NON_NEGATIVE, POSITIVE, port_arg


def add_serve_parser(sub, add_model_args) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=port_arg, default=8080, help="port (default 8080)")
    p.add_argument("--parallel", "-np", type=POSITIVE, default=4, help="sequences decoded together (default 4)")
    p.add_argument("--queue", type=NON_NEGATIVE, default=64, help="requests that may wait for a slot (default 64)")
    p.add_argument("--model-id", default=None, help="name clients use in 'model' (default: the file name)")
    p.add_argument("--max-body", type=POSITIVE, default=DEFAULT_MAX_BODY, metavar="BYTES",
                   help=f"largest request body accepted; larger ones get 413 (default {DEFAULT_MAX_BODY >> 20} MiB)")
    add_model_args(p)
    p.set_defaults(func=cmd_serve)


def build_server(args):
    """(app, scheduler) for the parsed arguments; loads the model."""
    from ..engine.batching import BatchScheduler, bucket_sizes
    from ..engine.context import Context
    from ..server.app import ServerState, create_app
    from .main import open_llm

    if args.parallel < 1 or args.queue < 0:
        raise InvalidArgumentError("--parallel must be >= 1 and --queue >= 0.")
    llm = open_llm(args)
    per_seq = llm.ctx.n_ctx
    # Every slot gets a full context; padding rows of a decode bucket need one cell each for a step.
    cells = per_seq * args.parallel + max(bucket_sizes(args.parallel))
    ctx = Context(llm.loaded, n_ctx=cells, n_ubatch=args.ubatch, graph_cache=not args.no_graph_cache,
                  cache_capacity=max(args.graph_cache_size, 2 * len(bucket_sizes(args.parallel)) + 4),
                  verify=args.verify_graph_cache, flash_attn=llm.ctx.flash_attn)
    llm.ctx = ctx  # the single-stream context is not used by the server; free its KV cache
    sched = BatchScheduler(ctx, llm.tokenizer, args.parallel, per_seq, args.queue)
    state = ServerState(sched, llm.tokenizer, args.model_id or llm.model_name, args.max_body)
    return create_app(state), sched


def cmd_serve(args) -> int:
    try:
        import uvicorn
    except ImportError:
        raise KvgraphError("the server needs FastAPI and uvicorn: pip install 'kvgraph[server]'.") from None
    app, sched = build_server(args)
    print(f"kvgraph: serving {app.state.kv.model_id} on http://{args.host}:{args.port} "
          f"({args.parallel} slots, {sched.n_ctx_per_seq} tokens each)", file=sys.stderr)
    try:
        # uvicorn handles SIGTERM/SIGINT: it stops accepting, lets in-flight requests finish, then returns.
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=None)
    except OSError as exc:
        raise KvgraphError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); pick another --port.") from None
    finally:
        sched.shutdown(drain=True, timeout=60)
    return 0
