"""Hostile inputs: token ids out of range at every entry and in every indexing kernel, chat templates that
try to run forever or allocate without bound, sampling values that break the arithmetic, huge or malformed
bodies, and a property-based fuzz of every endpoint against a real server process on loopback.

The template fuzz lives in test_chat_template.py; the CLI cases in test_cli.py; the model cache in
test_registry.py."""
from __future__ import annotations

import json
import threading

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvgraph.errors import IndexOutOfRangeError, KvgraphError
from kvgraph.graph.inputs import UBatch
from test_server import metric, start_server, stop
from tiny_models import TinySpec, write_tiny_llama

BACKENDS = ["numpy", "native", "torch"]


# ---- 1. token ids: every entry point, every backend, every indexing kernel ----------------------------------
@pytest.fixture(scope="module")
def q8_model(tmp_path_factory):
    """A tiny llama with a Q8_0 embedding table, so the native backend's C row gather is used."""
    path = tmp_path_factory.mktemp("q8") / "tiny-q8.gguf"
    write_tiny_llama(path, TinySpec(weight_type="Q8_0"))
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_token_ids_are_refused_at_every_entry(q8_model, backend):
    from kvgraph.api import LLM
    llm = LLM(str(q8_model), backend=backend, n_ctx=64)
    n = llm.n_vocab
    for bad in ([n], [-1], [10 ** 9], [2 ** 40], [True], [1.5]):
        with pytest.raises(IndexOutOfRangeError):
            llm.generate([1, 2] + bad, max_tokens=2)
        with pytest.raises(KvgraphError):
            llm.detokenize(bad)
    for bad in (n, -1):
        ub = UBatch.single([1, bad], 0)
        with pytest.raises(IndexOutOfRangeError, match="outside the vocabulary"):
            llm.ctx.decode(ub)
    # the context is untouched by the refusals
    assert llm.generate([1, 2, 3], max_tokens=3, ignore_eos=True).ids == \
        LLM(str(q8_model), backend=backend, n_ctx=64).generate([1, 2, 3], max_tokens=3, ignore_eos=True).ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_compiled_kernels_refuse_bad_indices_without_the_engine_check(q8_model, backend, monkeypatch):
    """Second line of defence: with Context.decode's check switched off, a bad id reaches the compiled
    program, whose embedding gather (C, numpy or torch's) refuses it instead of reading out of bounds."""
    from kvgraph.api import LLM
    llm = LLM(str(q8_model), backend=backend, n_ctx=64)
    llm.generate([1, 2], max_tokens=1)                    # a graph for 1-token steps exists
    monkeypatch.setattr(UBatch, "check", lambda self, n_vocab: None)
    for bad in (llm.n_vocab, -1, 10 ** 9):
        with pytest.raises(IndexOutOfRangeError, match="outside"):
            llm.ctx.decode(UBatch(np.array([bad], np.int32), np.array([5], np.int32), np.array([0], np.int32),
                                  np.array([0], np.int32)))


def test_native_indexing_kernels_refuse_out_of_range_rows():
    from kvgraph.backends import native
    from kvgraph.backends.native import ops
    from kvgraph.backends.quant_repack import Q8_0Rows
    if native.library() is None:
        pytest.skip(native.why_not())
    src = np.ones((2, 8), np.float32)
    for idx in ([0, 4], [-1, 1], [2 ** 31 - 1, 0]):
        i = np.array(idx, np.int32)
        for transposed, shape in ((False, (4, 8)), (True, (8, 4))):
            d = np.zeros(shape, np.float32)
            with pytest.raises(IndexOutOfRangeError, match="kvg_set_rows"):
                ops.set_rows(d, src, i, transposed, 0)()
            good = [j for j in idx if 0 <= j < 4]      # in-range rows are written, the others skipped
            assert np.count_nonzero(d) == 8 * len(good)
        dst = np.zeros((4, 8), np.float32)
        batched = native.batch([ops.set_rows(dst, src, i, False, 0), ops.set_rows(dst, src, i, False, 0)])
        with pytest.raises(IndexOutOfRangeError, match="kvg_run"):
            batched[0]()
    table = Q8_0Rows(np.zeros((5, 34), np.uint8), (5, 32))
    for ids in ([5], [-1], [0, 2 ** 31 - 1]):
        out = np.full((len(ids), 32), 7, np.float32)
        with pytest.raises(IndexOutOfRangeError):
            ops.embedding_rows(table, np.array(ids, np.int32), out)()
    assert native.library().kvg_take_bad_indices() == 0     # every count was reported and cleared


def test_numpy_indexing_kernels_refuse_negative_and_large_indices():
    """numpy would wrap -1 to the last row: the reference kernels check instead."""
    from kvgraph.backends.reference import KERNELS
    from kvgraph.backends.quant_repack import AnyRows, Q8_0Rows

    class Node:
        def __init__(self, **p):
            self.p = p
    table, out = np.arange(20, dtype=np.float32).reshape(5, 4), np.zeros((1, 4), np.float32)
    readers = [lambda ids: KERNELS["get_rows"](None, out, table, ids),
               lambda ids: Q8_0Rows(np.zeros((5, 34), np.uint8), (5, 32)).kernel(ids, np.zeros((1, 32), np.float32)),
               lambda ids: AnyRows(table, "F32", (5, 4)).kernel(ids, out),
               lambda ids: AnyRows(table.astype(np.float16), "F16", (5, 4)).kernel(ids, out),
               lambda ids: AnyRows(np.zeros((5, 34), np.uint8), "Q8_0", (5, 32)).kernel(
                   ids, np.zeros((1, 32), np.float32))]
    writers = [lambda idx: KERNELS["set_rows"](Node(transposed=False, col=0), None, table, out, idx),
               lambda idx: KERNELS["set_rows"](Node(transposed=False, col=1), None, table, out[:, :2], idx),
               lambda idx: KERNELS["set_rows"](Node(transposed=True, col=0), None, table.T.copy(), out, idx)]
    for bad in (-1, 5, 2 ** 31 - 1):
        ids = np.array([bad], np.int32)
        for make in readers + writers:
            with pytest.raises(IndexOutOfRangeError):
                make(ids)()


def test_logit_bias_keys_are_token_ids():
    from kvgraph.engine.sampling import Sampler, SamplingParams
    from kvgraph.errors import InvalidArgumentError
    logits = np.zeros(10, np.float32)
    assert Sampler(SamplingParams(temperature=0, logit_bias={7: 5.0}), 10).sample(logits) == 7
    assert logits[7] == 0                                        # the caller's logits are left alone
    for bias in ({10: 1.0}, {-1: 1.0}, {3: 101.0}, {3: float("nan")}, {"3": 1.0}, [1, 2]):
        with pytest.raises(InvalidArgumentError, match="logit_bias"):
            Sampler(SamplingParams(logit_bias=bias), 10)


def test_logit_bias_through_the_api_and_the_server(tiny_llama, server):
    from kvgraph.api import LLM
    llm = LLM(str(tiny_llama[0]), n_ctx=64)
    r = llm.create_completion([1, 2], max_tokens=4, temperature=0, ignore_eos=True, logit_bias={7: 100.0})
    assert r["usage"]["completion_tokens"] == 4 and r["choices"][0]["text"] == llm.detokenize([7] * 4)
    body = {"prompt": [1, 2], "max_tokens": 4, "temperature": 0, "ignore_eos": True, "logit_bias": {"7": 100}}
    assert post(server[0], "/v1/completions", body).json()["choices"][0]["text"] == r["choices"][0]["text"]


# ---- 4. sampling values, and one failing sequence never fails the others -------------------------------------
@pytest.mark.parametrize("kw", [dict(repeat_penalty=5e-324), dict(repeat_penalty=1e300), dict(temperature=1e300),
                                dict(temperature=-1.0), dict(top_k=2 ** 40), dict(seed=-5), dict(seed=2 ** 64),
                                dict(min_p=float("inf")), dict(top_p=float("nan")), dict(repeat_last_n=-1)])
def test_sampling_values_outside_their_ranges_are_refused(kw):
    from kvgraph.engine.sampling import SamplingParams
    from kvgraph.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="invalid sampling parameters"):
        SamplingParams(**kw).validate()


def test_non_finite_logits_end_only_that_sequence():
    from kvgraph.engine.sampling import Sampler, SamplingError, SamplingParams
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=1)):
        for logits in ([np.nan] * 3, [0.0, np.inf, 1.0], [0.0, np.nan, 1.0]):
            if logits[1] != logits[1] and not params.greedy and logits[0] == 0:
                continue     # a NaN among finite candidates is dropped by min-p when sampling
            with pytest.raises(SamplingError, match="non-finite"):
                Sampler(params).sample(np.array(logits, np.float32))
    assert Sampler(SamplingParams(seed=-1)).sample(np.array([0.0, 5.0], np.float32)) in (0, 1)   # -1: random


def test_a_failing_sequence_in_a_batch_ends_alone(tiny_llama, monkeypatch):
    from kvgraph.api import LLM
    from kvgraph.engine import batching
    from kvgraph.engine.batching import BatchScheduler, Request
    from kvgraph.engine.context import Context
    from kvgraph.engine.sampling import SamplingParams
    llm = LLM(str(tiny_llama[0]), n_ctx=64)
    ctx = Context(llm.loaded, n_ctx=4 * 64 + 4)
    real = batching.Sampler.sample

    def sample(self, logits, history=()):
        if self.params.seed == 666 and len(history) > 6:       # this request's sampler breaks mid-generation
            raise RuntimeError("constraint engine crashed")
        return real(self, logits, history)
    monkeypatch.setattr(batching.Sampler, "sample", sample)
    sched = BatchScheduler(ctx, llm.tokenizer, parallel=4, n_ctx_per_seq=64)
    try:
        good = [sched.submit(Request(llm.tokenize("the cat"), 12, SamplingParams(temperature=0, seed=i),
                                     ignore_eos=True)) for i in range(3)]
        bad = sched.submit(Request(llm.tokenize("the cat"), 12, SamplingParams(temperature=0, seed=666),
                                   ignore_eos=True))
        results = [r.wait(60) for r in good]
        with pytest.raises(KvgraphError, match="constraint engine crashed"):
            bad.wait(60)
    finally:
        sched.shutdown()
    expected = llm.generate("the cat", max_tokens=12, ignore_eos=True).ids
    assert all(r.ids == expected for r in results)
    assert sched.stats.requests_failed == 1 and sched.stats.requests_finished == 3 and sched.active == 0


# ---- the server: a real process on loopback -------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_llama):
    proc, base = start_server(tiny_llama[0], "--parallel", "2", "--kv-unified-per-slot", "64")
    yield base, proc
    stop(proc)


def post(base, path, body=None, content=None, timeout=60):
    if content is None:
        content = json.dumps(body)
    return httpx.post(base + path, content=content, headers={"content-type": "application/json"}, timeout=timeout)


def assert_error(r, status=400):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    return err["message"]


def healthy(base) -> dict:
    h = httpx.get(base + "/health", timeout=30).json()
    assert h["status"] == "ok"
    return h


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/completions", {"prompt": [1000000000], "max_tokens": 3}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": [-1], "max_tokens": 3}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": [1, 2 ** 70], "max_tokens": 3}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"999999": 5}}, "logit_bias key 999999"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"-1": 5}}, "logit_bias' keys must be token ids"),
    ("/v1/completions", {"prompt": [1] * 100, "max_tokens": 1}, "100 tokens but each sequence holds 64"),
    ("/detokenize", {"tokens": [5, 10 ** 12]}, "outside the vocabulary"),
    ("/detokenize", {"tokens": [-3]}, "outside the vocabulary"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 3, "repeat_penalty": 5e-324}, "repeat_penalty"),
    ("/v1/completions", {"prompt": "hi", "seed": -5}, "seed"),
    ("/v1/completions", {"prompt": "hi", "temperature": 10 ** 4000}, "'temperature' must be between"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1e300}, "'max_tokens' must be between"),
])
def test_hostile_values_get_400_and_the_server_lives(server, path, body, needle):
    base, proc = server
    assert needle in assert_error(post(base, path, body))
    assert proc.poll() is None and healthy(base)["active"] == 0


@pytest.mark.parametrize("content,needle", [
    (b"[" * 100000, "nested too deeply"),
    (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'{"prompt": "hi", "max_tokens": NaN}', "'max_tokens' must be"),
])
def test_bodies_that_break_the_parser_get_400(server, content, needle):
    base, _ = server
    assert needle in assert_error(post(base, "/v1/completions", content=content))


def test_seed_minus_one_is_a_random_seed(server):
    base, _ = server
    r = post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": -1})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_tokenize_and_detokenize_round_trip(server):
    base, _ = server
    toks = post(base, "/tokenize", {"content": "the cat sat"}).json()["tokens"]
    assert toks and post(base, "/detokenize", {"tokens": toks}).json()["content"] == "the cat sat"
    pieces = post(base, "/tokenize", {"content": "the cat", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "the cat"


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_big_bodies_are_refused_without_tokenizing_or_stalling(server):
    base, proc = server
    before = rss_mb(proc.pid)
    # over --max-body (8 MiB by default): 413 from the declared length, nothing read
    assert "--max-body" in assert_error(post(base, "/v1/completions", {"prompt": "x" * (20 << 20)}), 413)
    # under it, but far more text than the 64-token context could hold: refused before the tokenizer runs
    results = {}
    t = threading.Thread(target=lambda: results.update(r=post(base, "/v1/completions",
                                                                {"prompt": "the cat " * (600 << 10)})))
    t.start()
    health = healthy(base)                 # answers while the 5 MB body is in flight
    t.join(120)
    assert "cannot fit the 64 tokens of context" in assert_error(results["r"])
    chat = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (5 << 20)}]})
    assert "over" in assert_error(chat) and health["status"] == "ok"
    assert rss_mb(proc.pid) < before + 150


@pytest.fixture(scope="module")
def hostile_template_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "hostile.gguf"
    template = ("{% if messages[0]['content'] == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}"
                "{% endfor %}{% endfor %}{% elif messages[0]['content'] == 'big' %}{{ 'x' * 10**8 }}"
                "{% elif messages[0]['content'] == 'lipsum' %}{{ lipsum(10**6) }}"
                "{% else %}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% endif %}")
    write_tiny_llama(path, TinySpec(chat_template=template))
    proc, base = start_server(path, "--parallel", "2", "--kv-unified-per-slot", "64")
    yield base, proc
    stop(proc)


@pytest.mark.parametrize("content,needle", [("loop", "steps"), ("big", "100,000,000"), ("lipsum", "lipsum")])
def test_hostile_templates_end_in_400_and_the_server_stays_responsive(hostile_template_server, content, needle):
    base, proc = hostile_template_server
    r = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": content}], "max_tokens": 2})
    assert needle in assert_error(r)
    assert healthy(base)["active"] == 0
    ok = post(base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_sigterm_ends_a_server_that_was_sent_a_hostile_template(tmp_path):
    import signal
    path = tmp_path / "loop.gguf"
    write_tiny_llama(path, TinySpec(chat_template="{% for i in range(100000) %}{% for j in range(100000) %}"
                                                  "{% endfor %}{% endfor %}"))
    proc, base = start_server(path, "--parallel", "1", "-c", "64")
    try:
        assert "steps" in assert_error(post(base, "/v1/chat/completions",
                                            {"messages": [{"role": "user", "content": "x"}]}))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- the fuzz: every endpoint, every field ----------------------------------------------------------------------
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True)
                | st.text(max_size=12))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                             max_size=4),
                           max_leaves=8)
TOKEN_IDS = st.lists(st.integers(-5, 600) | st.integers(-2 ** 64, 2 ** 64), min_size=0, max_size=8)
SMALL_INT = st.integers(-3, 40)


def field(plausible):
    """Absent (None here, dropped below), a plausible value, or any JSON value."""
    return st.none() | plausible | JSON_VALUES


SAMPLING_FIELDS = {
    "max_tokens": field(SMALL_INT), "temperature": field(st.floats(-1, 3)), "top_p": field(st.floats(-0.5, 1.5)),
    "top_k": field(SMALL_INT), "min_p": field(st.floats(-0.5, 1.5)), "repeat_penalty": field(st.floats(0, 200)),
    "seed": field(st.integers(-3, 2 ** 65)), "stop": field(st.lists(st.text(max_size=4), max_size=5)),
    "stream": field(st.booleans()), "ignore_eos": field(st.booleans()), "n": field(st.integers(0, 3)),
    "logprobs": field(st.booleans()), "model": field(st.just("tiny")),
    "logit_bias": field(st.dictionaries(st.integers(-2, 700).map(str), st.floats(-150, 150), max_size=3)),
    "frequency_penalty": field(st.floats(-3, 3)), "presence_penalty": field(st.floats(-3, 3)),
}
MESSAGES = st.lists(st.fixed_dictionaries({"role": field(st.sampled_from(["user", "assistant", "system"])),
                                           "content": field(st.text(max_size=30))}), max_size=3)
ENDPOINTS = {
    "/v1/completions": {"prompt": field(st.text(max_size=40) | TOKEN_IDS), **SAMPLING_FIELDS},
    "/v1/chat/completions": {"messages": field(MESSAGES), **SAMPLING_FIELDS},
    "/tokenize": {"content": field(st.text(max_size=40)), "add_special": field(st.booleans()),
                  "with_pieces": field(st.booleans())},
    "/detokenize": {"tokens": field(TOKEN_IDS)},
}


@st.composite
def request_bodies(draw):
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    body = {k: v for k, v in ((k, draw(s)) for k, s in ENDPOINTS[path].items()) if v is not None}
    if body.get("max_tokens") is None or body["max_tokens"] == 40:
        body.setdefault("max_tokens", 8)     # keep generation short: the fuzz is about parsing, not decoding
    raw = json.dumps(body) if draw(st.integers(0, 9)) else draw(st.sampled_from(
        ["[" * 5000, "{", '"x"', "null", "1e999", json.dumps(body)[: len(json.dumps(body)) // 2]]))
    return path, raw


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama):
    proc, base = start_server(tiny_llama[0], "--parallel", "2", "--kv-unified-per-slot", "64")
    healthy(base)
    post(base, "/v1/completions", {"prompt": "warm up", "max_tokens": 8})
    yield base, proc, rss_mb(proc.pid)
    stop(proc)


@settings(max_examples=160, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=request_bodies())
def test_fuzz_every_endpoint_and_field(fuzz_server, case):
    base, proc, _ = fuzz_server
    path, raw = case
    r = httpx.post(base + path, content=raw, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (path, raw, r.status_code, r.text)
    if r.status_code != 200:
        assert r.json()["error"]["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text


def test_the_fuzzed_server_is_back_at_its_baseline(fuzz_server):
    """After the whole fuzz: alive, every slot free, nothing queued or failed, memory near its baseline."""
    base, proc, baseline = fuzz_server
    assert proc.poll() is None
    h = healthy(base)
    assert h["active"] == 0 and h["queue"] == 0
    assert metric(base, "kvgraph_requests_failed_total") == 0
    assert rss_mb(proc.pid) < baseline + 150
