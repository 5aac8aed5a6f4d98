"""Executors: each compiles a (graph, plan) into a Program.

* native: kvgraph's C kernels over numpy buffers -- the default wherever a C compiler builds them.
* torch (`pip install 'kvgraph[fast]'`): the same C kernels plus torch for float matrices (its BLAS), or
  torch's own quantized kernels where no C compiler exists; the home of a future GPU path.
* numpy: the float32 reference, always present.
torch is imported only when the torch backend is asked for, so the core runs without it."""
from __future__ import annotations

import importlib.util

from ..errors import InvalidArgumentError
from .numpy_backend import NumpyBackend

BACKENDS = ("numpy", "torch", "native")


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def default_backend() -> str:
    """native where kvgraph's C kernels build (the fastest CPU path, no torch import: ~1.5 s and ~200 MB
    less at start), else torch's own quantized kernels if installed, else the numpy reference."""
    from . import native

    if native.library() is not None:
        return "native"
    return "torch" if torch_available() else "numpy"


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
