"""Python API.

    from kvgraph import LLM
    llm = LLM()                                    # the default model, pulled on first use
    for chunk in llm.stream("The capital of France is", max_tokens=16):
        print(chunk, end="")
    print(llm.generate("Hello", max_tokens=8).text)
    print(llm.stats.summary())                     # graph-cache hits, misses, time split
"""
from __future__ import annotations

from typing import Iterator, Sequence

from .backends import get_backend
from .engine.context import DEFAULT_N_UBATCH, Context
from .engine.generate import GenerationResult, Session
from .engine.loader import LoadedModel, load_model
from .engine.sampling import GREEDY, SamplingParams
from .graph.cache import DEFAULT_CAPACITY


class LLM:
    def __init__(self, model: str | None = None, *, n_ctx: int | None = None, n_ubatch: int = DEFAULT_N_UBATCH,
                 backend: str | None = None, threads: int | None = None, graph_cache: bool = True,
                 graph_cache_size: int = DEFAULT_CAPACITY, verify_graph_cache: bool = False,
                 flash_attn: bool = False, progress: bool = False):
        from .registry import resolve_model

        path = resolve_model(model, progress=progress)
        self.loaded: LoadedModel = load_model(path, get_backend(backend, threads))
        self.ctx = Context(self.loaded, n_ctx=n_ctx, n_ubatch=n_ubatch, graph_cache=graph_cache,
                           cache_capacity=graph_cache_size, verify=verify_graph_cache, flash_attn=flash_attn)
        self.session = Session(self.ctx, self.tokenizer)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def stats(self):
        """Graph-cache statistics: hits, misses, rebuild reasons, build/plan/compile/set-inputs/compute time."""
        return self.ctx.stats

    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.encode_chat(messages, add_generation_prompt=True)

    def stream(self, prompt: str | Sequence[int], max_tokens: int = 128, sampling: SamplingParams = GREEDY,
               stop: Sequence[str] = (), ignore_eos: bool = False,
               result: GenerationResult | None = None) -> Iterator[str]:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return self.session.generate(ids, max_tokens, sampling, stop, ignore_eos, result)

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, sampling: SamplingParams = GREEDY,
                 stop: Sequence[str] = (), ignore_eos: bool = False) -> GenerationResult:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        result = GenerationResult(ids)
        for _ in self.session.generate(ids, max_tokens, sampling, stop, ignore_eos, result):
            pass
        return result
