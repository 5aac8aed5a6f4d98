"""The numpy backend: float32 weights (dequantized once at load) and the reference kernels, the ground truth
every other backend is tested against."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from ..graph.ir import Graph
from ..plan.planner import Plan
from .compiler import Compiler
from .reference import Program


class NumpyBackend:
    name = "numpy"
    native = False                 # kvgraph's C kernels: not here
    flash_attn_default = False     # the reference runs ggml's non-flash path unless asked
    cache_types = ("f32", "f16", "q8_0")   # KV cache storage this backend reads; the first is its default

    def __init__(self, threads: int | None = None):
        self.n_threads = threads
        if threads:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=threads, user_api="blas")   # process-wide, as -t asks

    def describe(self) -> str:
        return "numpy (float32 reference)"

    def start_load(self, gguf_file) -> None:
        """Called before a model's weights are loaded (nothing to do here)."""

    def weight_bytes(self, gguf_file, names) -> int:
        """What the named tensors take dequantized to float32."""
        return sum(4 * info.n_elements for info in map(gguf_file.tensor, names) if info is not None)

    def load_weight(self, gguf_file, name: str) -> np.ndarray:
        """The reference computes in float32: every weight is dequantized once, at load."""
        return gguf_file.dequantize(name)

    def finish_load(self) -> None:
        """Called once every weight of a model is loaded (nothing to do here)."""

    def tie_output(self, embedding: np.ndarray) -> np.ndarray:
        return embedding

    def weights_nbytes(self, weights: Mapping[str, np.ndarray]) -> int:
        return sum(w.nbytes for w in {id(w): w for w in weights.values()}.values())

    def threads(self, n: int | None):
        """Context manager limiting BLAS threads (numpy's matmuls) to n."""
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=n, user_api="blas")

    def to_numpy(self, x: np.ndarray) -> np.ndarray:
        return np.array(x, dtype=np.float32, copy=True)

    def alloc_state(self, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
        return np.zeros(shape, dtype)

    def compile(self, graph: Graph, plan: Plan, weights: Mapping[str, np.ndarray],
                states: Mapping[str, np.ndarray], arena: np.ndarray | None = None) -> Program:
        return Compiler(self, graph, plan, weights, states).compile(arena)
