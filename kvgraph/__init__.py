"""kvgraph: GGUF inference with a compute graph built once and replayed per token."""
__version__ = "0.1.0"

from .errors import KvgraphError  # noqa: E402


def __getattr__(name):  # lazy: `import kvgraph` stays cheap for the CLI
    if name == "LLM":
        from .api import LLM
        return LLM
    if name == "SamplingParams":
        from .engine.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "KvgraphError", "__version__"]
