"""Python API.

    from kvgraph import LLM
    llm = LLM()                                    # the default model, pulled on first use
    for chunk in llm.stream("The capital of France is", max_tokens=16):
        print(chunk, end="")
    print(llm.generate("Hello", max_tokens=8).text)
    print(llm.stats.summary())                     # graph-cache hits, misses, time split

    # OpenAI-shaped, as llama-cpp-python users know it:
    llm.create_completion("Once upon a time", max_tokens=16)["choices"][0]["text"]
    for chunk in llm.create_chat_completion([{"role": "user", "content": "Hi"}], stream=True):
        print(chunk["choices"][0]["delta"].get("content", ""), end="")
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from .backends import get_backend
from .engine.context import DEFAULT_N_UBATCH, Context
from .engine.generate import GenerationResult, Session
from .engine.loader import LoadedModel, load_model
from .engine.sampling import GREEDY, SamplingParams
from .errors import check_token_ids
from .graph.cache import DEFAULT_CAPACITY


class LLM:
    def __init__(self, model: str | None = None, *, n_ctx: int | None = None, n_ubatch: int = DEFAULT_N_UBATCH,
                 backend: str | None = None, threads: int | None = None, graph_cache: bool = True,
                 graph_cache_size: int = DEFAULT_CAPACITY, verify_graph_cache: bool = False,
                 flash_attn: bool | None = None, cache_type: str | None = None, progress: bool = False,
                 tokenizer: bool = True):
        """tokenizer=False builds the tokenizer on first use instead of now (a run on token ids never does)."""
        from .registry import resolve_model

        path = resolve_model(model, progress=progress)
        self.loaded: LoadedModel = load_model(path, get_backend(backend, threads), tokenizer=tokenizer)
        # One stream: one sequence alive (a server's scheduler makes its own context for its slots).
        self.ctx = Context(self.loaded, n_ctx=n_ctx, n_ubatch=n_ubatch, graph_cache=graph_cache, n_seq_max=1,
                           cache_capacity=graph_cache_size, verify=verify_graph_cache, flash_attn=flash_attn,
                           cache_type=cache_type)
        self._session: Session | None = None

    @property
    def session(self) -> Session:
        if self._session is None:
            self._session = Session(self.ctx, self.tokenizer)
        return self._session

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def stats(self):
        """Graph-cache statistics: hits, misses, rebuild reasons, build/plan/compile/set-inputs/compute time."""
        return self.ctx.stats

    @property
    def n_vocab(self) -> int:
        return self.loaded.config.n_vocab

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True,
                 max_tokens: int | None = None) -> list[int]:
        """Token ids of text. max_tokens: refuse, before tokenizing, a text that cannot fit that many."""
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special, max_tokens=max_tokens)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(check_token_ids(ids, self.n_vocab))

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The chat template rendered (bounded: see TemplateLimits) and tokenized; it must fit the context."""
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True, max_tokens=self.ctx.n_ctx)

    def _prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt, max_tokens=self.ctx.n_ctx)
        return check_token_ids(prompt, self.n_vocab)

    def logits(self, token_ids: Sequence[int], ubatch_size: int | None = None) -> np.ndarray:
        """float32 [len(token_ids), n_vocab]: the logits after each token, for a fresh sequence. ubatch_size:
        tokens per graph run (default n_ubatch; 1 runs token by token through the decode graphs). What
        scoring and evaluation need; the cache then holds the tokens, so a generate() that extends them
        reuses it."""
        ids = self._prompt_ids(token_ids)
        self.ctx.check_fits(len(ids))
        self.session.reset()
        return self.session.eval_prompt(ids, all_logits=True, ubatch_size=ubatch_size)

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 128, sampling: SamplingParams = GREEDY,
               stop: Sequence[str] = (), ignore_eos: bool = False, result: GenerationResult | None = None,
               ctx_shift: bool = False, n_keep: int = 0) -> Iterator[str]:
        """Text chunks as they are generated. ctx_shift: when the context fills, drop the oldest half of
        the tokens after the first n_keep and go on, instead of requiring prompt + max_tokens to fit."""
        ids = self._prompt_ids(prompt)
        return self.session.generate(ids, max_tokens, sampling, stop, ignore_eos, result, ctx_shift, n_keep)

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, sampling: SamplingParams = GREEDY,
                 stop: Sequence[str] = (), ignore_eos: bool = False, ctx_shift: bool = False,
                 n_keep: int = 0) -> GenerationResult:
        ids = self._prompt_ids(prompt)
        result = GenerationResult(ids)
        for _ in self.stream(ids, max_tokens, sampling, stop, ignore_eos, result, ctx_shift, n_keep):
            pass
        return result

    # ---- OpenAI-shaped, llama-cpp-python-like ---------------------------------------------------------
    def create_completion(self, prompt: str | Sequence[int], max_tokens: int | None = 16, temperature: float = 0.8,
                          top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0,
                          stop: str | Sequence[str] | None = None, seed: int | None = None, stream: bool = False,
                          ignore_eos: bool = False, logit_bias: dict[int, float] | None = None):
        """A `text_completion` dict, or with stream=True an iterator of completion chunks."""
        ids = self._prompt_ids(prompt)
        return self._openai(ids, False, max_tokens, SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty,
                                                                   seed=seed, logit_bias=logit_bias),
                            stop, stream, ignore_eos)

    def create_chat_completion(self, messages: list[dict], max_tokens: int | None = None, temperature: float = 0.8,
                               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                               repeat_penalty: float = 1.0, stop: str | Sequence[str] | None = None,
                               seed: int | None = None, stream: bool = False, ignore_eos: bool = False,
                               logit_bias: dict[int, float] | None = None):
        """A `chat.completion` dict, or with stream=True an iterator of `chat.completion.chunk` dicts."""
        return self._openai(self.chat_prompt_ids(messages), True, max_tokens,
                            SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed,
                                           logit_bias=logit_bias), stop, stream, ignore_eos)

    def _openai(self, ids, chat, max_tokens, sampling, stop, stream, ignore_eos):
        from . import openai_compat as oa

        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if max_tokens is None:
            max_tokens = max(0, self.ctx.n_ctx - len(ids))
        result = GenerationResult(ids)
        chunks = self.stream(ids, max_tokens, sampling.validate(self.n_vocab), stops, ignore_eos, result)
        rid, model = oa.new_id("chatcmpl" if chat else "cmpl"), self.model_name
        if not stream:
            for _ in chunks:
                pass
            return oa.response(rid, model, chat, [oa.choice(0, chat, result.text, result.finish_reason)],
                               len(ids), len(result.ids))

        def gen():
            if chat:
                yield oa.chat_chunk(rid, model, {"role": "assistant", "content": ""})
            for text in chunks:
                yield oa.chat_chunk(rid, model, {"content": text}) if chat else oa.completion_chunk(rid, model, text)
            yield oa.chat_chunk(rid, model, {}, result.finish_reason) if chat else \
                oa.completion_chunk(rid, model, "", result.finish_reason)
        return gen()

    @property
    def model_name(self) -> str:
        return self.loaded.path.stem
