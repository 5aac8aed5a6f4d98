"""Architectures kvgraph can run, by GGUF `general.architecture`."""
from __future__ import annotations

from .base import BuildIO, Model
from .falcon_h1 import FalconH1Model
from .gemma2 import Gemma2Model
from .gemma3 import Gemma3Model
from .granite_hybrid import GraniteHybridModel
from .hybrid import HybridModel
from .jamba import JambaModel
from .lfm2 import Lfm2Model
from .llama import LlamaModel
from .mamba import MambaModel
from .mamba2 import Mamba2Model
from .phi3 import Phi3Model
from .qwen2 import Qwen2Model
from .qwen3 import Qwen3Model

ARCHITECTURES: dict[str, type[Model]] = {
    LlamaModel.arch: LlamaModel,
    HybridModel.arch: HybridModel,
    Gemma3Model.arch: Gemma3Model,
    Qwen2Model.arch: Qwen2Model,
    Qwen3Model.arch: Qwen3Model,
    Phi3Model.arch: Phi3Model,
    Gemma2Model.arch: Gemma2Model,
    MambaModel.arch: MambaModel,
    Mamba2Model.arch: Mamba2Model,
    JambaModel.arch: JambaModel,
    FalconH1Model.arch: FalconH1Model,
    GraniteHybridModel.arch: GraniteHybridModel,
    Lfm2Model.arch: Lfm2Model,
}

__all__ = ["ARCHITECTURES", "BuildIO", "Model", "LlamaModel", "HybridModel", "Gemma3Model", "Qwen2Model",
           "Qwen3Model", "Phi3Model", "Gemma2Model",
           "MambaModel", "Mamba2Model", "JambaModel", "FalconH1Model", "GraniteHybridModel",
           "Lfm2Model"]
