"""Architectures kvgraph can run, by GGUF `general.architecture`. A module is imported when a file of its
architecture loads, so a process holds the code of the models it runs only."""
from __future__ import annotations

import importlib

from .base import BuildIO, Model

# general.architecture -> (module in this package, class)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaModel"),
    "kvgraph-hybrid": ("hybrid", "HybridModel"),
    "gemma3": ("gemma3", "Gemma3Model"),
    "qwen2": ("qwen2", "Qwen2Model"),
    "qwen3": ("qwen3", "Qwen3Model"),
    "qwen3moe": ("qwen3moe", "Qwen3MoeModel"),
    "phi3": ("phi3", "Phi3Model"),
    "gemma2": ("gemma2", "Gemma2Model"),
    "mamba": ("mamba", "MambaModel"),
    "mamba2": ("mamba2", "Mamba2Model"),
    "jamba": ("jamba", "JambaModel"),
    "falcon-h1": ("falcon_h1", "FalconH1Model"),
    "granitehybrid": ("granite_hybrid", "GraniteHybridModel"),
    "lfm2": ("lfm2", "Lfm2Model"),
    "qwen3next": ("qwen3next", "Qwen3NextModel"),
    "qwen35": ("qwen35", "Qwen35Model"),
    "qwen35moe": ("qwen35", "Qwen35MoeModel"),
}


def architecture(arch: str) -> type[Model]:
    """The Model class of `arch` (a key of ARCHITECTURES)."""
    module, name = ARCHITECTURES[arch]
    return getattr(importlib.import_module(f".{module}", __name__), name)


def __getattr__(name: str):
    """The model classes by name (`from kvgraph.models import LlamaModel`), imported on first use."""
    for arch, (_, cls) in ARCHITECTURES.items():
        if cls == name:
            return architecture(arch)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ARCHITECTURES", "BuildIO", "Model", "architecture"]
