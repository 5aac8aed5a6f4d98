"""kvgraph serve as a drop-in for llama-server: its command line (every flag taken, ignored with a notice, or
refused with a reason), -c's meaning, CORS, its routes and fields, chat templates by name, prefill, reasoning
models (templates rendered with thinking on and off, thoughts split into reasoning_content)."""
from __future__ import annotations

import json
import random
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from kvgraph.cli.llama_flags import classify, llama_server_flags
from kvgraph.cli.main import build_parser, main
from kvgraph.openai_compat import ReasoningFormat, ReasoningSplitter
from kvgraph.server.cors import CorsPolicy, origin_is_localhost
from kvgraph.tokenizer.chat import ChatTemplate

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).parent / "data" / "templates"


def serve_args(*argv):
    return build_parser().parse_args(["serve", *argv])


# ---- the command line ---------------------------------------------------------------------------------------------
def test_every_llama_server_flag_is_taken_ignored_or_refused(capsys):
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    for entry in llama_server_flags():
        value = [] if entry["value"] is None or entry["value"].startswith("[") else \
            ["1", "2"] if entry["value"] == "START END" else ["1"]
        for name in entry["names"]:
            take = classify(name)
            assert name in serve._option_string_actions, name      # never 'unrecognized'
            if take.kind == "ignored":
                args = parser.parse_args(["serve", name, *value])
                assert (name, take.note) in args.ignored_flags
            elif take.kind == "refused":
                with pytest.raises(SystemExit) as e:
                    parser.parse_args(["serve", name, *value])
                assert e.value.code == 2
                err = capsys.readouterr().err
                assert f"llama-server's {name} is not supported: {take.note}" in err and err.count("\n") == 1


def test_the_flag_table_in_the_docs_is_current():
    sys.path.insert(0, str(REPO / "tools"))
    from llama_server_flags import BEGIN, END, render_table

    doc = (REPO / "docs" / "compatibility.md").read_text()
    assert doc[doc.index(BEGIN) + len(BEGIN):doc.index(END)].strip() == render_table(llama_server_flags()).strip()


def test_a_typo_names_the_nearest_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--ctx-sise", "512"])
    assert e.value.code == 2
    assert "unrecognized arguments: --ctx-sise 512; did you mean --ctx-size?" in capsys.readouterr().err


@pytest.mark.parametrize("argv,per_slot", [
    (["-c", "1024", "-np", "4"], 256),                       # llama-server's -c: shared by the slots
    (["-c", "1024", "-np", "4", "-kvu"], 1024),              # unified: each may use all of it
    (["--kv-unified-per-slot", "300", "-np", "4"], 300),     # the old per-slot meaning
    (["-c", "1024", "-np", "2", "--kv-unified-per-slot", "100"], 100),
    (["-c", "0"], 8192),                                     # 0: the model's
    ([], 4096),                                              # default: the model's, at most 4096, per slot
])
def test_slot_context(argv, per_slot):
    from kvgraph.cli.serve_cmd import slot_context

    assert slot_context(serve_args(*argv), 8192) == per_slot


def test_flag_values_that_cannot_work_are_one_clear_error(tmp_path):
    from kvgraph.cli.serve_cmd import chat_template_arg, server_options, slot_context
    from kvgraph.errors import InvalidArgumentError

    cases = [
        (lambda: server_options(serve_args("--cors-origins", "http://x.com/path")), "is not an origin"),
        (lambda: server_options(serve_args("--cors-origins", "localhost,http://a.com")), "stands alone"),
        (lambda: server_options(serve_args("--chat-template-kwargs", "{nope")), "not JSON"),
        (lambda: server_options(serve_args("--chat-template-kwargs", "[1]")), "must be a JSON object"),
        (lambda: server_options(serve_args("--api-key-file", str(tmp_path / "none"))), "cannot read"),
        (lambda: server_options(serve_args("--ssl-key-file", "k.pem")), "needs both"),
        (lambda: chat_template_arg(serve_args("--chat-template", "llama2")), "llama.cpp's templates that kvgraph"),
        (lambda: chat_template_arg(serve_args("--chat-template", "nope")), "is not a template name; built in"),
        (lambda: slot_context(serve_args("-c", "3", "-np", "4"), 8192), "cannot be shared by 4 slots"),
    ]
    for call, needle in cases:
        with pytest.raises(InvalidArgumentError, match=needle):
            call()
    keys = tmp_path / "keys"
    keys.write_text("# team keys\nk1\n\nk2\n")
    assert server_options(serve_args("--api-key", "a,b", "--api-key-file", str(keys))).api_keys == \
        ("a", "b", "k1", "k2")


# ---- CORS ---------------------------------------------------------------------------------------------------------
def test_cors_policy():
    assert CorsPolicy().allowed("http://anything.example") == "http://anything.example"  # '*' with credentials
    assert CorsPolicy(credentials=False).allowed("http://a.example") == "*"
    local = CorsPolicy("localhost")
    for origin in ("http://localhost", "http://localhost:8080", "https://127.0.0.1:3000", "http://[::1]:5"):
        assert origin_is_localhost(origin) and local.allowed(origin) == origin
    for origin in ("http://localhost.evil.com", "http://notlocalhost", "http://evil.com", "http://localhost@evil.com",
                   "file://localhost", "http://127.0.0.1.nip.io", "http://localhost:99999", None):
        assert local.allowed(origin) is None, origin
    listed = CorsPolicy(CorsPolicy.parse_origins("http://a.example:3000, https://B.example"))
    assert listed.allowed("https://b.example") == "https://b.example" and listed.allowed("http://a.example") is None
    assert CorsPolicy(CorsPolicy.parse_origins("")).allowed("http://a.example") is None


@contextmanager
def app_client(tiny_llama, *argv):
    from fastapi.testclient import TestClient
    from kvgraph.cli.serve_cmd import build_server

    app, sched = build_server(serve_args("-m", str(tiny_llama[0]), "-c", "512", "-np", "2", *argv))
    try:
        yield TestClient(app)
    finally:
        sched.shutdown()


def test_preflights_and_cors_headers_as_llama_server(tiny_llama):
    with app_client(tiny_llama, "--api-key", "k1,k2", "--cors-origins", "localhost") as c:
        pre = c.options("/v1/chat/completions", headers={"Origin": "http://localhost:3000",
                                                          "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200          # no key needed: browsers send none on a preflight
        assert pre.headers["access-control-allow-origin"] == "http://localhost:3000"
        assert pre.headers["access-control-allow-methods"] == "GET, POST, DELETE, OPTIONS"
        assert pre.headers["access-control-allow-credentials"] == "true"
        evil = c.options("/completion", headers={"Origin": "http://localhost.evil.com"})
        assert evil.status_code == 200 and "access-control-allow-origin" not in evil.headers
        r = c.get("/v1/models", headers={"Origin": "http://127.0.0.1:5173", "Authorization": "Bearer k2"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://127.0.0.1:5173"
        bad = c.get("/v1/models", headers={"Authorization": "Bearer k3"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"


# ---- routes and fields --------------------------------------------------------------------------------------------
def test_models_props_settings_and_input_tokens(tiny_llama):
    with app_client(tiny_llama, "-a", "zeta,alpha", "--tags", "chat,small", "--seed", "42", "--no-ui") as c:
        (model,) = c.get("/v1/models").json()["data"]
        assert (model["id"], model["aliases"], model["tags"]) == ("alpha", ["zeta", "alpha"], ["chat", "small"])
        props = c.get("/props").json()
        assert props["model_path"] == str(tiny_llama[0])
        assert props["default_generation_settings"]["n_ctx"] == 256
        assert props["default_generation_settings"]["params"]["seed"] == 42
        r = c.post("/completions", json={"prompt": "the cat", "n_predict": 3, "temperature": 0, "top_k": 5})
        settings = r.json()["generation_settings"]
        assert (settings["n_predict"], settings["top_k"], settings["seed"], settings["n_ctx"]) == (3, 5, 42, 256)
        msgs = [{"role": "user", "content": "hello there"}]
        n = c.post("/chat/completions/input_tokens", json={"messages": msgs}).json()["input_tokens"]
        done = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 1}).json()
        assert n == done["usage"]["prompt_tokens"] > 2
        assert c.get("/").status_code == 404                    # --no-ui


def test_a_prompt_too_long_is_llama_servers_error(tiny_llama):
    with app_client(tiny_llama) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "the cat sat " * 200}]})
        err = r.json()["error"]
        assert r.status_code == 400 and err["type"] == "exceed_context_size_error"
        assert err["n_ctx"] == 256 and err["n_prompt_tokens"] > 256


# ---- chat templates, prefill, reasoning ---------------------------------------------------------------------------
def template(name: str) -> ChatTemplate:
    return ChatTemplate((TEMPLATES / f"{name}.jinja").read_text(), name, "<s>", "</s>")


USER = [{"role": "user", "content": "What is today?"}]


@pytest.mark.parametrize("name,on,off", [
    ("Qwen-Qwen3-0.6B", "<|im_start|>assistant\n", "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "<think>\n", "<think>\n</think>"),
    ("CohereForAI-c4ai-command-r7b-12-2024-tool_use", "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
     "<|CHATBOT_TOKEN|><|START_THINKING|><|END_THINKING|>"),
])
def test_reasoning_templates_with_thinking_on_and_off(name, on, off):
    t = template(name)
    assert t.render(USER, extra={"enable_thinking": True}).endswith(on)
    assert t.render(USER, extra={"enable_thinking": False}).endswith(off)


def test_templates_see_todays_date_and_a_prefill_continues():
    from datetime import date

    t = template("meta-llama-Llama-3.3-70B-Instruct")
    assert date.today().strftime("%d %b %Y") in t.render(USER)
    prompt = t.render(USER + [{"role": "assistant", "content": "Today is"}], continue_final=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nToday is")


def test_reasoning_splitter_holds_markers_split_across_chunks():
    text = "<think>\nI should greet.\n</think>\n\nHello there!"
    rng = random.Random(0)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
        sp, out = ReasoningSplitter(ReasoningFormat()), []
        for a, b in zip([0] + cuts, cuts + [len(text)]):
            out += sp.feed(text[a:b])
            assert all("<" not in t and ">" not in t for _, t in out)
        out += sp.finish()
        assert "".join(t for k, t in out if k == "reasoning_content") == "\nI should greet.\n"
        assert "".join(t for k, t in out if k == "content") == "Hello there!"
    opened = ReasoningFormat(opened=("<think>", "</think>"))
    assert ReasoningSplitter(opened).split("thoughts</think>answer") == ("thoughts", "answer")
    assert ReasoningSplitter(opened).split("cut short </thi") == ("cut short </thi", "")
    assert ReasoningSplitter(ReasoningFormat()).split("no thoughts") == (None, "no thoughts")
    assert ReasoningSplitter(ReasoningFormat(keep_in_content=True)).split(text) == ("I should greet.", text)


def test_thoughts_come_back_as_reasoning_content(tiny_llama):
    """A reply forced (by a grammar) to think first: its thoughts in reasoning_content, replies and streams."""
    forced = {"grammar": 'root ::= "<think>Let me see.</think>\\n\\nHello"',
              "messages": [{"role": "user", "content": "hi"}], "max_tokens": 40, "temperature": 0}
    with app_client(tiny_llama) as c:
        msg = c.post("/v1/chat/completions", json=forced).json()["choices"][0]["message"]
        assert (msg["reasoning_content"], msg["content"]) == ("Let me see.", "Hello")
        lines = [ln[6:] for ln in c.post("/v1/chat/completions", json=forced | {"stream": True}).text.splitlines()
                 if ln.startswith("data: ") and ln != "data: [DONE]"]
        deltas = [json.loads(ln)["choices"][0]["delta"] for ln in lines if json.loads(ln)["choices"]]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Let me see."
        assert "".join(d.get("content") or "" for d in deltas) == "Hello"
        raw = c.post("/v1/chat/completions", json=forced | {"reasoning_format": "none"}).json()
        assert raw["choices"][0]["message"]["content"] == "<think>Let me see.</think>\n\nHello"


def test_prefill_and_continue_final_message(tiny_llama):
    with app_client(tiny_llama, "--chat-template", "llama3") as c:
        convo = [{"role": "user", "content": "best book?"}, {"role": "assistant", "content": "Whill"}]
        r = c.post("/v1/chat/completions", json={"messages": convo, "max_tokens": 2, "verbose": True}).json()
        assert r["__verbose"]["prompt"].endswith("<|start_header_id|>assistant<|end_header_id|>\n\nWhill")
        both = c.post("/v1/chat/completions", json={"messages": convo, "max_tokens": 2,
                                                     "add_generation_prompt": True, "continue_final_message": True})
        assert both.status_code == 400 and "not both" in both.json()["error"]["message"]
        twice = c.post("/v1/chat/completions", json={"messages": convo + convo[1:], "max_tokens": 2})
        assert twice.status_code == 400 and "two assistant messages" in twice.json()["error"]["message"]
        applied = c.post("/apply-template", json={"messages": convo[:1], "add_generation_prompt": False}).json()
        assert applied["prompt"] == "<|start_header_id|>user<|end_header_id|>\n\nbest book?<|eot_id|>"


# ---- /completion's request forms ----------------------------------------------------------------------------------
def test_native_completion_prompt_forms_logit_bias_and_probs(tiny_llama):
    with app_client(tiny_llama) as c:
        ids = c.post("/tokenize", json={"content": "the cat sat"}).json()["tokens"]
        greedy = {"n_predict": 4, "temperature": 0}
        one = c.post("/completion", json=greedy | {"prompt": ids}).json()["content"]
        # a batch of the same prompt in four spellings: a list of four equal answers
        half = c.post("/tokenize", json={"content": "the cat"}).json()["tokens"]
        batch = c.post("/completion", json=greedy | {"prompt": [
            ids, "the cat sat", {"prompt_string": "the cat sat"}, half + [" sat"]]}).json()
        assert isinstance(batch, list) and [b["content"] for b in batch] == [one] * 4
        assert c.post("/completion", json=greedy | {"prompt": {"prompt_string": "x", "multimodal_data": "AA=="}}) \
            .status_code == 400
        # logit_bias by text bans the text's tokens, as by id
        first = c.post("/tokenize", json={"content": one}).json()["tokens"][0]
        piece = c.post("/detokenize", json={"tokens": [first]}).json()["content"]
        banned = c.post("/completion", json=greedy | {"prompt": ids, "logit_bias": [[piece, False]],
                                                      "n_probs": 3}).json()
        by_id = c.post("/completion", json=greedy | {"prompt": ids, "logit_bias": {str(first): -100},
                                                     "n_probs": 3}).json()
        assert banned["content"] == by_id["content"] and banned["completion_probabilities"][0]["id"] != first
        probs = c.post("/completion", json=greedy | {"prompt": ids, "n_probs": 3, "post_sampling_probs": True}).json()
        tok = probs["completion_probabilities"][0]
        assert 0 < tok["prob"] <= 1 and len(tok["top_probs"]) == 3 and "logprob" not in tok


def test_json_object_with_a_schema_and_timings_on_the_usage_chunk(tiny_llama):
    with app_client(tiny_llama) as c:
        msgs = [{"role": "user", "content": "answer"}]
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 8, "temperature": 0,
                                                   "response_format": {"type": "json_object",
                                                                       "schema": {"const": "42"}}})
        assert r.json()["choices"][0]["message"]["content"] == '"42"'
        for bad in (123, {"type": 123}, {"type": "hiccup"}):
            r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 2, "response_format": {
                "type": "json_object", "schema": bad}})
            assert r.status_code == 400, bad
        lines = [json.loads(ln[6:]) for ln in c.post("/v1/chat/completions", json={
            "messages": msgs, "max_tokens": 3, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
        ).text.splitlines() if ln.startswith("data: {")]
        assert lines[-1]["choices"] == [] and lines[-1]["timings"]["predicted_n"] == 3


def test_return_progress_reports_each_prompt_chunk(tiny_llama):
    with app_client(tiny_llama, "-b", "16") as c:
        body = {"messages": [{"role": "user", "content": "the cat sat on the mat " * 6}], "max_tokens": 2,
                "stream": True, "return_progress": True}
        for cached in (False, True):       # the second time the slot's cells hold all but the last token
            events = [json.loads(ln[6:]) for ln in c.post("/v1/chat/completions", json=body).text.splitlines()
                      if ln.startswith("data: {")]
            reports = [e["prompt_progress"] for e in events if "prompt_progress" in e]
            total = reports[0]["total"]
            assert reports[0]["processed"] == reports[0]["cache"] and (reports[0]["cache"] > 0) == cached
            assert [r["processed"] for r in reports[1:]] == list(range(reports[0]["cache"] + 16, total, 16))[
                :len(reports) - 2] + [total]
            assert all(r["total"] == total and r["cache"] == reports[0]["cache"] for r in reports)
        plain = c.post("/v1/chat/completions", json=body | {"return_progress": False}).text
        assert "prompt_progress" not in plain


def test_each_request_is_logged_with_its_tokens_and_timings(tiny_llama):
    from test_server import server_log, start_server, stop

    proc, base = start_server(tiny_llama[0])
    try:
        import httpx
        httpx.post(base + "/v1/completions", json={"prompt": "the cat", "max_tokens": 3, "ignore_eos": True})
        httpx.post(base + "/v1/completions", json={"prompt": "the cat", "max_tokens": "x"})
    finally:
        stop(proc)
    log = server_log(proc)
    assert "POST /v1/completions 200" in log and "3 generated at" in log and "finish length" in log
    assert "POST /v1/completions 400" in log and "GET /health" not in log


def test_tokenize_add_special_follows_the_model_and_400s_name_the_field(tiny_llama):

    with app_client(tiny_llama) as c:
        tok = c.app.state.kv.tokenizer
        for add_bos in (True, False):       # whatever the file says, add_special follows it
            tok.add_bos = add_bos
            ids = c.post("/tokenize", json={"content": "the cat", "add_special": True}).json()["tokens"]
            assert (ids[:1] == [tok.bos_id]) == add_bos
            assert c.post("/tokenize", json={"content": "the cat"}).json()["tokens"] == tok.encode("the cat", False)
        err = c.post("/v1/completions", json={"prompt": "x", "temperature": "hot"}).json()["error"]
        assert err["param"] == "temperature"
        err = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]}).json()["error"]
        assert err["param"] == "messages[0].content"
