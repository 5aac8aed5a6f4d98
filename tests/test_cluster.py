"""`kvgraph serve --replicas 2` on a local Ray Serve instance, over loopback: requests reach both replicas,
streaming works through Ray's proxy, a replica killed under load costs no later request and Ray starts a
new one, and SIGTERM takes the whole deployment down."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

from kvgraph.cluster import REPLICA_HEADER  # noqa: E402
from test_server import free_port  # noqa: E402

START_S = 240          # generous deadlines for a loaded 2-core machine: only a hang makes them matter


def post(base, path, body, tries=3):
    """A POST as the openai client makes it: a 5xx (a replica that died under the request) is retried."""
    for attempt in range(tries):
        r = httpx.post(base + path, json=body, timeout=120)
        if r.status_code < 500 or attempt == tries - 1:
            return r


@pytest.fixture(scope="module")
def cluster(tiny_llama, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("ray") / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph.cli.main", "serve", "-m", str(tiny_llama[0]),
                             "--port", str(port), "--model-id", "tiny", "--replicas", "2", "--kv-unified-per-slot", "128",
                             "--parallel", "2", "--replica-cpus", "0.5"],    # fits a 1-core runner too
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + START_S
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"kvgraph serve --replicas exited: {log.read()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the Ray Serve deployment did not come up")
        time.sleep(0.5)
    yield proc, base
    if proc.poll() is None:          # a test failed before the SIGTERM test: take Ray down with it
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)
    log.close()


def replicas_seen(base, n_requests=40) -> set[str]:
    body = {"prompt": "the cat", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(4) as pool:
        rs = list(pool.map(lambda _: post(base, "/v1/completions", body), range(n_requests)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    assert len({r.json()["choices"][0]["text"] for r in rs}) == 1        # every replica answers the same
    return {r.headers[REPLICA_HEADER] for r in rs}


def test_requests_reach_both_replicas_and_stream(cluster):
    _, base = cluster
    # /health answers once one replica is up; on a busy machine the second may still be starting: keep
    # sending until both have answered (a readiness wait, bounded by the start-up allowance)
    seen, deadline = set(), time.time() + START_S
    while len(seen) < 2 and time.time() < deadline:
        seen |= replicas_seen(base)
    assert len(seen) == 2
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    plain = post(base, "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    parts = []
    with httpx.stream("POST", base + "/v1/chat/completions", json=body | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                parts.append(json.loads(line[6:])["choices"][0]["delta"].get("content") or "")
    assert len(parts) > 2 and "".join(parts) == plain


def test_a_killed_replica_costs_no_later_request_and_is_restarted(cluster):
    _, base = cluster
    before = replicas_seen(base)
    victim = sorted(before)[0]
    body = {"prompt": "a dog ran", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    results, stop_load = [], threading.Event()

    def load():
        while not stop_load.is_set():
            results.append(post(base, "/v1/completions", body).status_code)
    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    while len(results) < 3:
        time.sleep(0.05)
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)          # mid-load, on this host
    n_at_kill = len(results)
    after = [post(base, "/v1/completions", body) for _ in range(10)]
    stop_load.set()
    for w in workers:
        w.join(120)
    assert all(r.status_code == 200 for r in after), [r.text for r in after]
    assert len(results) > n_at_kill and all(code == 200 for code in results)   # in flight at the kill: retried
    assert victim not in {r.headers[REPLICA_HEADER] for r in after}
    deadline = time.time() + START_S        # Ray's controller notices and starts a replacement
    while True:
        seen = replicas_seen(base, 12)
        if seen - before:
            break
        assert time.time() < deadline, "Ray did not restart the killed replica"
        time.sleep(1)


def test_sigterm_takes_the_deployment_down(cluster):
    proc, base = cluster
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "/health", timeout=2)


def test_ray_application_builder_reads_serve_flags(tiny_llama):
    """`serve run kvgraph.cluster:build_app model=... replicas=2 metrics=true`: options are serve's flags."""
    from kvgraph.cluster import build_app
    from kvgraph.errors import KvgraphError
    app = build_app({"model": str(tiny_llama[0]), "replicas": "2", "metrics": "true", "kv_unified_per_slot": "64"})
    dep = app._bound_deployment
    assert dep.name == "kvgraph" and dep.num_replicas == 2
    with pytest.raises((KvgraphError, SystemExit)):
        build_app({"model": str(tiny_llama[0]), "replicas": "0"})


def test_replicas_take_one_host(tiny_llama, capsys):
    from kvgraph.cli.main import main
    assert main(["serve", "-m", str(tiny_llama[0]), "--replicas", "2", "--host", "127.0.0.1,::1"]) != 0
    assert "--host takes one address" in capsys.readouterr().err
