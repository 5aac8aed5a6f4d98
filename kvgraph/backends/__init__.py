"""Executors: each compiles a (graph, plan) into a Program.

* numpy: the float32 reference, always present.
* torch: the fast path (`pip install 'kvgraph[fast]'`), the default when torch is installed. It runs
  kvgraph's C kernels (backends/native) where they can be built, torch's own kernels elsewhere.
* native: the C kernels over numpy buffers, without torch (the smallest memory footprint); the default
  when torch is not installed but a C compiler is.
torch is imported only when the torch backend is asked for, so the core runs without it."""
from __future__ import annotations

import importlib.util

from ..errors import InvalidArgumentError
from .numpy_backend import NumpyBackend

BACKENDS = ("numpy", "torch", "native")


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def default_backend() -> str:
    if torch_available():
        return "torch"
    from . import native

    return "native" if native.library() is not None else "numpy"


def get_backend(name: str | None = None, threads: int | None = None):
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
