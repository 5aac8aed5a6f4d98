"""Executors: each compiles a (graph, plan) into a Program. numpy is the reference and always present."""
from __future__ import annotations

from ..errors import InvalidArgumentError
from .numpy_backend import NumpyBackend

BACKENDS = ("numpy",)
DEFAULT_BACKEND = "numpy"


def get_backend(name: str | None = None, threads: int | None = None):
    name = (name or DEFAULT_BACKEND).lower()
    if name == "auto":
        name = DEFAULT_BACKEND
    if name == "numpy":
        return NumpyBackend(threads)
    raise InvalidArgumentError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}.")
