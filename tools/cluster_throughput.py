"""Aggregate decode throughput of `kvgraph serve` as one process and on Ray Serve with 1 and 2 replicas:
each setup gets the same concurrent completions (greedy, ignore_eos) and reports generated tokens per
second of wall time. On one machine this measures Ray's overhead and how replicas share the cores, not
scaling across machines. Usage: python tools/cluster_throughput.py [model] [--requests 16] [--tokens 64]"""
from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from kvgraph.registry import DEFAULT_MODEL, resolve_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(model: str, extra: list[str], n_requests: int, n_tokens: int, concurrency: int) -> tuple[float, set]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph.cli.main", "serve", "-m", model, "--port", str(port),
                             "-c", "512", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"server {extra} did not start")
            time.sleep(0.5)
        body = {"prompt": "Once upon a time", "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True}

        def one(_):
            r = httpx.post(base + "/v1/completions", json=body, timeout=600)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"], r.headers.get("x-kvgraph-replica", "-")
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(concurrency)))              # warm-up: graphs, kernels, pages
            t0 = time.perf_counter()
            out = list(pool.map(one, range(n_requests)))
            wall = time.perf_counter() - t0
        return sum(n for n, _ in out) / wall, {r for _, r in out}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    model = str(resolve_model(args.model, progress=False))
    setups = [("one process, --parallel 8", ["--parallel", "8"]),
              ("Ray Serve, 1 replica x 8 slots (2 CPUs)", ["--replicas", "1", "--parallel", "8", "--replica-cpus", "2"]),
              ("Ray Serve, 2 replicas x 4 slots (1 CPU each)", ["--replicas", "2", "--parallel", "4"])]
    for name, extra in setups:
        tps, replicas = measure(model, extra, args.requests, args.tokens, args.concurrency)
        print(f"{name:48s} {tps:7.1f} tokens/s  ({len(replicas)} replica(s) answered)", flush=True)


if __name__ == "__main__":
    main()
