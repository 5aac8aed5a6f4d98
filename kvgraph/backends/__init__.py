"""Executors: each compiles a (graph, plan) into a Program.

* native: kvgraph's C kernels over numpy buffers -- the default wherever a C compiler builds them.
* torch (`pip install 'kvgraph[fast]'`): the same C kernels plus torch for float matrices (its BLAS), or
  torch's own quantized kernels where no C compiler exists; the home of a future GPU path.
* numpy: the float32 reference, always present.
torch is imported only when the torch backend is asked for, so the core runs without it."""
from __future__ import annotations

import importlib.util
from typing import Any, ContextManager, Mapping, Protocol, runtime_checkable

import numpy as np

from ..errors import InvalidArgumentError
from .numpy_backend import NumpyBackend

BACKENDS = ("numpy", "torch", "native")


@runtime_checkable
class Backend(Protocol):
    """What the engine asks of an executor. A backend chooses kernels for graph nodes; it never knows a model.
    Compiling is compiler.Compiler's loop with the backend's kernel choosers."""

    name: str
    native: bool                    # runs kvgraph's C kernels
    flash_attn_default: bool        # -fa auto: on where a fused attention kernel exists
    cache_types: tuple[str, ...]    # KV cache storage it reads ("f16", "f32"); the first is its default

    def describe(self) -> str: ...

    def start_load(self, gguf_file) -> None: ...

    def weight_bytes(self, gguf_file, names) -> int: ...

    def load_weight(self, gguf_file, name: str) -> Any: ...

    def tie_output(self, embedding: Any) -> Any: ...

    def finish_load(self) -> None: ...

    def weights_nbytes(self, weights: Mapping[str, Any]) -> int: ...

    def threads(self, n: int | None) -> ContextManager: ...

    def to_numpy(self, x: Any) -> np.ndarray: ...

    def alloc_state(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray: ...

    def compile(self, graph, plan, weights: Mapping[str, Any], states: Mapping[str, np.ndarray],
                arena: np.ndarray | None = None): ...


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def default_backend() -> str:
    """native where kvgraph's C kernels build (the fastest CPU path, no torch import: ~1.5 s and ~200 MB
    less at start), else torch's own quantized kernels if installed, else the numpy reference."""
    from . import native

    if native.library() is not None:
        return "native"
    return "torch" if torch_available() else "numpy"


def get_backend(name: str | None = None, threads: int | None = None) -> Backend:
    name = (name or "auto").lower()
    if name == "auto":
        name = default_backend()
    if name == "numpy":
        return NumpyBackend(threads)
    if name == "native":
        from .native_backend import NativeBackend

        return NativeBackend(threads)
    if name == "torch":
        try:
            from .torch_backend import TorchBackend
        except ImportError as exc:
            raise InvalidArgumentError(
                f"the torch backend needs torch ({exc}); install it with: pip install 'kvgraph[fast]' "
                "(or use --backend numpy).") from None
        return TorchBackend(threads)
    raise InvalidArgumentError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}.")
