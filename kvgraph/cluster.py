"""kvgraph on a Ray Serve cluster: N replicas of the same server app, each with its own copy of the model and
its own continuous batcher, behind Ray Serve's HTTP proxy and router (which spreads requests over replicas
and restarts one that dies). `kvgraph serve --replicas N` runs it on a local Ray instance or, with
--ray-address, on an existing cluster; `serve run kvgraph.cluster:build_app model=NAME replicas=N` deploys
it from Ray's own CLI (`kvgraph.cluster:app` is the default model with one replica)."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from .cli.serve_cmd import host_list
from .errors import InvalidArgumentError, KvgraphError

REPLICA_HEADER = "x-kvgraph-replica"     # which replica answered (host:pid): logs, tests, load checks


def _require_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise KvgraphError("running replicas needs Ray Serve: pip install 'kvgraph[cluster]'.") from None
    return ray, serve


def _tagged(app, replica: str):
    """The ASGI app with every HTTP response naming the replica that produced it."""
    tag = (REPLICA_HEADER.encode(), replica.encode())

    async def tagged(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), tag])
            await send(message)
        await app(scope, receive, send_tagged)
    return tagged


def application(args: argparse.Namespace):
    """The Ray Serve application for parsed `kvgraph serve` arguments: args.replicas replicas, each loading the
    model itself when Ray starts it (so a model name is pulled on whichever node the replica lands)."""
    _, serve = _require_ray()
    args.replicas = args.replicas or 1      # --ray-address alone: one replica
    cpus = float(args.replica_cpus)
    if cpus <= 0:
        raise InvalidArgumentError(f"--replica-cpus must be > 0, got {cpus}.")
    if args.model and os.path.exists(os.path.expanduser(args.model)):   # replicas may start in another folder
        args.model = os.path.abspath(os.path.expanduser(args.model))
    if args.threads is None:             # one kernel thread per CPU Ray gives the replica, not per core
        args.threads = max(1, int(cpus))

    def build_replica_app():
        from .cli.serve_cmd import build_server
        app, _ = build_server(args)
        return _tagged(app, f"{socket.gethostname()}:{os.getpid()}")

    ingress = serve.ingress(build_replica_app)()
    deployment = serve.deployment(ingress, name="kvgraph", num_replicas=args.replicas,
                                  max_ongoing_requests=args.parallel + args.queue,
                                  ray_actor_options={"num_cpus": cpus})
    return deployment.bind()


def build_app(options: dict) -> object:
    """Ray Serve's application builder (`serve run kvgraph.cluster:build_app model=NAME replicas=2 ...`): the
    options are `kvgraph serve`'s flags without dashes (`ctx_size=2048`, `api_key=...`, `metrics=true`)."""
    from .cli.main import build_parser

    argv = ["serve"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if str(value).lower() in ("true", "false"):
            argv += [flag] if str(value).lower() == "true" else []
        elif key == "model":
            argv += ["-m", str(value)]
        else:
            argv += [flag, str(value)]
    return application(build_parser().parse_args(argv))


def __getattr__(name: str):
    if name == "app":                    # `serve run kvgraph.cluster:app`: built when Ray asks for it
        return build_app({})
    raise AttributeError(name)


def run(args: argparse.Namespace) -> int:
    """`kvgraph serve --replicas N`: deploy on Ray (a local instance, or --ray-address's cluster) and serve
    until SIGTERM / Ctrl-C, then take the application down."""
    ray, serve = _require_ray()
    hosts = host_list(args.host)
    if len(hosts) != 1:
        raise InvalidArgumentError("with --replicas, --host takes one address (Ray Serve's proxy binds one).")
    ray.init(address=args.ray_address, include_dashboard=False, log_to_driver=False,
             configure_logging=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": hosts[0], "port": args.port})
        serve.run(application(args), name="kvgraph", route_prefix="/", blocking=False)
        print(f"kvgraph: serving on http://{hosts[0]}:{args.port} with {args.replicas} Ray Serve replicas "
              f"({args.parallel} slots each)", file=sys.stderr, flush=True)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        try:
            if args.ray_address is None:       # the local Ray instance this command started goes with it
                serve.shutdown()
            else:                              # on a shared cluster only this application goes
                serve.delete("kvgraph")
        finally:
            ray.shutdown()
    return 0
