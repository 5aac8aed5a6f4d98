"""The OpenAI-compatible server as a real process on loopback, driven by the official `openai` client:
endpoints, streaming, concurrency equal to sequential results, OpenAI-style errors, disconnects that free
their slot, /metrics, and SIGTERM draining in-flight requests."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path, *extra) -> tuple[subprocess.Popen, str]:
    """A `kvgraph serve` process and its URL; its log goes to a file (server_log reads it), not a pipe nobody
    drains, which would block the server once full."""
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph.cli.main", "serve", "-m", str(model_path),
                             "--port", str(port), "--model-id", "tiny", "--metrics", *extra],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {server_log(proc)}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def server_log(proc) -> str:
    proc.log.seek(0)
    return proc.log.read()


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def server(tiny_llama):
    proc, base = start_server(tiny_llama[0], "--parallel", "4", "-c", "512")
    yield base
    stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    from kvgraph.api import LLM
    llm = LLM(str(tiny_llama[0]), n_ctx=128)

    def greedy(prompt, n):
        llm.session.reset()
        return llm.generate(prompt, max_tokens=n, ignore_eos=True).text
    return greedy, llm


def test_models_and_health(client, server):
    # One model, as llama-server lists it; requests may also name it by its file stem.
    assert [(m.id, m.aliases, m.tags) for m in client.models.list().data] == [("tiny", [], [])]
    assert httpx.get(server + "/health").json()["slots"] == 4


def test_completion_equals_local_greedy(client, reference):
    r = client.completions.create(model="tiny", prompt="the cat sat", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == reference[0]("the cat sat", 12)
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"


def test_prefix_cache_in_usage_and_slots(client, server):
    """A repeated conversation reuses the idle slot's cells: usage reports them as cached_tokens (the reply
    does not change); cache_prompt false runs the prompt in full."""
    msgs = [{"role": "user", "content": "tell me about the prefix cache"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**kw)
    again = client.chat.completions.create(**kw)
    cold = client.chat.completions.create(**kw | {"extra_body": {"ignore_eos": True, "cache_prompt": False}})
    n = first.usage.prompt_tokens
    assert again.usage.prompt_tokens == n and again.usage.prompt_tokens_details.cached_tokens == n - 1
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert first.choices[0].message.content == again.choices[0].message.content == cold.choices[0].message.content
    slots = httpx.get(server + "/slots").json()
    assert max(s["n_cached_tokens"] for s in slots) >= n
    assert metric(server, "kvgraph_prompt_tokens_cached_total") >= n - 1


def test_chat_stream_equals_plain(client):
    msgs = [{"role": "user", "content": "hello there"}]
    plain = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                           extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    parts, reasons = [], []
    for chunk in stream:
        parts.append(chunk.choices[0].delta.content or "")
        reasons.append(chunk.choices[0].finish_reason)
    assert "".join(parts) == plain.choices[0].message.content and reasons[-1] == "length"


def test_concurrent_requests_equal_sequential_results(client, reference):
    prompts = [f"the {w} ran in the sun" for w in ("cat", "dog", "hen", "man", "cow", "fox", "rat", "bee")]
    expected = [reference[0](p, 16) for p in prompts]
    results = [None] * len(prompts)

    def one(i):
        results[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=16, temperature=0,
                                               extra_body={"ignore_eos": True}).choices[0].text
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected


@pytest.mark.parametrize("body,needle", [
    ({"prompt": "x" * 2000, "max_tokens": 10}, "context"),
    ({"prompt": "x", "temperature": "hot"}, "'temperature' must be a number"),
    ({"prompt": "x", "top_p": 5}, "'top_p' must be between"),
    ({"prompt": "x", "tools": [{"type": "function"}]}, "'tools' works with chat completions"),
    ({"prompt": "x", "suffix": "y"}, "'suffix' is not supported"),
    ({"prompt": "x", "echo": 1}, "'echo' must be true or false"),
    ({"prompt": "x", "logprobs": 99}, "'logprobs' must be between 0 and 20"),
    ({"max_tokens": 3}, "'prompt' must be"),
    ({"prompt": "x", "n": 9}, "n = 9 choices need as many sequence slots"),
    ({"prompt": "x", "n": 0}, "'n' must be between"),
])
def test_bad_requests_get_openai_error_bodies(server, body, needle):
    r = httpx.post(server + "/v1/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    # A prompt too long for its slot gets llama-server's type for it (OpenAI clients read the message).
    kind = "exceed_context_size_error" if needle == "context" else "invalid_request_error"
    assert needle in err["message"] and err["type"] == kind


def test_malformed_json_and_bad_messages(server):
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/chat/completions", json={"messages": "hi"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def metric(server, name) -> float:
    for line in httpx.get(server + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


@pytest.fixture(scope="module")
def long_server(tiny_llama):
    """One slot with a 32k-token context: a request asking for all of it takes seconds even on a fast
    machine, so a client that leaves after the first chunk is always gone before generation ends."""
    proc, base = start_server(tiny_llama[0], "--parallel", "1", "-c", "32768")
    yield base
    stop(proc)


def assert_cancelled_and_freed(server, cancelled_before: float, generated_before: float) -> None:
    """The request whose client left was cancelled (not finished: fewer than its 32000 tokens) and its slot
    is free again."""
    deadline = time.time() + 60      # a bound for a hang, not a speed check: the slot frees within ~0.25 s
    while time.time() < deadline and (metric(server, "kvgraph_active_slots") > 0 or
                                      metric(server, "kvgraph_requests_cancelled_total") <= cancelled_before):
        time.sleep(0.1)
    assert metric(server, "kvgraph_active_slots") == 0
    assert metric(server, "kvgraph_requests_cancelled_total") == cancelled_before + 1
    assert metric(server, "kvgraph_generated_tokens_total") - generated_before < 32000


def test_client_disconnect_mid_stream_frees_its_slot(long_server):
    before = metric(long_server, "kvgraph_requests_cancelled_total")
    with httpx.stream("POST", long_server + "/v1/completions",
                      json={"prompt": "the cat", "max_tokens": 32000, "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break       # leave after the first chunk
    assert_cancelled_and_freed(long_server, before, 0)


def test_client_that_leaves_a_non_streaming_request_frees_its_slot(long_server):
    """Nothing is written to a non-streaming client until the end, so only asking whether it is still there
    notices it left: the slot must not decode on to max_tokens (it did, tokens flowing, for 80 s and more)."""
    before = metric(long_server, "kvgraph_requests_cancelled_total")
    generated = metric(long_server, "kvgraph_generated_tokens_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(long_server + "/v1/completions", timeout=1.0,
                   json={"prompt": "the cat", "max_tokens": 32000, "ignore_eos": True})
    assert_cancelled_and_freed(long_server, before, generated)


def test_metrics_are_prometheus_text(server):
    text = httpx.get(server + "/metrics").text
    for name in ("kvgraph_requests_total", "kvgraph_generated_tokens_total", "kvgraph_decode_tokens_per_second",
                 "kvgraph_queue_depth", "kvgraph_graph_cache_hits_total", "kvgraph_graph_cache_misses_total"):
        assert f"# TYPE {name} " in text
    assert metric(server, "kvgraph_graph_cache_hits_total") > 0


def test_full_queue_answers_503(tiny_llama):
    from fastapi.testclient import TestClient
    from kvgraph.cli.main import build_parser
    from kvgraph.cli.serve_cmd import build_server

    args = build_parser().parse_args(["serve", "-m", str(tiny_llama[0]), "--parallel", "1", "--queue", "0"])
    app, sched = build_server(args)
    try:
        r = TestClient(app).post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
    finally:
        sched.shutdown()


def sigterm_mid_stream(proc, base, max_tokens: int) -> list[str]:
    """Stream a completion, SIGTERM the server once tokens flow; the SSE payloads received, and the
    server has exited (uvicorn re-raises the signal after the drain: a SIGTERM exit is fine too)."""
    lines: list[str] = []
    started = threading.Event()

    def consume():
        with httpx.stream("POST", base + "/v1/completions", timeout=120, json={
                "prompt": "the cat", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
                    started.set()
    t = threading.Thread(target=consume)
    t.start()
    assert started.wait(30)
    proc.send_signal(signal.SIGTERM)
    t.join(120)
    assert proc.wait(60) in (0, -signal.SIGTERM)
    return lines


def test_sigterm_drains_in_flight_requests(tiny_llama):
    proc, base = start_server(tiny_llama[0], "--parallel", "2")
    lines = sigterm_mid_stream(proc, base, 200)
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(x)["choices"][0] for x in lines[:-1]]
    assert chunks[-1]["finish_reason"] == "length" and "".join(c["text"] for c in chunks)


# ---- what clients of llama-server and vLLM expect ----------------------------------------------------------------
def test_any_model_name_is_served_and_strict_mode_answers_404(tiny_llama, server):
    r = httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "model": "gpt-3.5-turbo"})
    assert r.status_code == 200 and r.json()["model"] == "tiny"
    r = httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "model": "tiny-llama"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-llama"
    proc, base = start_server(tiny_llama[0], "--strict-model-names", "--alias", "my-model", "--alias", "other")
    try:
        models = httpx.get(base + "/models").json()["data"]
        assert [(m["id"], m["aliases"]) for m in models] == [("tiny", ["my-model", "other"])]
        assert httpx.post(base + "/completions", json={"prompt": "x", "max_tokens": 1,
                                                       "model": "my-model"}).status_code == 200
        r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                            "model": "gpt-3.5-turbo"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    finally:
        stop(proc)


def test_routes_without_v1(server):
    assert httpx.get(server + "/models").json()["data"][0]["id"] == "tiny"
    r = httpx.post(server + "/completions", json={"prompt": "the cat", "n_predict": 3})   # llama-server's native
    assert r.status_code == 200 and r.json()["tokens_predicted"] == 3 and "content" in r.json()
    r = httpx.post(server + "/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                       "max_tokens": 3})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_max_tokens_zero_answers_at_once_and_frees_the_slot(server):
    r = httpx.post(server + "/v1/completions", json={"prompt": "the cat", "max_tokens": 0}, timeout=30)
    assert r.status_code == 200
    body = r.json()
    assert body["choices"][0]["text"] == "" and body["usage"]["completion_tokens"] == 0
    assert metric(server, "kvgraph_active_slots") == 0


def test_stream_shape_role_first_fingerprint_and_usage(server):
    with httpx.stream("POST", server + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert all(c["system_fingerprint"] == "kvgraph" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_several_host_addresses(tiny_llama):
    import socket as sk
    if not sk.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph.cli.main", "serve", "-m", str(tiny_llama[0]),
                             "--host", "127.0.0.1,::1", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        try:
            v6 = httpx.get(f"http://[::1]:{port}/health", timeout=5).status_code
        except httpx.ConnectError:
            pytest.skip("::1 is not reachable on this machine")
        assert v6 == 200
    finally:
        stop(proc)


def test_sigterm_ends_running_requests_after_the_shutdown_timeout(tiny_llama):
    """A request that would run for minutes: after --shutdown-timeout it ends with finish_reason 'shutdown',
    its response completes, and the process exits."""
    proc, base = start_server(tiny_llama[0], "--parallel", "1", "-c", "32768", "--shutdown-timeout", "1")
    lines = sigterm_mid_stream(proc, base, 32000)
    assert lines[-1] == "[DONE]"
    assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "shutdown"


def test_api_key_cors_and_switchable_endpoints(tiny_llama, monkeypatch):
    monkeypatch.setenv("KVGRAPH_API_KEY", "s3cret")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kvgraph.cli.main", "serve", "-m", str(tiny_llama[0]),
                             "--port", str(port), "--cors-origin", "http://localhost:3000", "--no-slots"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:     # /health needs no key
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.2)
        body = {"prompt": "x", "max_tokens": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.post(base + "/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(base + "/v1/models").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.post(base + "/v1/completions", json=body, headers=ok).status_code == 200
        client = openai.OpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
        assert client.models.list().data[0].id == "tiny-llama"
        # CORS: the configured origin is allowed (preflight needs no key), any other gets no CORS headers
        pre = httpx.options(base + "/v1/completions", headers={
            "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        r = httpx.get(base + "/props", headers=ok | {"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers and r.json()["total_slots"] == 4
        assert httpx.get(base + "/slots", headers=ok).status_code == 501          # --no-slots
        assert httpx.get(base + "/metrics", headers=ok).status_code == 501        # no --metrics
    finally:
        stop(proc)


def test_props_slots_apply_template_and_metrics_paths(server):
    slots = httpx.get(server + "/slots").json()
    assert [s["id"] for s in slots] == [0, 1, 2, 3] and not any(s["is_processing"] for s in slots)
    props = httpx.get(server + "/props").json()
    assert props["n_ctx"] == 128 and props["model_alias"] == "tiny" and "im_start" in props["chat_template"]
    r = httpx.post(server + "/apply-template", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.json()["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    for i in range(50):                                   # made-up paths do not grow the metrics table
        httpx.get(server + f"/no/such/path/{i}")
    text = httpx.get(server + "/metrics").text
    assert 'path="other"' in text and "/no/such/path" not in text


def test_llama_server_native_completion(server, reference):
    want = reference[0]("the cat sat", 8)
    r = httpx.post(server + "/completion", json={"prompt": "the cat sat", "n_predict": 8, "temperature": 0,
                                                 "ignore_eos": True, "return_tokens": True, "cache_prompt": True})
    body = r.json()
    assert r.status_code == 200 and body["content"] == want and body["stop"] is True
    assert body["tokens_predicted"] == 8 == len(body["tokens"]) and body["stop_type"] == "limit"
    t = body["timings"]           # an earlier test's prompt may be reused from the prefix cache
    assert t["predicted_n"] == 8 and t["cache_n"] + t["prompt_n"] == body["tokens_evaluated"] and t["prompt_n"] >= 1
    ids = httpx.post(server + "/tokenize", json={"content": "the cat sat"}).json()["tokens"]
    by_ids = httpx.post(server + "/completion", json={"prompt": ids, "n_predict": 8, "temperature": 0,
                                                      "ignore_eos": True}).json()
    assert by_ids["content"] == want
    with httpx.stream("POST", server + "/completion", json={"prompt": "the cat sat", "n_predict": 8,
                                                            "temperature": 0, "ignore_eos": True,
                                                            "stream": True}) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert "".join(e["content"] for e in events) == want and events[-1]["stop"] and not events[0]["stop"]
    stopped = httpx.post(server + "/completion", json={"prompt": "the cat sat", "n_predict": 8, "temperature": 0,
                                                       "ignore_eos": True, "stop": [want[2:5]]}).json()
    assert stopped["stop_type"] == "word" and stopped["stopping_word"] == want[2:5]
    probs = httpx.post(server + "/completion", json={"prompt": "the cat sat", "n_predict": 3, "temperature": 0,
                                                     "ignore_eos": True, "n_probs": 2}).json()
    cp = probs["completion_probabilities"]
    assert len(cp) == 3 and all(len(p["top_logprobs"]) == 2 and p["top_logprobs"][0]["id"] == p["id"] for p in cp)
    assert httpx.post(server + "/completion", json={"prompt": "x", "n_probs": 99}).status_code == 400


def test_openai_responses_carry_timings(client):
    r = client.completions.create(model="tiny", prompt="the cat", max_tokens=3, extra_body={"ignore_eos": True})
    assert r.model_extra["timings"]["predicted_n"] == 3


def test_server_side_defaults_and_chat_template_file(tiny_llama, tmp_path, reference):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    proc, base = start_server(tiny_llama[0], "--temp", "0", "--n-predict", "5", "--seed", "3",
                              "--chat-template-file", str(template))
    try:
        r = httpx.post(base + "/v1/completions", json={"prompt": "the cat sat", "ignore_eos": True}).json()
        assert r["usage"]["completion_tokens"] == 5 and r["choices"][0]["text"] == reference[0]("the cat sat", 5)
        native = httpx.post(base + "/completion", json={"prompt": "the cat sat", "ignore_eos": True}).json()
        assert native["tokens_predicted"] == 5 and native["content"] == r["choices"][0]["text"]
        prompt = httpx.post(base + "/apply-template", json={"messages": [{"role": "user", "content": "hi"}]})
        assert prompt.json()["prompt"] == "[user] hi\n"
        assert httpx.get(base + "/props").json()["chat_template_source"] == "file:t.jinja"
    finally:
        stop(proc)
    bad = subprocess.run([sys.executable, "-m", "kvgraph.cli.main", "serve", "-m", str(tiny_llama[0]),
                          "--chat-template", "nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "'nope' is not a template name; built in: chatml, gemma, llama3" in bad.stderr and "Traceback" not in bad.stderr


def test_logprobs_and_echo(server, reference):
    """Token logprobs equal log-softmax of the reference logits; echo gives the prompt's (what
    lm-evaluation-harness's local-completions needs for log-likelihoods)."""
    import numpy as np
    _, llm = reference
    ids = llm.tokenize("the cat sat on")
    full = llm.logits(ids)
    lsm = full - np.log(np.exp(full - full.max(-1, keepdims=True)).sum(-1, keepdims=True)) - full.max(-1, keepdims=True)
    r = httpx.post(server + "/v1/completions", json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 2,
                                                     "temperature": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == llm.detokenize(ids) and lp["token_logprobs"][0] is None
    assert len(lp["tokens"]) == len(ids) and lp["text_offset"][0] == 0
    np.testing.assert_allclose(lp["token_logprobs"][1:], [lsm[i, ids[i + 1]] for i in range(len(ids) - 1)], atol=1e-4)
    assert all(1 <= len(t) <= 2 for t in lp["top_logprobs"][1:])   # keyed by text: pieces may collide
    # generated tokens: chat, plain and streamed agree
    msgs = [{"role": "user", "content": "hi"}]
    plain = httpx.post(server + "/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "temperature": 0,
                                                              "ignore_eos": True, "logprobs": True,
                                                              "top_logprobs": 3}).json()
    content = plain["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 3 for c in content)
    assert all(c["top_logprobs"][0]["logprob"] >= c["logprob"] - 1e-6 for c in content)    # greedy: the best
    with httpx.stream("POST", server + "/v1/chat/completions", json={
            "messages": msgs, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": True,
            "top_logprobs": 3, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = [c for ch in chunks if ch["choices"] and ch["choices"][0]["logprobs"]
                for c in ch["choices"][0]["logprobs"]["content"]]
    assert [c["token"] for c in streamed] == [c["token"] for c in content]
    np.testing.assert_allclose([c["logprob"] for c in streamed], [c["logprob"] for c in content], atol=1e-5)
    bad = httpx.post(server + "/v1/chat/completions", json={"messages": msgs, "top_logprobs": 2})
    assert bad.status_code == 400 and "needs 'logprobs'" in bad.json()["error"]["message"]


def test_n_choices_share_one_prefill_and_are_reproducible_per_seed(server, reference):
    greedy = reference[0]("the cat sat", 6)
    r = httpx.post(server + "/v1/completions", json={"prompt": "the cat sat", "max_tokens": 6, "n": 3,
                                                     "temperature": 0, "ignore_eos": True}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2] and all(c["text"] == greedy for c in r["choices"])
    assert r["usage"]["completion_tokens"] == 18
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "n": 3, "temperature": 1.0,
            "seed": 42, "ignore_eos": True}
    a = httpx.post(server + "/v1/chat/completions", json=body).json()["choices"]
    b = httpx.post(server + "/v1/chat/completions", json=body).json()["choices"]
    assert [c["message"]["content"] for c in a] == [c["message"]["content"] for c in b]      # per-choice seeds
    assert len({c["message"]["content"] for c in a}) > 1                                     # ... that differ
    with httpx.stream("POST", server + "/v1/chat/completions", json=body | {"stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    texts = ["", "", ""]
    for ch in chunks:
        texts[ch["choices"][0]["index"]] += ch["choices"][0]["delta"].get("content") or ""
    assert texts == [c["message"]["content"] for c in a]
    assert metric(server, "kvgraph_active_slots") == 0


def test_structured_output_json_schema_json_object_and_gbnf(server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150}},
              "required": ["name", "age"], "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": "a person"}], "max_tokens": 60, "temperature": 1.0,
            "seed": 3, "n": 3, "response_format": {"type": "json_schema",
                                                   "json_schema": {"name": "person", "schema": schema, "strict": True}}}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=120).json()
    for choice in r["choices"]:                 # every sequence of the batch follows its own grammar state
        assert choice["finish_reason"] == "stop", choice
        obj = json.loads(choice["message"]["content"])
        assert set(obj) == {"name", "age"} and isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
    # any JSON object: a random model may write one without end, so look at several seeds: every answer that
    # stops is an object, every answer cut by max_tokens is the start of one
    finished = 0
    for seed in range(8):
        choice = httpx.post(server + "/v1/completions", json={
            "prompt": "{", "max_tokens": 40, "temperature": 1.0, "seed": seed,
            "response_format": {"type": "json_object"}}).json()["choices"][0]
        assert choice["text"].startswith("{")
        if choice["finish_reason"] == "stop":
            finished += 1
            assert isinstance(json.loads(choice["text"]), dict)
    assert finished
    gbnf = 'root ::= ("yes" | "no") "!"'
    native = httpx.post(server + "/completion", json={"prompt": "ok?", "n_predict": 10, "grammar": gbnf}).json()
    assert native["content"] in ("yes!", "no!")
    for bad in ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
                {"grammar": "root ::= ("}, {"response_format": {"type": "xml"}},
                {"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}):
        r = httpx.post(server + "/v1/completions", json={"prompt": "x"} | bad)
        assert r.status_code == 400, (bad, r.text)


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}]


def test_tools_forced_calls_follow_the_function_schema(long_server):
    # the tools' description makes a long prompt for the tiny byte-level vocabulary: the 32k-context server
    client = openai.OpenAI(base_url=long_server + "/v1", api_key="none", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, tools=WEATHER, max_tokens=300, seed=2,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "get_weather"
    args = json.loads(choice.message.tool_calls[0].function.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f")
    # the call goes back into the conversation with its result, through the chat template
    follow = msgs + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "sunny"}]
    again = client.chat.completions.create(model="tiny", messages=follow, tools=WEATHER, max_tokens=5)
    assert again.choices[0].finish_reason in ("length", "stop", "tool_calls")
    required = client.chat.completions.create(model="tiny", messages=msgs, tools=WEATHER, max_tokens=300, seed=5,
                                              tool_choice="required", stream=True)
    parts = list(required)
    calls = [tc for p in parts if p.choices and p.choices[0].delta.tool_calls for tc in p.choices[0].delta.tool_calls]
    assert calls and calls[0].function.name in ("get_weather", "noop")
    assert [p.choices[0].finish_reason for p in parts if p.choices][-1] == "tool_calls"


def test_tool_calls_are_parsed_from_hermes_format():
    from kvgraph.openai_compat import split_tool_calls
    content, calls = split_tool_calls('Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n'
                                      '</tool_call>\n<tool_call>{"name": "g", "arguments": {}}</tool_call>')
    assert content == "Let me look." and [c["function"]["name"] for c in calls] == ["f", "g"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    assert split_tool_calls("no <tool_call>{bad json}</tool_call>") == ("no <tool_call>{bad json}</tool_call>", [])


def test_the_openai_client_with_logprobs_n_and_json_schema(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                       n=2, logprobs=True, top_logprobs=2, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert len(r.choices) == 2 and r.choices[0].message.content == r.choices[1].message.content
    assert all(len(c.logprobs.content) == 4 for c in r.choices)
    c = client.completions.create(model="tiny", prompt="the cat", max_tokens=3, logprobs=1, echo=True,
                                  temperature=0)
    assert c.choices[0].text.startswith("the cat") and c.choices[0].logprobs.token_logprobs[0] is None
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    j = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "ok?"}], max_tokens=20,
                                       response_format={"type": "json_schema", "json_schema": {
                                           "name": "answer", "schema": schema, "strict": True}})
    assert isinstance(json.loads(j.choices[0].message.content)["ok"], bool)
