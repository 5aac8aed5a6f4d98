"""Architectures kvgraph can run, by GGUF `general.architecture`."""
from __future__ import annotations

from .base import BuildIO, Model
from .gemma3 import Gemma3Model
from .hybrid import HybridModel
from .llama import LlamaModel

ARCHITECTURES: dict[str, type[Model]] = {
    LlamaModel.arch: LlamaModel,
    HybridModel.arch: HybridModel,
    Gemma3Model.arch: Gemma3Model,
}

__all__ = ["ARCHITECTURES", "BuildIO", "Model", "LlamaModel", "HybridModel", "Gemma3Model"]
