"""Shared fixtures: tiny GGUF files written here, and the real models pulled from the package registry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_models import TinySpec, write_tiny_llama

REFERENCE_DIR = Path(__file__).resolve().parent / "data" / "reference"   # made by tools/make_golden_references.py


def load_reference(name: str) -> dict:
    return json.loads((REFERENCE_DIR / name).read_text())


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> tuple[Path, dict]:
    """(path, tensors) of a 2-layer llama with f32 weights and GQA."""
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    return path, write_tiny_llama(path, TinySpec())


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from kvgraph.registry import resolve_model

    return resolve_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    from kvgraph.registry import resolve_model

    return resolve_model("gemma3-270m", progress=False)


@pytest.fixture(scope="session")
def smollm2_numpy(smollm2_path):
    """The real SmolLM2 loaded once for the numpy backend (about 10 s)."""
    from kvgraph.backends import get_backend
    from kvgraph.engine.loader import load_model

    return load_model(smollm2_path, get_backend("numpy"))
