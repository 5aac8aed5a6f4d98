"""OpenAI-compatible HTTP server (FastAPI) over the continuous-batching scheduler.

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (plain and SSE streaming), /tokenize and
/detokenize (llama-server's), /health, /metrics (Prometheus text). Bad requests get an OpenAI-style error
body with 400 (413 for a body over --max-body); a full queue or a draining server 503. A client that
disconnects mid-request has its request cancelled, which frees its sequence slot.

The event loop only moves bytes: parsing a body, rendering a chat template and tokenizing run in worker
threads, each bounded (body size, template limits, prompt length against the context before encoding), so
no request can stall /health or the other streams.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import queue
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import Headers

from .. import __version__
from .. import openai_compat as oa
from ..engine.batching import BatchScheduler, Event, QueueFullError, Request as GenRequest, ShuttingDownError
from ..engine.constraints import Grammars
from ..errors import ContextOverflowError, InvalidArgumentError, KvgraphError, check_token_ids, short_repr
from .chat_page import is_public, mount_chat_page
from .cors import CorsMiddleware, CorsPolicy

REASONING_FORMATS = ("auto", "deepseek", "deepseek-legacy", "none")
POLL_S = 0.25   # how often a waiting handler checks whether its client is still there
log = logging.getLogger("kvgraph.server")


class BodyTooLargeError(KvgraphError):
    """A request body over --max-body (413)."""


class ModelNotServedError(KvgraphError):
    """A request names a model this server does not serve, with --strict-model-names (404)."""


@dataclass
class ServerOptions:
    """The server's switches (each a `kvgraph serve` flag)."""

    api_keys: tuple[str, ...] = ()        # Bearer tokens, one required on every route but /health
    cors: CorsPolicy = field(default_factory=CorsPolicy)   # which browser origins may call (llama-server's: any)
    metrics: bool = False                 # /metrics on (off: 501, as llama-server without --metrics)
    slots: bool = True                    # /slots on (off: 501, as llama-server with --no-slots)
    defaults: dict = field(default_factory=dict)   # request fields a request leaves out (--temp, --seed, ...)
    aliases: tuple[str, ...] = ()         # the model's --alias names, listed by /v1/models
    template_kwargs: dict = field(default_factory=dict)   # chat template variables (--chat-template-kwargs,
    prefill_assistant: bool = True        # --reasoning's enable_thinking); an assistant message last is a prefill
    reasoning_format: str = "auto"        # thoughts in reasoning_content (auto, deepseek) or in content (none)
    model_path: str = ""                  # the GGUF served (/props)
    chat_page: bool = True                # the chat page at / (--no-ui: 404)
    tags: tuple[str, ...] = ()            # the model's tags (--tags), listed by /v1/models
    log_requests: bool = False            # one log line per request (off: --log-disable)
    verbose: bool = False                 # every reply carries __verbose (--verbose)


class ServerState:
    def __init__(self, scheduler: BatchScheduler, tokenizer, model_id: str, max_body: int = oa.DEFAULT_MAX_BODY,
                 aliases: tuple[str, ...] = (), strict_model_names: bool = False,
                 options: ServerOptions | None = None):
        self.options = options or ServerOptions()
        self.grammars = Grammars(tokenizer)
        self.scheduler, self.tokenizer, self.model_id = scheduler, tokenizer, model_id
        # Every name /v1/models lists; a request naming another model is served with this one anyway (as
        # llama-server does) unless strict_model_names.
        self.model_names = list(dict.fromkeys((model_id, *aliases)))
        self.strict_model_names = strict_model_names
        self.max_body = max_body
        self.http_requests: dict[str, int] = {}
        self.started = time.time()


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=oa.error_body(message, type_, code))


class _CountAndAuthorize:
    """Counts requests by path and checks the API key, as plain ASGI: starlette's BaseHTTPMiddleware (what
    `@app.middleware` makes) wraps `receive`, after which a handler no longer sees its client leave
    (`request.is_disconnected()` stays False), so a non-streaming request whose client had gone decoded on
    to max_tokens."""

    def __init__(self, app, state: ServerState, routes: set[str]):
        self.app, self.state, self.routes = app, state, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state, path = self.state, scope["path"]
        counted = path if path in self.routes else "other"
        state.http_requests[counted] = state.http_requests.get(counted, 0) + 1
        keys = state.options.api_keys
        if keys and path not in ("/health", "/v1/health") and scope["method"] != "OPTIONS" \
                and not is_public(scope["method"], path):
            headers = Headers(scope=scope)
            given = headers.get("authorization", "")
            token = (given[7:] if given[:7].lower() == "bearer " else headers.get("x-api-key", "")).encode()
            if not any([hmac.compare_digest(token, key.encode()) for key in keys]):   # each compared: no early out
                response = _error(401, "invalid or missing API key: send 'Authorization: Bearer <key>'.",
                                  "authentication_error", "invalid_api_key")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class _RequestLog:
    """One log line per request, as llama-server writes: method, path, status, time, and what a generation
    route adds (tokens in and out, speed) in scope['state']['log']. Plain ASGI, like _CountAndAuthorize."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_status)
        finally:
            extra = scope.get("state", {}).get("log")
            log.info("%s %s %d %.0f ms%s", scope["method"], scope["path"], status[0],
                     (time.perf_counter() - t0) * 1e3, f" | {extra}" if extra else "")


def _log_line(request: Request, result, n_prompt: int) -> None:
    """What the request log line says about a generation."""
    tm = result.timings
    request.state.log = (f"prompt {n_prompt} tokens ({tm.n_cached} cached), {len(result.ids)} generated at "
                         f"{tm.decode_tps:.1f} tokens/s, finish {result.finish_reason}")


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="kvgraph", version="0.1.0")
    app.state.kv = state

    @app.exception_handler(QueueFullError)
    async def _queue_full(request, exc):
        return _error(503, str(exc), "server_busy", "queue_full")

    @app.exception_handler(ShuttingDownError)
    async def _draining(request, exc):
        return _error(503, str(exc), "server_busy", "shutting_down")

    @app.exception_handler(ModelNotServedError)
    async def _no_such_model(request, exc):
        return _error(404, str(exc), code="model_not_found")

    @app.exception_handler(BodyTooLargeError)
    async def _too_large(request, exc):
        return _error(413, str(exc), code="request_too_large")

    @app.exception_handler(ContextOverflowError)
    async def _too_long(request, exc):      # llama-server's type, with its two numbers where known
        body = oa.error_body(str(exc), "exceed_context_size_error")
        body["error"] |= {k: v for k, v in (("n_prompt_tokens", exc.n_prompt_tokens), ("n_ctx", exc.n_ctx))
                          if v is not None}
        return JSONResponse(status_code=400, content=body)

    @app.exception_handler(KvgraphError)
    async def _user_error(request, exc):
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _bug(request, exc):   # a kvgraph bug, not the client's: logged with its traceback
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return _error(500, f"internal error: {type(exc).__name__}", "server_error")

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return _error(422, f"invalid request: {exc.errors()[:3]}")

    routes = set()   # filled below: counting only known paths keeps a path-spraying client from growing the table

    app.add_middleware(_CountAndAuthorize, state=state, routes=routes)

    async def _body(request: Request) -> dict:
        raw = await _read_capped(request, state.max_body)
        body = await asyncio.to_thread(_parse_json, raw)
        if not isinstance(body, dict):
            raise KvgraphError("the request body must be a JSON object.")
        model = body.get("model")
        if model is not None and state.strict_model_names and model not in state.model_names:
            raise ModelNotServedError(f"the model {short_repr(model)} does not exist here; this server serves "
                                      f"{', '.join(map(repr, state.model_names))} (see /v1/models).")
        return body

    @app.get("/health")
    @app.get("/v1/health")
    async def health():
        sched = state.scheduler
        return {"status": "ok", "model": state.model_id, "active": sched.active, "queue": sched.queue_depth,
                "slots": sched.parallel}

    @app.get("/v1/models")
    @app.get("/models")
    async def models():
        # One model, as llama-server lists it: its other names are `aliases` (each also accepted in 'model').
        return {"object": "list", "data": [{
            "id": state.model_id, "object": "model", "created": int(state.started), "owned_by": "kvgraph",
            "aliases": list(state.options.aliases), "tags": list(state.options.tags),
            "meta": {"n_ctx": per_seq, "n_ctx_train": state.scheduler.ctx.loaded.config.n_ctx_train,
                     "n_vocab": n_vocab}}]}

    @app.get("/metrics")
    async def metrics():
        if not state.options.metrics:
            return _error(501, "the metrics endpoint is off; start the server with --metrics.", "not_supported_error")
        return PlainTextResponse(render_metrics(state), media_type="text/plain; version=0.0.4")

    @app.get("/slots")
    async def slots():
        if not state.options.slots:
            return _error(501, "the slots endpoint is off (--no-slots).", "not_supported_error")
        return state.scheduler.slot_info()

    @app.get("/tokenizer_info")
    async def tokenizer_info():      # vLLM's: what clients need to tokenize through /tokenize remotely
        tok = state.tokenizer
        return {"tokenizer_class": f"kvgraph-{tok.model_kind}", "eos_token": _token_text(tok, tok.eos_id),
                "bos_token": _token_text(tok, tok.bos_id), "pad_token": None, "add_bos_token": tok.add_bos,
                "chat_template": tok.chat_template, "model_max_length": per_seq, "vocab_size": tok.vocab_size}

    @app.get("/props")
    async def props():
        tok = state.tokenizer
        return {"model_alias": state.model_id, "model_names": state.model_names,
                "total_slots": state.scheduler.parallel, "n_ctx": state.scheduler.n_ctx_per_seq,
                "chat_template": tok.chat_template, "chat_template_source": tok.chat_template_source,
                "bos_token": _token_text(tok, tok.bos_id), "eos_token": _token_text(tok, tok.eos_id),
                "build_info": f"kvgraph {__version__}", "modalities": {"vision": False, "audio": False},
                "model_path": state.options.model_path, "default_generation_settings": {
                    "n_ctx": per_seq, "params": oa.generation_settings(oa.parse_llama_params(llama_defaults, n_vocab),
                                                                        per_seq)}}

    @app.post("/apply-template")
    async def apply_template(request: Request):
        def render(body: dict) -> dict:
            messages = oa.parse_messages(body)
            tools, _ = oa.parse_tools(body)
            return {"prompt": state.tokenizer.apply_chat_template(
                messages, max_chars=state.tokenizer.max_chars(per_seq), tools=tools, **chat_options(body, messages))}
        return await _in_worker(request, render)

    n_vocab = state.scheduler.ctx.n_vocab
    per_seq = state.scheduler.n_ctx_per_seq

    def served_name(body: dict) -> str:
        """The name a response reports: the requested one when this server has it, else its own."""
        model = body.get("model")
        return model if model in state.model_names else state.model_id

    def prompt_ids(body: dict, prompt=None) -> list[int]:
        prompt = oa.parse_prompt(body) if prompt is None else prompt
        if isinstance(prompt, str):
            return state.tokenizer.encode(prompt, max_tokens=per_seq)
        if any(isinstance(x, str) for x in prompt):      # ids and text mixed: the text pieces tokenized in place
            prompt = [t for x in prompt for t in (state.tokenizer.encode(x, add_bos=False, max_tokens=per_seq)
                                                  if isinstance(x, str) else [x])]
        if len(prompt) > per_seq:
            raise ContextOverflowError(f"the prompt has {len(prompt)} tokens but each sequence holds {per_seq}.",
                                       len(prompt), per_seq)
        return check_token_ids(prompt, n_vocab)

    defaults = state.options.defaults
    llama_defaults = {({"max_tokens": "n_predict"}).get(k, k): v for k, v in defaults.items()}

    def with_constraint(params: oa.GenParams) -> oa.GenParams:
        """The grammar's per-sequence constraint maker (its vocabulary view is built here, in a worker thread,
        the first time: ~0.2 s for 49k tokens)."""
        if params.grammar is not None:
            params.constraint = state.grammars.factory(params.grammar)
        return params

    def completion_input(body: dict) -> tuple[list[tuple[list[int], str]], oa.GenParams, str]:
        """Each prompt of the request as (ids, text), the parameters, the model name."""
        params = with_constraint(oa.parse_params(defaults | body, chat=False, n_vocab=n_vocab))
        prompts = []
        for prompt in oa.parse_prompts(body):
            ids = prompt_ids(body, prompt)
            prompts.append((ids, prompt if isinstance(prompt, str) else state.tokenizer.decode(ids)))
        if len(prompts) > 1 and params.stream:
            raise InvalidArgumentError("stream one prompt at a time ('prompt' holds a batch of prompts).")
        return prompts, params, served_name(body)

    def llama_input(body: dict) -> tuple[list[list[int]], oa.GenParams]:
        def tokenize(text: str) -> list[int]:
            return state.tokenizer.encode(text, add_bos=False, max_tokens=per_seq)
        params = with_constraint(oa.parse_llama_params(llama_defaults | body, n_vocab, tokenize))
        batch = [prompt_ids(body, p) for p in oa.parse_prompts(body)]
        if len(batch) > 1 and params.stream:
            raise InvalidArgumentError("stream one prompt at a time ('prompt' holds a batch of prompts).")
        return batch, params

    def chat_options(body: dict, messages: list[dict]) -> dict:
        return oa.parse_chat_options(body, messages, state.options.template_kwargs, state.options.prefill_assistant)

    def chat_input(body: dict) -> tuple[list[int], oa.GenParams, str]:
        params = with_constraint(oa.parse_params(defaults | body, chat=True, n_vocab=n_vocab))
        messages = oa.parse_messages(body)
        ids = state.tokenizer.encode_chat(messages, max_tokens=per_seq, tools=params.tools,
                                          **chat_options(body, messages))
        fmt = body.get("reasoning_format", state.options.reasoning_format)
        if fmt not in REASONING_FORMATS:
            raise InvalidArgumentError(f"'reasoning_format' must be one of {', '.join(REASONING_FORMATS)}.")
        params.reasoning = oa.ReasoningFormat.of(fmt, state.tokenizer.decode(ids[-8:]))
        return ids, params, served_name(body)

    def input_tokens(body: dict) -> dict:
        ids, _, _ = chat_input(body)
        return {"input_tokens": len(ids)}

    def verbose(body: dict, ids: list[int]) -> dict:
        """llama-server's debug field: the prompt as the model saw it (request 'verbose': true, or --verbose)."""
        if not (oa.flag(body, "verbose", False) or state.options.verbose):
            return {}
        return {"__verbose": {"prompt": state.tokenizer.decode(ids)}}

    def tokenize_result(body: dict) -> dict:
        """llama-server's {content, add_special, with_pieces} or vLLM's {prompt, add_special_tokens}."""
        vllm = "prompt" in body and "content" not in body
        content = body.get("prompt" if vllm else "content")
        if not isinstance(content, str):
            raise InvalidArgumentError("'content' (or vLLM's 'prompt') must be a string.")
        special = oa.flag(body, "add_special_tokens" if vllm else "add_special", False)
        # add_special adds the BOS only where the model file asks for one (llama_tokenize's add_special)
        ids = state.tokenizer.encode(content, None if special else False, True, per_seq)
        if vllm:
            return {"tokens": ids, "count": len(ids), "max_model_len": per_seq}
        if not oa.flag(body, "with_pieces", False):
            return {"tokens": ids}
        return {"tokens": [{"id": i, "piece": state.tokenizer.decode([i])} for i in ids]}

    def detokenize_result(body: dict) -> dict:
        tokens = body.get("tokens")
        if not isinstance(tokens, list):
            raise InvalidArgumentError("'tokens' must be a list of token ids.")
        text = state.tokenizer.decode(check_token_ids(tokens, min(n_vocab, state.tokenizer.vocab_size)))
        return {"content": text, "prompt": text}          # llama-server's key and vLLM's

    async def _in_worker(request: Request, work):
        """work(body) in a worker thread: parsing, template rendering and tokenizing are bounded but not
        instant, and the event loop must stay free for /health and the other streams."""
        return await asyncio.to_thread(work, await _body(request))

    # The OpenAI routes also without /v1, as llama-server has them (but /completions: its native format).
    @app.post("/v1/completions")
    async def completions(request: Request):
        prompts, params, model = await _in_worker(request, completion_input)
        return await _serve(request, prompts, params, model, False)

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        body = await _body(request)
        ids, params, model = await asyncio.to_thread(chat_input, body)
        return await _serve(request, [(ids, None)], params, model, True, verbose(body, ids))

    @app.post("/v1/chat/completions/input_tokens")
    @app.post("/chat/completions/input_tokens")
    async def chat_input_tokens(request: Request):
        return await _in_worker(request, input_tokens)

    @app.post("/completion")
    @app.post("/completions")       # un-prefixed, llama-server's native format (as there)
    async def llama_completion(request: Request):
        """llama-server's native completion endpoint: its request fields and its response shape."""
        body = await _body(request)
        batch, params = await asyncio.to_thread(llama_input, body)
        if len(batch) > 1:          # a batch of prompts: a list of answers, as llama-server gives
            return [await _llama_answer(request, body, ids, params) for ids in batch]
        return await _llama_answer(request, body, batch[0], params)

    async def _llama_answer(request: Request, body: dict, ids: list[int], params: oa.GenParams):
        req = _submit(ids, params)
        model = served_name(body)
        settings = oa.generation_settings(params, per_seq)
        post_probs = oa.flag(body, "post_sampling_probs", False)

        def final(res) -> dict:
            _log_line(request, res, len(ids))
            stop_type = "limit" if res.finish_reason == "length" else ("word" if res.stop_word else "eos")
            if res.finish_reason not in ("length", "stop"):
                stop_type = res.finish_reason
            out = {"content": "", "stop": True, "model": model, "tokens_predicted": len(res.ids),
                   "tokens_evaluated": len(ids), "stop_type": stop_type, "stopping_word": res.stop_word,
                   "truncated": False, "timings": oa.timings(res), "generation_settings": settings,
                   "tokens": res.ids if body.get("return_tokens") else []} | verbose(body, ids)
            if params.logprobs is not None and not params.stream:
                out["completion_probabilities"] = oa.completion_probabilities(state.tokenizer, res.ids, res.logprobs,
                                                                              post_probs)
            return out
        if params.stream:
            async def sse():
                sent = 0
                try:
                    async for ev in _events(request, req):
                        chunk = {"content": ev.text, "stop": False}
                        if params.logprobs is not None:
                            res, end = req.result, len(req.result.logprobs)
                            chunk["completion_probabilities"] = oa.completion_probabilities(
                                state.tokenizer, res.ids[sent:end], res.logprobs[sent:end], post_probs)
                            sent = end
                        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                    yield f"data: {json.dumps(final(req.result), ensure_ascii=False)}\n\n"
                except KvgraphError as exc:
                    yield f"data: {json.dumps(oa.error_body(f'generation failed: {exc}', 'server_error'))}\n\n"
                finally:
                    req.cancel()
            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            async for _ in _events(request, req):
                pass
        except KvgraphError as exc:
            return _error(500, f"generation failed: {exc}", "server_error")
        return final(req.result) | {"content": req.result.text}

    def _submit(ids: list[int], params: oa.GenParams) -> GenRequest:
        sched = state.scheduler
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = max(0, sched.n_ctx_per_seq - len(ids))
        return sched.submit(GenRequest(ids, max_tokens, params.sampling, params.stop, params.ignore_eos,
                                       logprobs=params.logprobs, echo=params.echo, n=params.n,
                                       constraint=params.constraint, cache_prompt=params.cache_prompt,
                                       progress=params.progress))

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await _in_worker(request, tokenize_result)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await _in_worker(request, detokenize_result)

    def logprobs_of(res, chat: bool, start: int = 0, end: int | None = None, echo_prompt: str | None = None):
        """The response's logprobs object for generated tokens [start, end) (echo_prompt: the prompt's first)."""
        tok = state.tokenizer
        end = len(res.logprobs) if end is None else end
        ids, lps = res.ids[start:end], res.logprobs[start:end]
        if chat:
            return oa.chat_logprobs(tok, ids, lps)
        if echo_prompt is not None:
            prompt = oa.completion_logprobs(tok, res.prompt_ids, res.prompt_logprobs)
            rest = oa.completion_logprobs(tok, ids, lps, len(echo_prompt))
            return {k: prompt[k] + rest[k] for k in prompt}
        return oa.completion_logprobs(tok, ids, lps)

    async def _serve(request: Request, prompts: list[tuple[list[int], str | None]], params: oa.GenParams,
                     model: str, chat: bool, extra: dict | None = None):
        """Generate for each prompt (a completions request may batch several; chat has one) and answer with
        every prompt's choices, indexed prompt by prompt."""
        reqs = []
        try:
            for ids, _ in prompts:
                reqs.append(_submit(ids, params))
        except KvgraphError:
            for req in reqs:
                req.cancel()
            raise
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        if params.stream:
            echo = prompts[0][1] if params.echo else None
            return StreamingResponse(_sse(request, reqs[0], rid, chat, model, params.include_usage,
                                          params.logprobs is not None, echo, params.tools is not None,
                                          params.reasoning if chat else None),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        choices, results = [], []
        try:
            for req, (ids, text) in zip(reqs, prompts):
                async for _ in _events(request, req):
                    pass
                echo = text if params.echo else None
                for choice_req in req.choices:
                    res = choice_req.result
                    results.append(res)
                    lps = logprobs_of(res, chat, echo_prompt=echo) if params.logprobs is not None else None
                    choices.append(oa.choice(len(choices), chat, (echo or "") + res.text, res.finish_reason, lps))
        except KvgraphError as exc:
            return _error(500, f"generation failed: {exc}", "server_error")
        finally:
            for req in reqs:
                req.cancel()
        if chat and params.reasoning is not None:      # thoughts go to reasoning_content
            for c in choices:
                thoughts, c["message"]["content"] = oa.ReasoningSplitter(params.reasoning).split(
                    c["message"]["content"])
                if thoughts is not None:
                    c["message"]["reasoning_content"] = thoughts
        if params.tools is not None:        # calls the model wrote become tool_calls
            for c in choices:
                content, calls = oa.split_tool_calls(c["message"]["content"])
                if calls:
                    c["message"] |= {"content": content, "tool_calls": calls}
                    c["finish_reason"] = "tool_calls"
        n_prompt = sum(len(ids) for ids, _ in prompts)
        _log_line(request, results[0], n_prompt)
        return oa.response(rid, model, chat, choices, n_prompt, sum(len(r.ids) for r in results),
                           sum(req.result.timings.n_cached for req in reqs)) | {
            "timings": oa.timings(results[0])} | (extra or {})

    async def _sse(request: Request, req: GenRequest, rid: str, chat: bool, model: str, include_usage: bool,
                   logprobs: bool, echo: str | None, tools: bool = False, reasoning: oa.ReasoningFormat | None = None):
        def frame(obj: Any) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
        splitters = [oa.ReasoningSplitter(reasoning) if reasoning else None for _ in req.choices]

        def text_frames(i: int, text: str, final: bool = False, lps=None):
            """A chat delta's text, thoughts as reasoning_content deltas (with deepseek-legacy also in content)."""
            sp = splitters[i]
            if sp is None:
                if text or lps is not None:
                    yield frame(chunk(i, text, lps=lps))
                return
            parts = sp.feed(text) + (sp.finish() if final else [])
            for j, (kind, piece) in enumerate(parts):
                delta = {kind: piece}
                if kind == "reasoning_content" and reasoning.keep_in_content:
                    delta["content"] = piece
                yield frame(oa.chat_chunk(rid, model, delta, None, lps if j == 0 else None, i))
            if not parts and lps is not None:
                yield frame(chunk(i, "", lps=lps))
        sent = [0] * len(req.choices)       # tokens of each choice whose logprobs went out

        def new_logprobs(i: int):
            if not logprobs:
                return None
            res = req.choices[i].result
            end = len(res.logprobs)
            out, sent[i] = logprobs_of(res, chat, sent[i], end), end
            return out

        def chunk(i: int, text: str, finish: str | None = None, lps=None) -> dict:
            if chat:
                return oa.chat_chunk(rid, model, {"content": text} if text or finish is None else {}, finish, lps, i)
            return oa.completion_chunk(rid, model, text, finish, lps, i)

        echo_pending = [echo is not None] * len(req.choices)

        def echo_frame(i: int) -> str:     # the prompt back, sent once its logprobs are known (prefill done)
            res = req.choices[i].result
            lps = oa.completion_logprobs(state.tokenizer, res.prompt_ids, res.prompt_logprobs) if logprobs else None
            echo_pending[i] = False
            return frame(chunk(i, echo, lps=lps))
        try:
            if chat:     # the role first, with no content yet (as OpenAI and llama-server send it)
                for i in range(len(req.choices)):
                    yield frame(oa.chat_chunk(rid, model, {"role": "assistant", "content": None}, index=i))
            async for ev in _events(request, req):
                if ev.kind == "progress":       # return_progress: llama-server's prompt_progress chunks
                    yield frame(oa.chat_chunk(rid, model, {}, index=ev.index) | {"choices": [],
                                                                               "prompt_progress": ev.progress})
                    continue
                if tools:           # a reply may turn out to be tool calls: it is sent whole at the end
                    continue
                if echo_pending[ev.index]:
                    yield echo_frame(ev.index)
                if splitters[ev.index] is None:
                    yield frame(chunk(ev.index, ev.text, lps=new_logprobs(ev.index)))
                else:
                    for f in text_frames(ev.index, ev.text, lps=new_logprobs(ev.index)):
                        yield f
            for i, choice in enumerate(req.choices):
                if echo_pending[i]:
                    yield echo_frame(i)
                finish = choice.result.finish_reason
                if tools:
                    content, calls = oa.split_tool_calls(choice.result.text)
                    if content:
                        for f in text_frames(i, content, True, new_logprobs(i)):
                            yield f
                    if calls:
                        finish = "tool_calls"
                        deltas = [{"index": j} | call for j, call in enumerate(calls)]
                        yield frame(oa.chat_chunk(rid, model, {"tool_calls": deltas}, index=i))
                elif splitters[i] is not None:
                    for f in text_frames(i, "", True):
                        yield f
                yield frame(chunk(i, "", finish) | {"timings": oa.timings(choice.result)})
            _log_line(request, req.result, len(req.prompt_ids))
            if include_usage:
                yield frame(oa.usage_chunk(rid, model, chat, len(req.prompt_ids),
                                           sum(len(c.result.ids) for c in req.choices),
                                           req.result.timings.n_cached) | {"timings": oa.timings(req.result)})
            yield "data: [DONE]\n\n"
        except KvgraphError as exc:
            yield frame(oa.error_body(f"generation failed: {exc}", "server_error"))
        finally:
            req.cancel()

    if state.options.chat_page:
        mount_chat_page(app)     # GET /: the chat page (kvgraph/server/chat_page.py)
    routes.update(r.path for r in app.routes)
    app.add_middleware(CorsMiddleware, policy=state.options.cors)   # outside the key check
    if state.options.log_requests:
        app.add_middleware(_RequestLog)                                 # outermost: sees every answer
    return app


def _token_text(tokenizer, token_id: int | None) -> str | None:
    """A special token's text as /props and /tokenizer_info report it (None: the model has none)."""
    return tokenizer.tokens[token_id] if token_id is not None else None


async def _read_capped(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed limit bytes: from Content-Length
    before reading anything, else while it streams in."""
    declared = request.headers.get("content-length")
    too_large = BodyTooLargeError(f"the request body is over the server's limit of {limit:,} bytes (--max-body).")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(raw: bytes) -> Any:
    """JSON, or a KvgraphError for anything a body can do to the parser (invalid UTF-8 or syntax, nesting
    deeper than the recursion limit, an integer literal over Python's digit limit, ...)."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise KvgraphError("the request body is nested too deeply to parse.") from None
    except (ValueError, UnicodeDecodeError) as exc:   # JSONDecodeError is a ValueError; so is the int limit
        raise KvgraphError(f"the request body is not valid JSON ({str(exc)[:200]}).") from None


async def _events(request: Request, req: GenRequest):
    """The 'token' events of req (every choice's) as they come, until every choice has ended; cancels it when
    the client disconnects."""
    open_choices = len(req.choices) or 1
    check_at = time.monotonic() + POLL_S
    try:
        while open_choices:
            try:
                ev: Event = await asyncio.to_thread(req.events.get, True, POLL_S)
            except queue.Empty:
                ev = None
            # every POLL_S, tokens flowing or not: a client that left a non-streaming request (nothing is
            # written to it until the end) must not keep its slot decoding to max_tokens
            if time.monotonic() >= check_at:
                check_at = time.monotonic() + POLL_S
                if await request.is_disconnected():
                    req.cancel()
                    return
            if ev is None:
                continue
            if ev.kind in ("token", "progress"):        # progress: only requests that asked for it
                yield ev
            elif ev.kind == "error":
                raise ev.error if isinstance(ev.error, KvgraphError) else KvgraphError(str(ev.error))
            else:
                open_choices -= 1
    finally:
        req.cancel()   # a no-op once the request has finished; frees the slot if the client went away


def render_metrics(state: ServerState) -> str:
    sched = state.scheduler
    st, cache = sched.stats, sched.ctx.stats
    tps = st.generated_tokens_total / st.decode_seconds if st.decode_seconds else 0.0
    rows = [
        ("kvgraph_requests_total", "counter", "requests accepted", st.requests_total),
        ("kvgraph_requests_finished_total", "counter", "requests completed", st.requests_finished),
        ("kvgraph_requests_failed_total", "counter", "requests that failed", st.requests_failed),
        ("kvgraph_requests_cancelled_total", "counter", "requests cancelled (client gone)", st.requests_cancelled),
        ("kvgraph_requests_rejected_total", "counter", "requests refused (queue full, draining)", st.requests_rejected),
        ("kvgraph_prompt_tokens_total", "counter", "prompt tokens processed", st.prompt_tokens_total),
        ("kvgraph_prompt_tokens_cached_total", "counter", "prompt tokens reused from the prefix cache",
         st.prompt_tokens_cached),
        ("kvgraph_generated_tokens_total", "counter", "tokens generated", st.generated_tokens_total),
        ("kvgraph_decode_tokens_per_second", "gauge", "generated tokens per second of decode time", round(tps, 3)),
        ("kvgraph_decode_batch_rows_avg", "gauge", "average sequences per decode step",
         round(st.batch_rows_total / st.decode_steps, 3) if st.decode_steps else 0),
        ("kvgraph_queue_depth", "gauge", "requests waiting for a slot", sched.queue_depth),
        ("kvgraph_active_slots", "gauge", "sequence slots in use", sched.active),
        ("kvgraph_slots_total", "gauge", "sequence slots", sched.parallel),
        ("kvgraph_graph_cache_hits_total", "counter", "graph cache hits", cache.hits),
        ("kvgraph_graph_cache_misses_total", "counter", "graph cache misses", cache.misses),
    ]
    lines = []
    for name, kind, help_, value in rows:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    lines += ["# HELP kvgraph_http_requests_total HTTP requests by path", "# TYPE kvgraph_http_requests_total counter"]
    lines += [f'kvgraph_http_requests_total{{path="{p}"}} {n}' for p, n in sorted(state.http_requests.items())]
    return "\n".join(lines) + "\n"
